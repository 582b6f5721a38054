"""Video clips: probing (size, frame count, rate), choosing frames per ai-toolkit's dataset keys, decoding them.

Container formats (.mp4, .webm, .mov, .mkv, ...) are decoded with PyAV (FFmpeg, shipped in its wheel). Animated
.gif and .webp go through PIL: the FFmpeg in PyAV's wheel cannot decode animated WebP, and PIL composites GIF
frames (disposal, palettes) and gives exact frame counts and per-frame durations for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from .images import _READ_ERRORS, flatten_to_rgb

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".wmv", ".flv", ".gif")  # ai-toolkit's + GIF
_PIL_ANIMATED = (".gif", ".webp")
_DECODE_ERRORS = (av.error.FFmpegError, *_READ_ERRORS, EOFError)


class ClipError(Exception):
    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ClipInfo:
    width: int  # as displayed (rotation applied)
    height: int
    frames: int
    fps: float


def _rotated(img: Image.Image, rotation: int) -> Image.Image:
    """Apply a display matrix's rotation (degrees counter-clockwise, as PyAV reports it), as players do."""
    return img.rotate(rotation, expand=True) if rotation % 360 else img


def probe_clip(path: str | Path) -> ClipInfo:
    """Size, frame count and frame rate. Every packet is demuxed (not decoded) to count the frames that are
    really there, and the first frame is decoded, so a truncated or undecodable file fails here, at scan time."""
    path = Path(path)
    try:
        if path.suffix.lower() in _PIL_ANIMATED:
            with Image.open(path) as img:
                durations = []
                for i in range(getattr(img, "n_frames", 1)):
                    img.seek(i)
                    img.load()
                    durations.append(img.info.get("duration") or 0)
                total_ms = sum(durations)
                # GIFs without delays play at ~10 fps in browsers
                fps = len(durations) * 1000 / total_ms if total_ms > 0 else 10.0
                return ClipInfo(img.width, img.height, len(durations), fps)
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(path, "no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise ClipError(path, "no decodable frame")
            w, h = (first.height, first.width) if first.rotation % 180 else (first.width, first.height)
            container.seek(0)
            count = sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate
            return ClipInfo(w, h, count, float(rate) if rate else 24.0)
    except _DECODE_ERRORS as e:
        raise ClipError(path, str(e) or type(e).__name__) from e


def is_animated(path: str | Path) -> bool:
    """A still format (.webp) that holds several frames; False for a file PIL cannot open (reported elsewhere)."""
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    except _READ_ERRORS:
        return False


def read_frames(path: str | Path, indices: list[int], background: tuple[int, int, int] = (255, 255, 255)
                ) -> list[Image.Image]:
    """The frames at `indices` (any order, repeats allowed) as RGB images (GIF/WebP transparency flattened onto
    `background`), decoded in one pass up to the last."""
    path, wanted = Path(path), sorted(set(indices))
    found: dict[int, Image.Image] = {}
    try:
        if path.suffix.lower() in _PIL_ANIMATED:
            with Image.open(path) as img:
                for i in wanted:
                    img.seek(i)  # PIL composites GIF frames in order, so each seek builds on the last
                    found[i] = flatten_to_rgb(img.copy(), background)
        else:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        found[i] = _rotated(frame.to_image(), frame.rotation)
                    if i >= wanted[-1]:
                        break
    except _DECODE_ERRORS as e:
        raise ClipError(path, str(e) or type(e).__name__) from e
    if missing := [i for i in wanted if i not in found]:
        raise ClipError(path, f"frame {missing[0]} could not be decoded ({len(found)} of {len(wanted)} read)")
    return [found[i] for i in indices]


def frame_count_for(wanted: int, rule: tuple[int, int]) -> int:
    """The largest count <= `wanted` of the form step*k + first that the architecture's VAE takes (0 if none)."""
    step, first = rule
    return (wanted - first) // step * step + first if wanted >= first else 0


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames a clip trains on: start + round(i * step) for i < count, start in [0, max_start]."""
    count: int
    step: float
    max_start: int

    def indices(self, start: int) -> list[int]:
        return [start + round(i * self.step) for i in range(self.count)]


def select_frames(info: ClipInfo, *, num_frames: int, shrink: bool, fps: float, auto: bool, trim_tail: bool,
                  rule: tuple[int, int]) -> FrameSelection:
    """ai-toolkit's frame choice, in counts the architecture accepts, never repeating a source frame:
    - shrink_video_to_frames: num_frames spread evenly over the whole clip (motion may speed up);
    - otherwise frames at the dataset `fps` (every source_fps/fps-th frame, at least every frame) from a random
      start, so motion keeps its real speed;
    - auto_frame_count: as many frames as the clip lasts at `fps`, from the start (trim_auto_frame_count_tail:
      real-time spacing, the tail cut; else spread over the whole clip).
    A clip shorter than that gives the largest accepted count it holds (a smaller frame bucket), where ai-toolkit
    would repeat frames to stretch it. count 0 or 1 means the clip is too short to be a video."""
    step = max(1.0, info.fps / fps)
    at_fps = math.floor((info.frames - 1) / step) + 1  # frames the clip holds at the dataset fps
    if auto:
        count = frame_count_for(at_fps, rule)
        if trim_tail:
            return FrameSelection(count, step, 0)
        shrink = True
    else:
        count = frame_count_for(min(num_frames, info.frames if shrink else at_fps), rule)
    if shrink:
        return FrameSelection(count, (info.frames - 1) / (count - 1) if count > 1 else 1.0, 0)
    return FrameSelection(count, step, info.frames - 1 - round((count - 1) * step))
