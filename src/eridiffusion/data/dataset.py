"""Dataset folders -> items -> deterministic, resumable bucketed batches -> tensors."""
from __future__ import annotations

import itertools
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .buckets import bucket_for, fit_to_bucket, to_tensor
from .cache import LatentCache, TextCache, stack_latents
from .captions import process_caption, read_caption
from .images import IMAGE_EXTS, ImageError, image_size, load_image
from .video import (
    VIDEO_EXTS, ClipError, FrameSelection, frame_count_for, is_animated, probe_clip, read_frames, select_frames,
)

log = logging.getLogger(__name__)


class DataError(Exception):
    pass


@dataclass(frozen=True)
class Item:
    """One training example: an image (or a clip) at one resolution, possibly a flipped copy."""
    path: Path
    caption: str  # raw, as read from disk
    trigger: str | None  # effective: the dataset's trigger_word, else the process-level one
    flip_x: bool
    flip_y: bool
    bucket: tuple[int, int]  # (w, h)
    original_size: tuple[int, int]  # (h, w), EXIF-corrected
    dataset_index: int
    # per-dataset settings, copied so an item is self-contained
    caption_dropout_rate: float = 0.0
    shuffle_tokens: bool = False
    token_dropout_rate: float = 0.0
    keep_tokens: int = 0
    random_crop: bool = False
    scale: float = 1.0
    loss_multiplier: float = 1.0
    batch_size: int | None = None
    # a video architecture's items: which frames (an image is one); None for an image architecture
    frames: FrameSelection | None = None
    clip: bool = False  # decoded as a clip (else read as an image)
    # the paired control image or clip (same stem in control_path), fitted exactly as this item
    control: Path | None = None
    control_clip: bool = False
    control_background: tuple[int, int, int] = (0, 0, 0)  # control_transparent_color

    @property
    def group(self) -> tuple:
        """Items of one group stack into one batch: one bucket, one frame count, one control frame count."""
        count = self.frames.count if self.frames else 0
        return self.bucket, count, count if self.control_clip else int(self.control is not None)

    def processed_caption(self, rng: random.Random) -> str:
        return process_caption(self.caption, trigger=self.trigger, rng=rng, dropout_rate=self.caption_dropout_rate,
                               shuffle_tokens=self.shuffle_tokens, token_dropout_rate=self.token_dropout_rate,
                               keep_tokens=self.keep_tokens)

    def pixels(self, rng: random.Random, at: tuple[tuple[int, int], int] | None = None
               ) -> tuple[torch.Tensor, tuple[int, int], int]:
        """Fitted to the bucket, in [-1, 1]: [3, H, W] for an image architecture, [3, F, H, W] for a video one.
        Also the crop's top-left (y, x) and the first frame's index, drawn from `rng` (random crop, random
        start), or `at` = (crop, start) to repeat an earlier draw."""
        if at is None:
            start = rng.randint(0, self.frames.max_start) if self.frames and self.frames.max_start else 0
            at = (None, start)
        frames = read_frames(self.path, self.frames.indices(at[1])) if self.clip else [load_image(self.path)]
        tensor, crop = self._fit(frames, rng, at[0])
        return tensor, crop, at[1]

    def control_pixels(self, crop: tuple[int, int], start: int) -> torch.Tensor:
        """The control image or clip, resized to this item's original size and fitted as its pixels were (same
        flips, crop and frames): the layout of `pixels`, with one frame for a control image."""
        frames = (read_frames(self.control, self.frames.indices(start), self.control_background) if self.control_clip
                  else [load_image(self.control, self.control_background)])
        h, w = self.original_size
        return self._fit([f if f.size == (w, h) else f.resize((w, h), Image.LANCZOS) for f in frames], None, crop)[0]

    def _fit(self, frames: list[Image.Image], rng: random.Random | None, crop: tuple[int, int] | None
             ) -> tuple[torch.Tensor, tuple[int, int]]:
        out = []
        for img in frames:
            if self.flip_x:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.flip_y:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            img, crop, _ = fit_to_bucket(img, *self.bucket, random_crop=self.random_crop, rng=rng, crop=crop)
            out.append(to_tensor(img))  # every later frame is cut at the first one's window
        return (out[0] if self.frames is None else torch.stack(out, dim=1)), crop


def scan_images(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    """Image (or `exts`) files under `folder`, recursively, sorted; hidden and `_`-prefixed (cache) folders
    skipped."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))  # a symlink back to an ancestor must not loop forever
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and os.path.realpath(Path(root, d)) not in seen]
        found += [Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(exts)]
    return sorted(found)


def _video_mode(cfg: Any) -> bool:
    return cfg.num_frames > 1 or cfg.auto_frame_count


def _is_clip(path: Path, rule: tuple[int, int] | None) -> bool:
    suffix = path.suffix.lower()
    return suffix in VIDEO_EXTS or (rule is not None and suffix == ".webp" and is_animated(path))


def _shortest_video(rule: tuple[int, int]) -> int:
    step, first = rule
    return first if first > 1 else first + step


def _check_frame_keys(cfg: Any, where: str, rule: tuple[int, int] | None, warn: Callable[[str], None]) -> None:
    if rule is None:
        if _video_mode(cfg):
            key = "auto_frame_count" if cfg.auto_frame_count else f"num_frames {cfg.num_frames}"
            raise DataError(f"{where}.{key}: the model (model.arch) trains on still images; use num_frames: 1, "
                            "or a video architecture")
        return
    if _video_mode(cfg) and not cfg.auto_frame_count:
        count, (step, first) = frame_count_for(cfg.num_frames, rule), rule
        if count < 2:
            raise DataError(f"{where}.num_frames {cfg.num_frames}: the model takes clips of {step}k+{first} frames; "
                            f"use at least {_shortest_video(rule)}")
        if count != cfg.num_frames:
            warn(f"{where}.num_frames {cfg.num_frames} is not a frame count the model takes ({step}k+{first}); "
                 f"clips train on at most {count} frames")


def _check_control(cfg: Any, where: str, takes_control: bool) -> None:
    if cfg.control_path and not takes_control:
        raise DataError(f"{where}.control_path: the model (model.arch) takes no control images or clips; remove the key")
    if takes_control and not cfg.control_path:
        raise DataError(f"{where}.control_path: the model (model.arch) trains on control images or clips paired with "
                        f"the dataset's files by name (same stem); set {where}.control_path to their folder")


def _control_for(path: Path, folder: Path) -> Path | None:
    """The same-stem file in the control folder; an image before a clip, as ai-toolkit looks."""
    for ext in IMAGE_EXTS + VIDEO_EXTS:
        for candidate in (folder / f"{path.stem}{ext}", folder / f"{path.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _refuse_clips(clips: list[Path], cfg: Any, where: str, rule: tuple[int, int] | None) -> None:
    more = f" (and {len(clips) - 1} more)" if len(clips) > 1 else ""
    why = ("the model (model.arch) trains on still images; move clips out of {where}.folder_path, or train a video "
           "architecture" if rule is None else
           "{where}.num_frames is 1; set num_frames (e.g. 81) to train on clips, or move them out of {where}.folder_path")
    raise DataError(f"{clips[0]}{more} is a video clip, and " + why.format(where=where))


def _item_fields(path: Path, cfg: Any, where: str, rule: tuple[int, int] | None) -> dict:
    """What an item takes from its file (and its control's): size, frames. ImageError / ClipError: skip the file
    (unreadable, too short, bad control); DataError: a clip the config cannot take at all."""
    clip = _is_clip(path, rule)
    if clip and not _video_mode(cfg):  # an animated WebP (other clips are refused by their extension first)
        _refuse_clips([path], cfg, where, rule)
    if not clip:
        w, h = image_size(path, verify=True)
        fields = dict(original_size=(h, w), frames=None if rule is None else FrameSelection(1, 1.0, 0))
    else:
        info = probe_clip(path)
        frames = select_frames(info, num_frames=cfg.num_frames, shrink=cfg.shrink_video_to_frames, fps=cfg.fps,
                               auto=cfg.auto_frame_count, trim_tail=cfg.trim_auto_frame_count_tail, rule=rule)
        if frames.count < 2:
            raise ClipError(path, f"too short: its {info.frames} frames ({info.fps:g} fps) give fewer than the "
                                  f"{_shortest_video(rule)} the model needs at {where}'s frame settings")
        fields = dict(original_size=(info.height, info.width), frames=frames, clip=True)
    if cfg.control_path:
        control = _control_for(path, Path(cfg.control_path).expanduser())
        if control is None:
            raise ImageError(path, f"no control file with its stem in {where}.control_path {cfg.control_path}")
        try:
            if not _is_clip(control, rule):
                image_size(control, verify=True)
            elif not clip:
                raise ClipError(control, "a clip cannot be the control of an image")
            elif (has := probe_clip(control).frames) < (needs := frames.indices(frames.max_start)[-1] + 1):
                raise ClipError(control, f"{has} frames, fewer than the {needs} its clip trains from")
        except (ImageError, ClipError) as e:
            raise ImageError(path, f"control {e}") from e
        fields.update(control=control, control_clip=_is_clip(control, rule),
                      control_background=tuple(cfg.control_transparent_color))
    return fields


def build_items(dataset_cfgs: Sequence[Any], *, process_trigger: str | None, divisibility: int,
                frame_rule: tuple[int, int] | None = None, warn: Callable[[str], None] = log.warning,
                ignore_captions: bool = False, takes_control: bool = False) -> list[Item]:
    """Items of every dataset. `frame_rule` = (step, first): the architecture takes clips of step*k + first frames
    (its items then carry frames, images as one); None: an image architecture, which takes no clip.
    `takes_control`: the architecture conditions on control_path's files, which every dataset must then have.
    `ignore_captions` (train.unload_text_encoder): every item's caption is empty, so it trains on the trigger
    word alone (or the empty prompt)."""
    items = []
    for index, cfg in enumerate(dataset_cfgs):
        folder, where = Path(cfg.folder_path).expanduser(), f"datasets[{index}]"
        if not folder.is_dir():
            raise DataError(f"dataset folder {folder} does not exist")
        _check_frame_keys(cfg, where, frame_rule, warn)
        _check_control(cfg, where, takes_control)
        paths, found, skipped = scan_images(folder, IMAGE_EXTS + VIDEO_EXTS), {}, []
        clips = [p for p in paths if p.suffix.lower() in VIDEO_EXTS]
        if clips and (frame_rule is None or not _video_mode(cfg)):
            _refuse_clips(clips, cfg, where, frame_rule)
        for path in paths:
            try:
                found[path] = _item_fields(path, cfg, where, frame_rule)
            except (ImageError, ClipError) as e:
                warn(f"skipping {'unusable clip' if isinstance(e, ClipError) else 'unreadable image'} {e}")
                skipped.append(path.name)
        noun = "images" if all(p.suffix.lower() in IMAGE_EXTS for p in paths) else "images and clips"
        if skipped:
            warn(f"skipped {len(skipped)} of {len(paths)} {noun} in {folder}: {', '.join(skipped)}")
        if not found:
            exts = IMAGE_EXTS if frame_rule is None else IMAGE_EXTS + VIDEO_EXTS
            raise DataError(f"dataset folder {folder} has no usable image ({', '.join(exts)})")
        captions = {path: "" if ignore_captions else read_caption(path, cfg.caption_ext, cfg.default_caption) for path in found}
        if not ignore_captions and (uncaptioned := sum(not c for c in captions.values())):
            warn(f"{uncaptioned} of {len(found)} {noun} in {folder} have no caption "
                 f"(no {cfg.caption_ext} file, default file or default_caption)")
        settings = dict(dataset_index=index, trigger=cfg.trigger_word or process_trigger,
                        caption_dropout_rate=cfg.caption_dropout_rate, shuffle_tokens=cfg.shuffle_tokens,
                        token_dropout_rate=cfg.token_dropout_rate, keep_tokens=cfg.keep_tokens,
                        random_crop=cfg.random_crop, scale=cfg.scale, loss_multiplier=cfg.loss_multiplier,
                        batch_size=cfg.batch_size)
        # ai-toolkit adds flipped copies: flip_x and flip_y together give 4 versions of every image
        flips = list(itertools.product((False, True) if cfg.flip_x else (False,),
                                       (False, True) if cfg.flip_y else (False,)))
        for resolution, (path, fields), (flip_x, flip_y) in itertools.product(cfg.resolution, found.items(), flips):
            h, w = fields["original_size"]
            bucket = bucket_for(max(1, round(w * cfg.scale)), max(1, round(h * cfg.scale)), resolution, divisibility)
            item = Item(path=path, caption=captions[path], flip_x=flip_x, flip_y=flip_y, bucket=bucket,
                        **fields, **settings)
            items += [item] * cfg.num_repeats
    return items


class BucketBatches:
    """A fixed plan of batches per epoch (one group, i.e. bucket and frame count, and batch size per batch),
    reproducible from
    (seed, epoch), so (epoch, position) is the whole state needed to resume at the same batch."""

    def __init__(self, items: Sequence[Item], batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self.epoch, self.position = 0, 0
        self._plan = self._make_plan(0)

    def _make_plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}")  # str seeds hash the same in every process
        groups = defaultdict(list)
        for i, item in enumerate(self.items):
            groups[item.group, item.batch_size or self.batch_size].append(i)
        plan = []
        for (_, size), indices in sorted(groups.items()):
            rng.shuffle(indices)
            for start in range(0, len(indices), size):
                batch = indices[start:start + size]
                plan.append(batch + list(itertools.islice(itertools.cycle(indices), size - len(batch))))
        rng.shuffle(plan)
        return plan

    def __len__(self) -> int:
        return len(self._plan)

    def next_batch(self) -> list[Item]:
        if self.position >= len(self._plan):
            self.load_state_dict({"epoch": self.epoch + 1, "position": 0})
        batch = self._plan[self.position]
        self.position += 1
        return [self.items[i] for i in batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] != self.epoch:
            self._plan = self._make_plan(state["epoch"])
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class Batch:
    # [B, 3, H, W] in [-1, 1] (a video architecture's: [B, 3, F, H, W], F = 1 for images); None when latents
    # are cached
    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    captions: list[str]  # what was (or, with cached embeddings, had been) encoded
    text: dict[str, torch.Tensor] | None  # cached embeddings, stacked along dim 0
    original_sizes: list[tuple[int, int]]  # (h, w)
    crop_top_lefts: list[tuple[int, int]]  # (y, x)
    target_sizes: list[tuple[int, int]]  # (h, w)
    paths: list[Path]
    loss_weights: torch.Tensor  # [B]
    # seeds the step's noise and timesteps: a function of which batch this is, so one process accumulating two
    # batches and two processes taking one each draw the same (None: the generator runs on)
    noise_seed: int | None = None
    # the items' controls (control_path), fitted as the pixels are: [B, 3, F, H, W] in [-1, 1], F = 1 for control
    # images; encode_images takes them with the pixels (None when latents are cached: the cache holds them encoded)
    control: torch.Tensor | None = None


def load_batch(items: Sequence[Item], *, rng: random.Random, latent_cache: LatentCache | None = None,
               text_cache: TextCache | None = None) -> Batch:
    """Tensors for one batch. Cached latents replace pixels when every item has one; with a text cache
    the captions come as embeddings (the cached caption, or the dropout one)."""
    cached = [latent_cache.get(item) for item in items] if latent_cache is not None else [None]
    if all(entry is not None for entry in cached):
        pixels, latents = None, stack_latents(cached)
        crops = [tuple(entry["crop_top_left"].tolist()) for entry in cached]
        starts = [int(entry["frame_start"]) if "frame_start" in entry else 0 for entry in cached]
    else:
        pixels, crops, starts = zip(*(item.pixels(rng) for item in items))
        pixels, latents, crops = torch.stack(pixels), None, list(crops)
    control = None
    if pixels is not None and items[0].control is not None:  # one group per batch: all items have a control, or none
        control = torch.stack([item.control_pixels(c, s) for item, c, s in zip(items, crops, starts)])
    if text_cache is not None:
        captions, embeds = zip(*(text_cache.get(item, rng) for item in items))
        captions, text = list(captions), {key: torch.stack([e[key] for e in embeds]) for key in embeds[0]}
    else:
        captions, text = [item.processed_caption(rng) for item in items], None
    return Batch(pixels=pixels, latents=latents, captions=captions, text=text,
                 original_sizes=[item.original_size for item in items], crop_top_lefts=crops,
                 target_sizes=[(item.bucket[1], item.bucket[0]) for item in items],
                 paths=[item.path for item in items], control=control,
                 loss_weights=torch.tensor([item.loss_multiplier for item in items], dtype=torch.float32))


# gathers every process's in-memory cache entries into one dict (returning once all processes have called it)
Exchange = Callable[[dict], dict]


def _exchange(store, exchange: Exchange | None) -> None:
    if exchange is not None:
        store.absorb(exchange(store.memory()))


class DataPipeline:
    """What the training loop sees: items, bucketed batches, optional caches, resumable state.
    Per-batch randomness (captions, random crops) is seeded from (seed, epoch, position), so resuming
    reproduces it without saving RNG state."""

    def __init__(self, dataset_cfgs: Sequence[Any], *, process_trigger: str | None, divisibility: int,
                 batch_size: int, seed: int, frame_rule: tuple[int, int] | None = None,
                 warn: Callable[[str], None] = log.warning, ignore_captions: bool = False, takes_control: bool = False):
        self.dataset_cfgs, self.seed = list(dataset_cfgs), seed
        self.items = build_items(self.dataset_cfgs, process_trigger=process_trigger, divisibility=divisibility,
                                 frame_rule=frame_rule, warn=warn, ignore_captions=ignore_captions,
                                 takes_control=takes_control)
        self.batches = BucketBatches(self.items, batch_size, seed)
        self.latent_cache = self.text_cache = None

    def attach_latent_cache(self, encode: Callable[[torch.Tensor], torch.Tensor], fingerprint: str, *,
                            device: torch.device | str, dtype: torch.dtype, progress: bool = True,
                            rank: int = 0, world: int = 1, exchange: Exchange | None = None) -> LatentCache | None:
        """Encode every item once if any dataset asks for latent caching (all items are cached then, since
        batches mix datasets); to disk if any dataset asks for that. Returns the cache, or None. With several
        processes each encodes its share, then `exchange` waits for all and hands on what is held in memory."""
        if not any(c.cache_latents or c.cache_latents_to_disk for c in self.dataset_cfgs):
            return None
        self.latent_cache = LatentCache(encode, fingerprint, to_disk=any(c.cache_latents_to_disk
                                                                         for c in self.dataset_cfgs))
        self.latent_cache.prepare(self.items, device, dtype, progress=progress, rank=rank, world=world)
        _exchange(self.latent_cache._store, exchange)
        return self.latent_cache

    def attach_text_cache(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], fingerprint: str, *,
                          progress: bool = True, rank: int = 0, world: int = 1,
                          exchange: Exchange | None = None) -> TextCache | None:
        """Encode every caption once if any dataset sets cache_text_embeddings (shared out as latents are).
        Returns the cache, or None."""
        if not any(c.cache_text_embeddings for c in self.dataset_cfgs):
            return None
        self.text_cache = TextCache(encode, fingerprint)
        self.text_cache.prepare(self.items, progress=progress, rank=rank, world=world)
        _exchange(self.text_cache._store, exchange)
        return self.text_cache

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def next_batch(self, rank: int = 0, world: int = 1) -> Batch:
        """The next batch of this process: of the next `world` batches of the epoch plan (in order, into the next
        epoch at its end), the rank-th; every process keeps the same (epoch, position), so the state resumes on
        any number of processes."""
        for r in range(world):
            drawn = self.batches.next_batch()
            if r == rank:
                items, where = drawn, f"{self.seed}/{self.batches.epoch}/{self.batches.position}"
        batch = load_batch(items, rng=random.Random(f"{where}/sample"), latent_cache=self.latent_cache,
                           text_cache=self.text_cache)
        batch.noise_seed = random.Random(f"{where}/noise").getrandbits(63)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)
