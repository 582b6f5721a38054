"""Latent and text-embedding caches, filled through callables the model side provides."""
from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .captions import process_caption

if TYPE_CHECKING:
    from .dataset import Item

Tensors = dict[str, torch.Tensor]


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class _Store:
    """Tensor dicts by file path: safetensors files written atomically, or a dict in memory."""

    def __init__(self, to_disk: bool):
        self.to_disk, self._memory = to_disk, {}

    def has(self, path: Path) -> bool:
        return path.exists() if self.to_disk else path in self._memory

    def get(self, path: Path) -> Tensors | None:
        if not self.to_disk:
            return self._memory.get(path)
        return load_file(path) if path.exists() else None

    def put(self, path: Path, tensors: Tensors) -> Tensors:
        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        if self.to_disk:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a killed run never leaves half a file
            save_file(tensors, tmp)
            os.replace(tmp, path)
        else:
            self._memory[path] = tensors
        return tensors

    def memory(self) -> dict[Path, Tensors]:
        return self._memory

    def absorb(self, entries: dict[Path, Tensors]) -> None:
        """Entries other processes made (an in-memory cache filled in shares)."""
        self._memory.update(entries)


def share(todo: dict, rank: int, world: int) -> dict:
    """This process's part of the work, when several fill one cache: every world-th entry in path order, so
    no two processes write one file. `todo` must be the same on every process (every entry, cached or not: what
    another process has already written may differ by the time each looks), else an entry can fall to none."""
    keys = sorted(todo, key=str)[rank::world]
    return {k: todo[k] for k in keys}


def latent_entry(encoded: torch.Tensor | Tensors) -> Tensors:
    """encode_images' output for one item (batch of 1) as cache entries: a tensor as "latent", the parts of a dict
    (an architecture's conditioning computed from the same pixels) as "latent.<name>"."""
    if isinstance(encoded, torch.Tensor):
        return {"latent": encoded[0]}
    return {f"latent.{name}": v[0] for name, v in encoded.items()}


def stack_latents(entries: list[Tensors]) -> torch.Tensor | Tensors:
    """Cache entries of one batch -> what encode_images returns for it (a tensor, or a dict of the same names)."""
    if "latent" in entries[0]:
        return torch.stack([e["latent"] for e in entries])
    names = [k for k in entries[0] if k.startswith("latent.")]
    return {k[len("latent."):]: torch.stack([e[k] for e in entries]) for k in names}


class LatentCache:
    """Latents per item: `<image dir>/_latent_cache/<stem>_<key>.safetensors` (or memory), where the key
    covers the image or clip file (name, size, mtime), bucket, crop mode, flips, scale, the frame selection
    (count, spacing, start range: num_frames, fps, shrink_video_to_frames, auto_frame_count), the control file
    (its path, size, mtime) and the VAE fingerprint. A random crop and a random start frame are drawn once per cached
    item (seeded by its key); an item's control, cut the same way, is encoded with it (`encode(pixels, control)`)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], fingerprint: str, to_disk: bool):
        self.encode, self.fingerprint, self._store = encode, fingerprint, _Store(to_disk)

    def path(self, item: Item) -> Path:
        stat = item.path.stat()
        parts = (item.path.name, stat.st_size, stat.st_mtime_ns, item.bucket, item.random_crop,
                 item.flip_x, item.flip_y, item.scale, self.fingerprint)
        if item.control is not None:
            control = item.control.stat()
            parts += (str(item.control), control.st_size, control.st_mtime_ns)
        key = _short_hash(*parts, item.frames) if item.frames is not None else _short_hash(*parts)
        return item.path.parent / "_latent_cache" / f"{item.path.stem}_{key}.safetensors"

    def get(self, item: Item) -> Tensors | None:
        """{"latent": encode_images' output for the item (or its parts, see latent_entry), "crop_top_left": [2] (y, x), and for a video
        architecture "frame_start": [] (the first frame's index)}, or None if not cached."""
        return self._store.get(self.path(item))

    @torch.no_grad()
    def prepare(self, items: Iterable[Item], device: torch.device | str, dtype: torch.dtype,
                progress: bool = True, rank: int = 0, world: int = 1) -> int:
        """Encode every item not cached yet (this process's share of them); returns how many were encoded."""
        mine = share({self.path(item): item for item in items}, rank, world)
        todo = {path: item for path, item in mine.items() if not self._store.has(path)}
        for path, item in tqdm(todo.items(), desc="caching latents", disable=not progress):
            pixels, crop, start = item.pixels(random.Random(path.name))
            inputs = [pixels] if item.control is None else [pixels, item.control_pixels(crop, start)]
            encoded = self.encode(*(t[None].to(device, dtype) for t in inputs))
            entry = {**latent_entry(encoded), "crop_top_left": torch.tensor(crop)}
            if item.frames is not None:
                entry["frame_start"] = torch.tensor(start)
            self._store.put(path, entry)
        return len(todo)


class TextCache:
    """Text-encoder outputs per item, `<image dir>/_t_e_cache/<stem>_<hash(caption, fingerprint)>.safetensors`.
    Cached embeddings cannot be shuffled or token-dropped, so an item stores its caption without those
    (trigger applied), plus a 'dropout' embedding (the trigger alone, or '') swapped in with probability
    caption_dropout_rate. `encode` must give every caption the same shapes (pad to a fixed length) so
    that items stack into a batch."""

    def __init__(self, encode: Callable[[list[str]], Tensors], fingerprint: str, to_disk: bool = True):
        self.encode, self.fingerprint, self._store = encode, fingerprint, _Store(to_disk)

    def _entry(self, item: Item, dropped: bool) -> tuple[str, Path]:
        caption = process_caption("" if dropped else item.caption, trigger=item.trigger)
        stem = "_dropout" if dropped else item.path.stem  # the file's content depends only on the hash
        return caption, item.path.parent / "_t_e_cache" / f"{stem}_{_short_hash(caption, self.fingerprint)}.safetensors"

    @torch.no_grad()
    def _encode_into(self, caption: str, paths: Iterable[Path]) -> Tensors:
        embeds = {k: v[0] for k, v in self.encode([caption]).items()}
        for path in paths:
            stored = self._store.put(path, embeds)
        return stored

    def prepare(self, items: Iterable[Item], progress: bool = True, rank: int = 0, world: int = 1) -> int:
        """Encode every caption (and dropout caption) not cached yet (this process's share of them); returns how
        many captions were encoded."""
        entries = defaultdict(set)
        for item in items:
            for dropped in (False, True) if item.caption_dropout_rate > 0 else (False,):
                caption, path = self._entry(item, dropped)
                entries[caption].add(path)
        todo = {caption: missing for caption, paths in share(entries, rank, world).items()
                if (missing := {p for p in paths if not self._store.has(p)})}
        for caption, paths in tqdm(todo.items(), desc="caching text embeddings", disable=not progress):
            self._encode_into(caption, paths)
        return len(todo)

    def get(self, item: Item, rng: random.Random) -> tuple[str, Tensors]:
        """(caption, embeddings without batch dim) for one step; encodes on a miss."""
        dropped = item.caption_dropout_rate > 0 and rng.random() < item.caption_dropout_rate
        caption, path = self._entry(item, dropped)
        embeds = self._store.get(path)
        return caption, embeds if embeds is not None else self._encode_into(caption, [path])
