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
from .cache import LatentCache, TextCache
from .captions import process_caption, read_caption
from .images import IMAGE_EXTS, ImageError, image_size, load_image

log = logging.getLogger(__name__)


class DataError(Exception):
    pass


@dataclass(frozen=True)
class Item:
    """One training example: an image at one resolution, possibly a flipped copy."""
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

    def processed_caption(self, rng: random.Random) -> str:
        return process_caption(self.caption, trigger=self.trigger, rng=rng, dropout_rate=self.caption_dropout_rate,
                               shuffle_tokens=self.shuffle_tokens, token_dropout_rate=self.token_dropout_rate,
                               keep_tokens=self.keep_tokens)

    def pixels(self, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
        """[3, H, W] in [-1, 1] fitted to the bucket, and the crop's top-left (y, x)."""
        img = load_image(self.path)
        if self.flip_x:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.flip_y:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        img, crop, _ = fit_to_bucket(img, *self.bucket, random_crop=self.random_crop, rng=rng)
        return to_tensor(img), crop


def scan_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden and `_`-prefixed (cache) folders skipped."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))  # a symlink back to an ancestor must not loop forever
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and os.path.realpath(Path(root, d)) not in seen]
        found += [Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return sorted(found)


def build_items(dataset_cfgs: Sequence[Any], *, process_trigger: str | None, divisibility: int,
                warn: Callable[[str], None] = log.warning) -> list[Item]:
    items = []
    for index, cfg in enumerate(dataset_cfgs):
        folder = Path(cfg.folder_path).expanduser()
        if not folder.is_dir():
            raise DataError(f"dataset folder {folder} does not exist")
        paths, sizes, skipped = scan_images(folder), {}, []
        for path in paths:
            try:
                sizes[path] = image_size(path, verify=True)
            except ImageError as e:
                warn(f"skipping unreadable image {e}")
                skipped.append(path.name)
        if skipped:
            warn(f"skipped {len(skipped)} of {len(paths)} images in {folder}: {', '.join(skipped)}")
        if not sizes:
            raise DataError(f"dataset folder {folder} has no usable image ({', '.join(IMAGE_EXTS)})")
        captions = {path: read_caption(path, cfg.caption_ext, cfg.default_caption) for path in sizes}
        if uncaptioned := sum(not c for c in captions.values()):
            warn(f"{uncaptioned} of {len(sizes)} images in {folder} have no caption "
                 f"(no {cfg.caption_ext} file, default file or default_caption)")
        settings = dict(dataset_index=index, trigger=cfg.trigger_word or process_trigger,
                        caption_dropout_rate=cfg.caption_dropout_rate, shuffle_tokens=cfg.shuffle_tokens,
                        token_dropout_rate=cfg.token_dropout_rate, keep_tokens=cfg.keep_tokens,
                        random_crop=cfg.random_crop, scale=cfg.scale, loss_multiplier=cfg.loss_multiplier,
                        batch_size=cfg.batch_size)
        # ai-toolkit adds flipped copies: flip_x and flip_y together give 4 versions of every image
        flips = list(itertools.product((False, True) if cfg.flip_x else (False,),
                                       (False, True) if cfg.flip_y else (False,)))
        for resolution, (path, (w, h)), (flip_x, flip_y) in itertools.product(cfg.resolution, sizes.items(), flips):
            bucket = bucket_for(max(1, round(w * cfg.scale)), max(1, round(h * cfg.scale)), resolution, divisibility)
            item = Item(path=path, caption=captions[path], flip_x=flip_x, flip_y=flip_y, bucket=bucket,
                        original_size=(h, w), **settings)
            items += [item] * cfg.num_repeats
    return items


class BucketBatches:
    """A fixed plan of batches per epoch (one bucket and batch size per batch), reproducible from
    (seed, epoch), so (epoch, position) is the whole state needed to resume at the same batch."""

    def __init__(self, items: Sequence[Item], batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self.epoch, self.position = 0, 0
        self._plan = self._make_plan(0)

    def _make_plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}")  # str seeds hash the same in every process
        groups = defaultdict(list)
        for i, item in enumerate(self.items):
            groups[item.bucket, item.batch_size or self.batch_size].append(i)
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
    pixels: torch.Tensor | None  # [B, 3, H, W] in [-1, 1]; None when latents are cached
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


def load_batch(items: Sequence[Item], *, rng: random.Random, latent_cache: LatentCache | None = None,
               text_cache: TextCache | None = None) -> Batch:
    """Tensors for one batch. Cached latents replace pixels when every item has one; with a text cache
    the captions come as embeddings (the cached caption, or the dropout one)."""
    cached = [latent_cache.get(item) for item in items] if latent_cache is not None else [None]
    if all(entry is not None for entry in cached):
        pixels, latents = None, torch.stack([entry["latent"] for entry in cached])
        crops = [tuple(entry["crop_top_left"].tolist()) for entry in cached]
    else:
        loaded = [item.pixels(rng) for item in items]
        pixels, latents, crops = torch.stack([p for p, _ in loaded]), None, [c for _, c in loaded]
    if text_cache is not None:
        captions, embeds = zip(*(text_cache.get(item, rng) for item in items))
        captions, text = list(captions), {key: torch.stack([e[key] for e in embeds]) for key in embeds[0]}
    else:
        captions, text = [item.processed_caption(rng) for item in items], None
    return Batch(pixels=pixels, latents=latents, captions=captions, text=text,
                 original_sizes=[item.original_size for item in items], crop_top_lefts=crops,
                 target_sizes=[(item.bucket[1], item.bucket[0]) for item in items],
                 paths=[item.path for item in items],
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
                 batch_size: int, seed: int, warn: Callable[[str], None] = log.warning):
        self.dataset_cfgs, self.seed = list(dataset_cfgs), seed
        self.items = build_items(self.dataset_cfgs, process_trigger=process_trigger,
                                 divisibility=divisibility, warn=warn)
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
