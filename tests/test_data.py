import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eridiffusion.data import (
    BucketBatches, DataError, DataPipeline, ImageError, LatentCache, TextCache, bucket_for, build_items,
    fit_to_bucket, image_size, load_batch, load_image, process_caption, read_caption, to_tensor,
)


def dataset_cfg(folder, **overrides):
    cfg = dict(folder_path=str(folder), caption_ext=".txt", default_caption=None, trigger_word=None,
               caption_dropout_rate=0.0, shuffle_tokens=False, token_dropout_rate=0.0, keep_tokens=0,
               num_repeats=1, flip_x=False, flip_y=False, resolution=[64], random_crop=False, scale=1.0,
               cache_latents=False, cache_latents_to_disk=False, cache_text_embeddings=False,
               batch_size=None, loss_multiplier=1.0, num_frames=1, shrink_video_to_frames=True, fps=24,
               auto_frame_count=False, trim_auto_frame_count_tail=True, control_path=None,
               control_transparent_color=[0, 0, 0])
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2 + 0 * x], axis=2).astype(np.uint8))


def write_images(folder, sizes, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        gradient(w, h).save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"a photo, number {i}, tag{i % 3}")
    return folder


def avg_pool_encode(pixels):  # a deterministic stand-in VAE: 8x downscale, 3 channels
    return F.avg_pool2d(pixels, 8)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


# ---- images ---------------------------------------------------------------------------------------

@pytest.fixture
def odd_images(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    base = gradient(40, 30)
    base.save(d / "plain.jpg")
    base.save(d / "plain.webp")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white
    rgba.save(d / "rgba.png")
    base.convert("LA").save(d / "la.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    base.convert("L").save(d / "gray.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(d / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    base.save(d / "rotated.jpg", exif=exif)
    (d / "empty.jpg").write_bytes(b"")
    data = (d / "plain.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "notes.png").write_text("not an image")
    return d


def test_load_image_modes(odd_images):
    for name in ["plain.jpg", "plain.webp", "rgba.png", "la.png", "palette.png", "gray.png", "cmyk.jpg", "sixteen.png"]:
        img = load_image(odd_images / name)
        assert img.mode == "RGB" and img.size == (40, 30), name
    assert load_image(odd_images / "rgba.png").getpixel((5, 5)) == (255, 255, 255)
    assert load_image(odd_images / "sixteen.png").getpixel((5, 5)) == (255, 255, 255)
    assert load_image(odd_images / "rotated.jpg").size == (30, 40)
    assert image_size(odd_images / "rotated.jpg") == (30, 40)
    for name in ["empty.jpg", "truncated.jpg", "notes.png"]:
        with pytest.raises(ImageError):
            load_image(odd_images / name)


def test_build_items_skips_unreadable(odd_images):
    warnings = []
    items = build_items([dataset_cfg(odd_images)], process_trigger=None, divisibility=8, warn=warnings.append)
    assert len(items) == 9
    assert f"skipped 3 of 12 images in {odd_images}: empty.jpg, notes.png, truncated.jpg" in warnings
    assert sum(w.startswith("skipping unreadable") for w in warnings) == 3
    rotated = next(i for i in items if i.path.name == "rotated.jpg")
    assert rotated.original_size == (40, 30)  # (h, w) after EXIF rotation


def test_build_items_errors_and_scan(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_items([dataset_cfg(tmp_path / "nope")], process_trigger=None, divisibility=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no usable image"):
        build_items([dataset_cfg(tmp_path / "bad")], process_trigger=None, divisibility=8, warn=lambda m: None)
    d = write_images(tmp_path / "data", [(64, 64)])
    write_images(d / "sub", [(64, 64)])
    write_images(d / "_latent_cache", [(64, 64)])
    write_images(d / ".hidden", [(64, 64)])
    gradient(8, 8).save(d / "UPPER.JPG")
    items = build_items([dataset_cfg(d)], process_trigger=None, divisibility=8, warn=lambda m: None)
    assert [i.path.relative_to(d).as_posix() for i in items] == ["UPPER.JPG", "img00.png", "sub/img00.png"]


def test_repeats_flips_resolutions(tmp_path):
    d = write_images(tmp_path / "d", [(128, 64), (64, 64)])
    cfg = dataset_cfg(d, num_repeats=2, flip_x=True, flip_y=True, resolution=[32, 64], trigger_word="sks",
                      loss_multiplier=0.5)
    items = build_items([cfg], process_trigger="other", divisibility=8)
    assert len(items) == 2 * 2 * 4 * 2
    assert {(i.flip_x, i.flip_y) for i in items} == {(False, False), (True, False), (False, True), (True, True)}
    assert {i.bucket for i in items} == {(40, 24), (88, 40), (32, 32), (64, 64)}
    assert all(i.trigger == "sks" and i.loss_multiplier == 0.5 for i in items)
    assert build_items([dataset_cfg(d)], process_trigger="other", divisibility=8)[0].trigger == "other"


# ---- buckets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("divisibility", [8, 16, 32, 64])
def test_buckets_keep_aspect_and_budget(divisibility):
    rng = random.Random(0)
    for _ in range(2000):
        w, h, res = rng.randint(32, 6000), rng.randint(32, 6000), rng.choice([256, 512, 768, 1024])
        bw, bh = bucket_for(w, h, res, divisibility)
        assert bw % divisibility == 0 and bh % divisibility == 0
        assert bw * bh <= max(min(w * h, res * res), divisibility ** 2)  # unless one step exceeds the budget
        assert bw <= max(w, divisibility) and bh <= max(h, divisibility)  # never upscaled
        s = math.sqrt(min(w * h, res * res) / (w * h))
        short = min(w, h) * s
        if short >= 4 * divisibility:  # rounding to the grid costs at most about one step per side
            assert abs(math.log((bw / bh) / (w / h))) <= 1.5 * divisibility / short
            assert bw * bh >= 0.7 * min(w * h, res * res)


def test_bucket_examples():
    assert bucket_for(1024, 1024, 1024, 16) == (1024, 1024)
    assert bucket_for(3000, 2000, 1024, 16) == (1248, 832)  # exactly 3:2
    assert bucket_for(300, 200, 1024, 16) == (288, 192)  # small images are not upscaled
    assert bucket_for(10, 10, 512, 16) == (16, 16)


def test_fit_to_bucket_and_tensor():
    img = gradient(300, 200)
    out, crop, scaled = fit_to_bucket(img, 96, 96, random_crop=False, rng=random.Random(0))
    assert out.size == (96, 96) and scaled == (96, 144) and crop == (0, 24)
    crops = {fit_to_bucket(img, 96, 96, random_crop=True, rng=random.Random(s))[1] for s in range(20)}
    assert len(crops) > 1 and all(y == 0 and 0 <= x <= 48 for y, x in crops)
    t = to_tensor(Image.new("RGB", (4, 2), (255, 0, 127)))
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32
    assert t[0].eq(1).all() and t[1].eq(-1).all() and t[2].abs().max() < 0.01


# ---- captions -------------------------------------------------------------------------------------

def test_read_caption(tmp_path):
    img = tmp_path / "a.jpg"
    assert read_caption(img, ".txt", None) == ""
    assert read_caption(img, ".txt", " fallback ") == "fallback"
    (tmp_path / "default.txt").write_text("folder default")
    assert read_caption(img, ".caption", "fallback") == "folder default"
    (tmp_path / "default.caption").write_text("caption default")
    assert read_caption(img, ".caption", None) == "caption default"
    (tmp_path / "a.caption").write_bytes("caf\xe9, r\xe9sum\xe9\n".encode("latin-1"))
    assert read_caption(img, ".caption", None) == "café, résumé"
    (tmp_path / "a.txt").write_text("\ufeffown caption  \n", encoding="utf-8")
    assert read_caption(img, ".txt", None) == "own caption"


def test_process_caption_trigger():
    rng = random.Random(0)
    assert process_caption("a dog, grass", trigger="sks", rng=rng) == "sks a dog, grass"
    assert process_caption("[trigger] dog, grass", trigger="sks", rng=rng) == "sks dog, grass"
    assert process_caption("photo of sks,  grass ,", trigger="sks", rng=rng) == "photo of sks, grass"
    assert process_caption("[trigger] dog", trigger=None, rng=rng) == "dog"
    assert process_caption("a dog", trigger="sks", rng=rng, dropout_rate=1.0) == "sks"
    assert process_caption("a dog", trigger=None, rng=rng, dropout_rate=1.0) == ""
    dropped = [process_caption("a dog", trigger=None, rng=rng, dropout_rate=0.3) == "" for _ in range(2000)]
    assert 0.25 < sum(dropped) / 2000 < 0.35


def test_process_caption_shuffle_and_token_dropout():
    caption = "keep1, keep2, " + ", ".join(f"t{i}" for i in range(10))
    kw = dict(trigger=None, shuffle_tokens=True, keep_tokens=2)
    a = [process_caption(caption, rng=random.Random(7), **kw) for _ in range(2)]
    assert a[0] == a[1] and a[0] != caption
    outs = {process_caption(caption, rng=random.Random(s), **kw) for s in range(20)}
    assert len(outs) > 10 and all(o.startswith("keep1, keep2, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)
    for s in range(20):
        out = process_caption(caption, trigger=None, rng=random.Random(s), token_dropout_rate=0.5, keep_tokens=2)
        tokens = out.split(", ")
        assert tokens[:2] == ["keep1", "keep2"] and len(tokens) < 12


# ---- batches --------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path):
    sizes = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)] * 2
    return write_images(tmp_path / "mixed", sizes)


def plan(batches, n):
    return [[(i.path.name, i.flip_x) for i in batches.next_batch()] for _ in range(n)]


def test_bucket_batches(mixed):
    items = build_items([dataset_cfg(mixed, flip_x=True)], process_trigger=None, divisibility=8)
    batches = BucketBatches(items, batch_size=4, seed=1)
    assert len(batches) == 3 + 2 + 1  # 10, 6 and 4 items per bucket
    for _ in range(3 * len(batches)):
        batch = batches.next_batch()
        assert len(batch) == 4 and len({i.bucket for i in batch}) == 1
    assert batches.epoch == 2
    one_epoch = plan(BucketBatches(items, 4, seed=1), len(batches))
    assert {n for b in one_epoch for n in b} == {(i.path.name, i.flip_x) for i in items}  # all seen each epoch
    assert plan(BucketBatches(items, 4, seed=1), 20) == plan(BucketBatches(items, 4, seed=1), 20)
    assert plan(BucketBatches(items, 4, seed=1), 20) != plan(BucketBatches(items, 4, seed=2), 20)
    epochs = plan(BucketBatches(items, 4, seed=1), 2 * len(batches))
    assert epochs[:len(batches)] != epochs[len(batches):]


def test_bucket_batches_resume(mixed):
    items = build_items([dataset_cfg(mixed)], process_trigger=None, divisibility=8)
    for consumed in (0, 2, 4, 5, 9):  # mid-epoch, at the epoch boundary, into the next epoch
        a = BucketBatches(items, 2, seed=3)
        plan(a, consumed)
        b = BucketBatches(items, 2, seed=3)
        b.load_state_dict(a.state_dict())
        assert plan(a, 7) == plan(b, 7)


def test_per_dataset_batch_size(tmp_path):
    a = write_images(tmp_path / "a", [(64, 64)] * 3)
    b = write_images(tmp_path / "b", [(64, 64)] * 3)
    items = build_items([dataset_cfg(a), dataset_cfg(b, batch_size=1)], process_trigger=None, divisibility=8)
    batches = BucketBatches(items, 2, seed=0)
    sizes = sorted(len(batches.next_batch()) for _ in range(len(batches)))
    assert sizes == [1, 1, 1, 2, 2]


def test_pipeline_batches_and_resume(mixed):
    cfg = dataset_cfg(mixed, shuffle_tokens=True, caption_dropout_rate=0.2, random_crop=True, loss_multiplier=2.0)
    pipe = DataPipeline([cfg], process_trigger="sks", divisibility=8, batch_size=2, seed=5)
    batch = pipe.next_batch()
    assert batch.latents is None and batch.text is None
    h, w = batch.target_sizes[0]
    assert batch.pixels.shape == (2, 3, h, w) and batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert all(c.startswith("sks") for c in batch.captions)
    assert batch.loss_weights.tolist() == [2.0, 2.0]
    for _ in range(3):
        pipe.next_batch()
    resumed = DataPipeline([cfg], process_trigger="sks", divisibility=8, batch_size=2, seed=5)
    resumed.load_state_dict(pipe.state_dict())
    for _ in range(len(pipe) + 2):
        x, y = pipe.next_batch(), resumed.next_batch()
        assert x.captions == y.captions and x.crop_top_lefts == y.crop_top_lefts and torch.equal(x.pixels, y.pixels)


# ---- caches ---------------------------------------------------------------------------------------

def test_latent_disk_cache_reuse_and_invalidation(mixed):
    items = build_items([dataset_cfg(mixed, flip_x=True, num_repeats=2)], process_trigger=None, divisibility=8)
    encode = Counter(avg_pool_encode)
    assert LatentCache(encode, "vae-a", to_disk=True).prepare(items, "cpu", torch.float32, progress=False) == 20
    assert encode.calls == 20  # repeats share an entry, flips do not
    assert len(list((mixed / "_latent_cache").glob("*.safetensors"))) == 20

    cache = LatentCache(Counter(avg_pool_encode), "vae-a", to_disk=True)
    assert cache.prepare(items, "cpu", torch.float32, progress=False) == 0 and cache.encode.calls == 0
    batch = load_batch(items[:2], rng=random.Random(0), latent_cache=cache)
    assert batch.pixels is None
    uncached = load_batch(items[:2], rng=random.Random(0))
    assert torch.allclose(batch.latents, avg_pool_encode(uncached.pixels))
    assert batch.crop_top_lefts == uncached.crop_top_lefts

    # a rewritten image, or a different VAE, means new entries
    gradient(64, 64).rotate(90).save(items[0].path)
    os.utime(items[0].path, ns=(1, 1))
    assert cache.get(items[0]) is None
    assert LatentCache(encode, "vae-a", to_disk=True).prepare(items, "cpu", torch.float32, progress=False) == 2
    assert LatentCache(encode, "vae-b", to_disk=True).prepare(items, "cpu", torch.float32, progress=False) == 20


def test_latent_memory_cache(mixed):
    items = build_items([dataset_cfg(mixed)], process_trigger=None, divisibility=8)
    cache = LatentCache(avg_pool_encode, "vae", to_disk=False)
    assert cache.prepare(items, "cpu", torch.bfloat16, progress=False) == 10
    assert not (mixed / "_latent_cache").exists()
    latent = cache.get(items[0])["latent"]
    assert latent.dtype == torch.bfloat16 and latent.device.type == "cpu"


def toy_text_encode(captions):  # deterministic, fixed-shape "embeddings" of a caption
    out = torch.zeros(len(captions), 4, 8)
    for i, c in enumerate(captions):
        for j, ch in enumerate(c.encode()[:32]):
            out[i, j % 4, j % 8] += ch / 255
    return {"embeds": out, "mask": torch.ones(len(captions), 4, dtype=torch.bool)}


def test_text_cache(mixed):
    (mixed / "img00.txt").write_text("[trigger] on a beach")
    cfg = dataset_cfg(mixed, caption_dropout_rate=0.5, shuffle_tokens=True)
    items = build_items([cfg], process_trigger="sks", divisibility=8)
    encode = Counter(toy_text_encode)
    assert TextCache(encode, "te").prepare(items, progress=False) == 11  # 10 captions + the dropout one
    again = TextCache(Counter(toy_text_encode), "te")
    assert again.prepare(items, progress=False) == 0 and again.encode.calls == 0

    seen = {}
    for s in range(30):
        batch = load_batch(items[:3], rng=random.Random(s), text_cache=again)
        assert batch.text["embeds"].shape == (3, 4, 8) and batch.text["mask"].shape == (3, 4)
        for caption, embeds in zip(batch.captions, batch.text["embeds"]):
            assert torch.equal(embeds, toy_text_encode([caption])["embeds"][0])
            seen[caption] = True
    assert set(seen) == {"sks", "sks on a beach", "sks a photo, number 1, tag1", "sks a photo, number 2, tag2"}
    assert again.encode.calls == 0
    assert TextCache(encode, "te-2").prepare(items, progress=False) == 11


def test_pipeline_with_both_caches(mixed):
    cfg = dataset_cfg(mixed, cache_latents=True, cache_text_embeddings=True)
    pipe = DataPipeline([cfg], process_trigger=None, divisibility=8, batch_size=2, seed=0)
    assert pipe.attach_latent_cache(avg_pool_encode, "vae", device="cpu", dtype=torch.float32, progress=False)
    assert pipe.attach_text_cache(toy_text_encode, "te", progress=False)
    batch = pipe.next_batch()
    assert batch.pixels is None and batch.latents.shape[:2] == (2, 3) and batch.text["embeds"].shape[0] == 2
    plain = DataPipeline([dataset_cfg(mixed)], process_trigger=None, divisibility=8, batch_size=2, seed=0)
    assert plain.attach_latent_cache(avg_pool_encode, "vae", device="cpu", dtype=torch.float32) is None
    assert plain.attach_text_cache(toy_text_encode, "te") is None
