"""Captions: reading them next to the image, and ai-toolkit's per-step processing (dropout, shuffle, trigger)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)
_PLACEHOLDERS = ("[trigger]", "[name]")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as Latin-1", path)
        return data.decode("latin-1").strip()


def read_caption(image_path: str | Path, caption_ext: str, default_caption: str | None) -> str:
    """`<stem><caption_ext>`; else the folder's `default<ext>` / `default.txt`; else `default_caption`; else ''.
    An empty file counts as missing, as in ai-toolkit."""
    image_path = Path(image_path)
    for candidate in (image_path.with_suffix(caption_ext),
                      image_path.with_name(f"default{caption_ext}"), image_path.with_name("default.txt")):
        if candidate.is_file() and (text := _read_text(candidate)):
            return text
    return (default_caption or "").strip()


def inject_trigger(caption: str, trigger: str | None) -> str:
    """Replace `[trigger]`/`[name]` by the trigger (or remove them); prepend the trigger when it is absent."""
    for placeholder in _PLACEHOLDERS:
        caption = caption.replace(placeholder, trigger or "")
    if trigger and trigger not in caption:
        caption = f"{trigger} {caption}"
    return caption.strip()


def process_caption(caption: str, *, trigger: str | None, rng: random.Random | None = None,
                    dropout_rate: float = 0.0, shuffle_tokens: bool = False,
                    token_dropout_rate: float = 0.0, keep_tokens: int = 0) -> str:
    """ai-toolkit's order: caption dropout -> comma tokens -> token dropout and shuffle (the first
    `keep_tokens` stay put) -> join -> trigger. A dropped caption becomes the trigger alone, or ''.
    `rng` is only needed when one of the random options is on."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return inject_trigger("", trigger)
    tokens = [t for t in (s.strip() for s in caption.split(",")) if t]
    kept, rest = tokens[:keep_tokens], tokens[keep_tokens:]
    if token_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= token_dropout_rate]
    if shuffle_tokens:
        rng.shuffle(rest)
    return inject_trigger(", ".join(kept + rest), trigger)
