"""Aspect-ratio buckets: pick a bucket per image, fit the image into it, turn it into a tensor."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


def bucket_for(width: int, height: int, resolution: int, divisibility: int) -> tuple[int, int]:
    """(bucket_w, bucket_h): sides multiples of `divisibility` (at least one step), area within
    min(w*h, resolution**2) so an image is never upscaled (except to reach `divisibility`).
    Candidates: each side of the ideal size rounded down or up, and the largest fit for each; the one
    closest in aspect wins, then the larger. So it never does worse than flooring both sides
    (ai-toolkit), in area or in aspect."""
    d = divisibility
    budget = min(width * height, resolution * resolution)
    s = math.sqrt(budget / (width * height))
    ws, hs = [{max(d, math.floor(x * s / d) * d), max(d, math.ceil(x * s / d) * d)} for x in (width, height)]
    limit = max(budget, d * d)
    candidates = {(w, h) for w in ws for h in hs}
    candidates |= {(w, max(d, limit // w // d * d)) for w in ws}
    candidates |= {(max(d, limit // h // d * d), h) for h in hs}
    aspect = math.log(width / height)
    fits = [(w, h) for w, h in candidates if w * h <= limit and w <= max(width, d) and h <= max(height, d)]
    return min(fits, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def fit_to_bucket(img: Image.Image, bucket_w: int, bucket_h: int, *, random_crop: bool, rng: random.Random,
                  crop: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize (LANCZOS) to cover the bucket, then crop the centre (or a random window, or at `crop` (y, x):
    every frame of a clip is cut at its first frame's window).
    Returns (image, crop_top_left (y, x), size after resize (h, w))."""
    scale = max(bucket_w / img.width, bucket_h / img.height)
    w, h = max(bucket_w, round(img.width * scale)), max(bucket_h, round(img.height * scale))
    if (w, h) != img.size:
        img = img.resize((w, h), Image.LANCZOS)
    if crop is not None:
        y, x = crop
    elif random_crop:
        y, x = rng.randint(0, h - bucket_h), rng.randint(0, w - bucket_w)
    else:
        y, x = (h - bucket_h) // 2, (w - bucket_w) // 2
    return img.crop((x, y, x + bucket_w, y + bucket_h)), (y, x), (h, w)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1
