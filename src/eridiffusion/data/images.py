"""Reading training images: any common mode in, 8-bit RGB out, unreadable files reported by path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageError(Exception):
    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def load_image(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image as 8-bit RGB, EXIF orientation applied, transparency flattened onto `background` (white)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except _READ_ERRORS as e:
        raise ImageError(path, str(e) or type(e).__name__) from e
    return flatten_to_rgb(img, background)


def flatten_to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB: 16/32-bit integer modes scaled down, transparency flattened onto `background` (white)."""
    if img.mode.startswith("I"):  # 16/32-bit integer (16-bit PNG): scale down rather than clip at 255
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def image_size(path: str | Path, *, verify: bool = False) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header. `verify` also checks that the file is
    complete, cheaply (PNG chunk CRCs, JPEG decoded at 1/8 scale), so a truncated file fails at scan
    time rather than hours into training."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            # the base-class getexif reads header metadata only; PNG's own would decode the whole image
            if Image.Image.getexif(img).get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # the four that turn by 90°
                w, h = h, w
            if verify and img.format == "PNG":
                img.verify()
            elif verify:
                img.draft(None, (1, 1))  # a no-op outside JPEG
                img.load()
    except _READ_ERRORS as e:
        raise ImageError(path, str(e) or type(e).__name__) from e
    return w, h
