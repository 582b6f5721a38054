"""Video data: clips decoded, frames chosen per ai-toolkit's keys, frame + aspect buckets, caches, bad clips, controls.

Clips are written here with PyAV (and PIL for GIF/WebP): a background whose grey level tells the frame's index,
and a white square moving across it.
"""
import os
import random

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eridiffusion import cli
from eridiffusion.config import parse_config
from eridiffusion.config.schema import ConfigError
from eridiffusion.data import (
    ClipInfo, DataError, DataPipeline, LatentCache, build_items, load_batch, probe_clip, read_frames, select_frames,
)

from .conftest import train_config
from .test_data import Counter, dataset_cfg, write_images

GREY_STEP = 8  # frame i has background 8 * i


def frame(i, w, h, invert=False):
    img = np.full((h, w, 3), GREY_STEP * i, np.uint8)
    x, y = (3 * i) % (w - 10), h // 3
    img[y:y + 10, x:x + 10] = 255
    return Image.fromarray(255 - img if invert else img)


def write_clip(path, w, h, n, fps=24, invert=False, stored_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [frame(i, w, h, invert) for i in range(n)]
    if stored_size:
        frames = [f.resize(stored_size, Image.LANCZOS) for f in frames]
    if path.suffix in (".gif", ".webp"):
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                       **({"lossless": True} if path.suffix == ".webp" else {}))
        return path
    codec = {".mp4": "libx264", ".webm": "libvpx", ".mov": "mpeg4", ".mkv": "ffv1"}[path.suffix]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "4", "b": "0"} if codec == "libvpx" else {"qscale": "1"} if codec == "mpeg4" else {}
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(img)))
        out.mux(stream.encode())
    return path


def index_of(pixels):
    """Frame index from a [3, H, W] tensor in [-1, 1] (or an image): its top-left background's grey level."""
    grey = np.asarray(pixels)[:4, :4].mean() if isinstance(pixels, Image.Image) else \
        ((pixels[:, :4, :4].mean() + 1) * 127.5).item()
    return round(grey / GREY_STEP)


def video_cfg(folder, **overrides):
    return dataset_cfg(folder, **{"num_frames": 9, **overrides})


class ToyVideoModel:
    """Test stand-in for a video architecture's side of the data contract (not a product feature): Wan-like frame
    rule 4k+1, and an encoder that average-pools 8x8 pixels and keeps the first frame plus one per 4 after it."""
    frame_rule = (4, 1)

    @staticmethod
    def encode_images(pixels):  # [B, 3, F, H, W] -> [B, 3, 1 + (F - 1) / 4, H / 8, W / 8]
        first = F.avg_pool3d(pixels[:, :, :1], (1, 8, 8))
        if pixels.shape[2] == 1:
            return first
        return torch.cat([first, F.avg_pool3d(pixels[:, :, 1:], (4, 8, 8))], dim=2)


RULE = ToyVideoModel.frame_rule


# ---- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp"])
def test_clips_decode_in_every_format(tmp_path, ext):
    for w, h in ((64, 48), (48, 64)):
        path = write_clip(tmp_path / f"c{w}{ext}", w, h, 12, fps=20)
        info = probe_clip(path)
        assert (info.width, info.height, info.frames) == (w, h, 12) and info.fps == pytest.approx(20, rel=0.05)
        frames = read_frames(path, [7, 0, 11, 7])  # any order, repeats
        assert [f.size for f in frames] == [(w, h)] * 4
        assert [index_of(f) for f in frames] == [7, 0, 11, 7]


# ---- frame selection --------------------------------------------------------------------------

def test_frame_selection_follows_ai_toolkits_keys():
    def pick(frames, source_fps=24.0, **keys):
        keys = {"num_frames": 17, "shrink": True, "fps": 24, "auto": False, "trim_tail": True, **keys}
        return select_frames(ClipInfo(64, 48, frames, source_fps), rule=RULE, **keys)

    whole = pick(40)  # shrink_video_to_frames: num_frames spread over the whole clip
    assert whole.count == 17 and whole.indices(0)[0] == 0 and whole.indices(0)[-1] == 39 and whole.max_start == 0
    assert pick(40, num_frames=20).count == 17  # the largest 4k+1 count <= num_frames
    short = pick(10).indices(0)  # a short clip: the largest count it holds, over all of it, no frame twice
    assert len(short) == 9 and short[0] == 0 and short[-1] == 9 and len(set(short)) == 9
    at_fps = pick(40, 30.0, shrink=False, fps=15)
    assert at_fps.count == 17 and at_fps.step == 2 and at_fps.max_start == 39 - 32  # real-time spacing, random start
    assert at_fps.indices(at_fps.max_start)[-1] == 39
    assert pick(40, shrink=False, fps=48).step == 1  # never repeats a source frame
    assert pick(20, 30.0, shrink=False, fps=15).count == 9  # 10 frames at 15 fps
    auto = pick(49, auto=True, fps=12)  # 2 s at 12 fps = 25 frames, num_frames ignored
    assert (auto.count, auto.step, auto.max_start) == (25, 2, 0)
    auto_no_trim = pick(52, auto=True, trim_tail=False, fps=12)
    assert auto_no_trim.count == 25 and auto_no_trim.indices(0)[-1] == 51  # spread over the whole clip
    assert pick(4).count == 1  # too short to be a video (the dataset skips it)


# ---- datasets -----------------------------------------------------------------------------------

@pytest.fixture
def clips(tmp_path):
    """Clips of two aspects and several lengths, and images, in one folder."""
    d = tmp_path / "clips"
    write_clip(d / "wide_long.mp4", 64, 48, 20)
    write_clip(d / "wide_long2.webm", 64, 48, 24)
    write_clip(d / "tall_long.mov", 48, 64, 16)
    write_clip(d / "wide_short.mkv", 64, 48, 7)  # 5 frames
    write_clip(d / "tall_anim.gif", 48, 64, 10)
    write_clip(d / "wide_anim.webp", 64, 48, 9)
    write_images(d, [(64, 48), (48, 64), (64, 48)])
    for p in d.iterdir():
        if p.suffix not in (".txt", ".png"):
            p.with_suffix(".txt").write_text(f"a clip called {p.stem}")
    return d


def test_frame_and_aspect_buckets_never_mix(clips):
    pipe = DataPipeline([video_cfg(clips)], process_trigger=None, divisibility=16, batch_size=2, seed=0,
                        frame_rule=RULE)
    counts = {item.path.name: item.frames.count for item in pipe.items}
    assert counts == {"wide_long.mp4": 9, "wide_long2.webm": 9, "tall_long.mov": 9, "wide_short.mkv": 5,
                      "tall_anim.gif": 9, "wide_anim.webp": 9, "img00.png": 1, "img01.png": 1, "img02.png": 1}
    shapes = set()
    for _ in range(2 * len(pipe)):
        batch = pipe.next_batch()
        assert batch.pixels.ndim == 5 and batch.pixels.shape[:2] == (2, 3)
        assert len({counts[p.name] for p in batch.paths}) == 1 and len(set(batch.target_sizes)) == 1
        shapes.add(tuple(batch.pixels.shape[2:]))
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert shapes == {(9, 48, 64), (9, 64, 48), (5, 48, 64), (1, 48, 64), (1, 64, 48)}

    # an image architecture keeps [B, 3, H, W] and refuses the clips
    images = write_images(clips.parent / "images", [(64, 48)] * 2)
    assert DataPipeline([dataset_cfg(images)], process_trigger=None, divisibility=16, batch_size=2,
                        seed=0).next_batch().pixels.shape == (2, 3, 48, 64)
    with pytest.raises(DataError, match=r"tall_anim\.gif \(and 4 more\) is a video clip.*model\.arch"):
        build_items([dataset_cfg(clips)], process_trigger=None, divisibility=16)
    with pytest.raises(DataError, match=r"datasets\[0\]\.num_frames 9: the model \(model\.arch\) trains on still"):
        build_items([video_cfg(images)], process_trigger=None, divisibility=16)
    with pytest.raises(DataError, match=r"gif \(and 4 more\) is a video clip, and datasets\[0\]\.num_frames is 1"):
        build_items([dataset_cfg(clips)], process_trigger=None, divisibility=16, frame_rule=RULE)


def test_frames_are_the_ones_selected(tmp_path):
    path = write_clip(tmp_path / "d" / "clip.mp4", 64, 48, 30, fps=30)
    warnings = []
    cfg = video_cfg(path.parent, num_frames=12, shrink_video_to_frames=False, fps=15, flip_x=True)
    item = build_items([cfg], process_trigger=None, divisibility=16, frame_rule=RULE, warn=warnings.append)[1]
    assert any("num_frames 12 is not a frame count the model takes (4k+1); clips train on at most 9" in w
               for w in warnings)
    assert item.flip_x and (item.frames.count, item.frames.step, item.frames.max_start) == (9, 2, 13)
    starts = set()
    for seed in range(12):
        pixels, _, start = item.pixels(random.Random(seed))
        assert [index_of(pixels[:, f]) for f in range(9)] == list(range(start, start + 17, 2))
        starts.add(start)
    assert len(starts) > 3  # a random start per draw


def test_clip_latent_cache_reuse_and_invalidation(clips):
    def items(**keys):
        return build_items([video_cfg(clips, **keys)], process_trigger=None, divisibility=16, frame_rule=RULE)

    first = items(shrink_video_to_frames=False, random_crop=True)
    encode = Counter(ToyVideoModel.encode_images)
    assert LatentCache(encode, "vae", to_disk=True).prepare(first, "cpu", torch.float32, progress=False) == 9
    cache = LatentCache(Counter(ToyVideoModel.encode_images), "vae", to_disk=True)
    assert cache.prepare(first, "cpu", torch.float32, progress=False) == 0 and cache.encode.calls == 0

    clip = next(i for i in first if i.path.name == "wide_long.mp4")
    entry = cache.get(clip)
    assert entry["latent"].shape == (3, 3, 6, 8)  # 9 frames -> 3 latent frames
    start, crop = int(entry["frame_start"]), tuple(entry["crop_top_left"].tolist())
    assert 0 <= start <= clip.frames.max_start
    pixels, *_ = clip.pixels(random.Random(), at=(crop, start))
    assert torch.allclose(entry["latent"], ToyVideoModel.encode_images(pixels[None])[0])
    batch = load_batch([clip, clip], rng=random.Random(0), latent_cache=cache)
    assert batch.pixels is None and batch.latents.shape == (2, 3, 3, 6, 8)

    # another frame choice, or a rewritten clip, means new entries
    assert cache.prepare(items(random_crop=True), "cpu", torch.float32, progress=False) == 5  # 4 images unchanged
    write_clip(clip.path, 64, 48, 20, invert=True)
    os.utime(clip.path, ns=(1, 1))
    assert cache.get(clip) is None
    assert cache.prepare(first, "cpu", torch.float32, progress=False) == 1


def test_bad_clips_are_skipped_and_counted(clips):
    good = write_clip(clips / "zz_good.mp4", 64, 48, 12).read_bytes()
    (clips / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (clips / "empty.webm").write_bytes(b"")
    (clips / "noise.mov").write_bytes(np.random.default_rng(0).bytes(3000))
    write_clip(clips / "short.mp4", 64, 48, 4)
    write_clip(clips / "short_at_fps.gif", 64, 48, 12, fps=48)  # 6 frames at 24 fps: enough
    warnings = []
    items = build_items([video_cfg(clips, shrink_video_to_frames=False)], process_trigger=None, divisibility=16,
                        frame_rule=RULE, warn=warnings.append)
    bad = ["empty.webm", "noise.mov", "short.mp4", "truncated.mp4"]
    assert sorted({i.path.name for i in items} & set(bad)) == []
    assert "short_at_fps.gif" in {i.path.name for i in items}
    assert any("skipped 4 of 15 images and clips" in w and all(b in w for b in bad) for w in warnings)
    assert any("short.mp4: too short: its 4 frames" in w for w in warnings)


def test_controls_are_aligned_frame_for_frame(tmp_path):
    data, control = tmp_path / "data", tmp_path / "control"
    write_clip(data / "a.mp4", 64, 48, 30, fps=30)
    write_clip(control / "a.mkv", 64, 48, 30, fps=30, invert=True)  # lossless, so the check can be tight
    write_clip(data / "b.mp4", 96, 64, 30, fps=30)
    write_clip(control / "b.webm", 96, 64, 30, fps=30, invert=True, stored_size=(48, 32))  # scaled to its clip's
    frame(3, 64, 48).save(data / "img00.png")
    frame(3, 64, 48, invert=True).save(control / "img00.png")
    write_clip(data / "lonely.mp4", 64, 48, 12)  # no control: skipped
    for p in data.iterdir():
        p.with_suffix(".txt").write_text("x")
    cfg = video_cfg(data, control_path=str(control), shrink_video_to_frames=False, fps=15, random_crop=True,
                    flip_x=True, resolution=[48], cache_latents=True)
    warnings = []
    pipe = DataPipeline([cfg], process_trigger=None, divisibility=16, batch_size=1, seed=1, frame_rule=RULE,
                        warn=warnings.append, takes_control=True)
    assert any("lonely.mp4: no control file" in w for w in warnings)
    for _ in range(len(pipe)):
        batch = pipe.next_batch()
        assert batch.control.shape == batch.pixels.shape
        assert (batch.control + batch.pixels).abs().mean() < 0.05  # the inverted clip, cut the same way
    encode = lambda pixels, control: {"latent": ToyVideoModel.encode_images(pixels),
                                      "control": ToyVideoModel.encode_images(control)}
    pipe.attach_latent_cache(encode, "vae", device="cpu", dtype=torch.float32, progress=False)
    for item in pipe.items:  # the control is encoded with the pixels, cut where they were
        batch = load_batch([item], rng=random.Random(0), latent_cache=pipe.latent_cache)
        assert batch.pixels is None and batch.control is None  # both are in the cache
        entry = pipe.latent_cache.get(item)
        pixels, *_ = item.pixels(None, at=(tuple(entry["crop_top_left"].tolist()), int(entry["frame_start"])))
        torch.testing.assert_close(batch.latents["latent"][0], ToyVideoModel.encode_images(pixels[None])[0])
        assert (batch.latents["control"] + batch.latents["latent"]).abs().mean() < 0.05

    # a changed control file means a new entry; a model without controls refuses control_path, one with them needs it
    clip = next(item for item in pipe.items if item.clip)
    before = pipe.latent_cache.path(clip)
    write_clip(clip.control, 64, 48, 30, fps=30)
    assert pipe.latent_cache.path(clip) != before
    with pytest.raises(DataError, match=r"datasets\[0\].control_path: the model \(model.arch\) takes no control"):
        DataPipeline([cfg], process_trigger=None, divisibility=16, batch_size=1, seed=1, frame_rule=RULE)
    with pytest.raises(DataError, match=r"set datasets\[0\].control_path to their folder"):
        DataPipeline([video_cfg(data)], process_trigger=None, divisibility=16, batch_size=1, seed=1, frame_rule=RULE,
                     takes_control=True)


# ---- config ---------------------------------------------------------------------------------------

def test_video_keys_in_the_config(tmp_path):
    def dataset(**keys):
        cfg = train_config(tmp_path, tmp_path, tmp_path / "out", datasets=[{"folder_path": str(tmp_path), **keys}])
        return parse_config(cfg).config.process[0].datasets[0]

    ds = dataset()
    assert (ds.num_frames, ds.shrink_video_to_frames, ds.fps, ds.auto_frame_count, ds.trim_auto_frame_count_tail,
            ds.control_path, ds.control_transparent_color) == (1, True, 24, False, True, None, [0, 0, 0])
    assert dataset(num_frames=81, fps=16, control_path=[str(tmp_path)]).control_path == str(tmp_path)
    with pytest.raises(ConfigError, match="control_path.*one control_path folder"):
        dataset(control_path=["a", "b"])
    with pytest.raises(ConfigError, match="num_frames"):
        dataset(num_frames=0)


def test_an_image_model_names_the_clip_through_the_cli(tiny_flux, clips, tmp_path, write_config, capsys):
    assert cli.main([str(write_config(train_config(tiny_flux, clips, tmp_path / "out", steps=1)))]) == 1
    err = capsys.readouterr().err
    assert str(clips / "tall_anim.gif") in err and "trains on still images" in err
