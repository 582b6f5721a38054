"""Previews during training, through the architecture's diffusers pipeline and the live weights: images, and clips
for video architectures (.mp4 through PyAV, or animated .webp where PyAV is not installed)."""
from __future__ import annotations

import importlib.util
import io
import time
from pathlib import Path

from .archs.base import SampleRequest
from .train.checkpoint import atomic_write


class Previewer:
    """Encodes the sample prompts once (before text encoders may be freed), then renders on demand."""

    def __init__(self, sample_cfg, arch, run_dir: Path, trigger: str | None):
        self.cfg, self.arch = sample_cfg, arch
        self.folder = run_dir / "samples"
        div = arch.bucket_divisibility
        self.requests = []
        for i, item in enumerate(sample_cfg.samples):  # the config has filled every field from the section
            if item.num_frames > 1 and not hasattr(arch, "frame_rule"):
                raise ValueError(f"sample.samples[{i}].num_frames {item.num_frames}: {type(arch).__name__} makes images; "
                                 "set num_frames: 1 (or remove it)")
            if item.ctrl_img and not getattr(arch, "takes_ctrl_img", False):
                raise ValueError(f"sample.samples[{i}].ctrl_img: {type(arch).__name__} samples take no image; remove it")
            self.requests.append((
                SampleRequest(
                    text=arch.encode_prompts([item.prompt.replace("[trigger]", trigger or "")]),
                    neg_text=arch.encode_prompts([item.neg]) if item.neg else None,
                    width=max(div, item.width // div * div), height=max(div, item.height // div * div),
                    steps=item.sample_steps, guidance_scale=item.guidance_scale, seed=item.seed,
                    num_frames=item.num_frames, ctrl_img=item.ctrl_img),
                item.network_multiplier, item.fps))

    def render(self, step: int, scaled) -> list[Path]:
        """`scaled(multiplier)` is a context manager that sets the LoRA strength for one image."""
        paths = []
        for i, (request, multiplier, fps) in enumerate(self.requests):
            with scaled(multiplier):
                out = self.arch.generate(request)
            stem = self.folder / f"{int(time.time() * 1000)}__{step:09d}_{i}"
            path, data = encode_clip(out, fps, stem) if isinstance(out, list) else encode_image(out, self.cfg.format, stem)
            atomic_write(path, lambda tmp: tmp.write_bytes(data))
            paths.append(path)
        return paths


def encode_image(image, fmt: str, stem: Path) -> tuple[Path, bytes]:
    fmt = fmt.lower()
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return stem.with_suffix(f".{fmt}"), buf.getvalue()


def encode_clip(frames: list, fps: int, stem: Path) -> tuple[Path, bytes]:
    """A clip's frames (PIL images) as H.264 .mp4 through PyAV, else as an animated .webp (lossless) through PIL."""
    buf = io.BytesIO()
    if importlib.util.find_spec("av") is None:
        frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                       lossless=True)
        return stem.with_suffix(".webp"), buf.getvalue()
    import av

    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size  # sides are multiples of 16: even, as yuv420p needs
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
        container.mux(stream.encode())
    return stem.with_suffix(".mp4"), buf.getvalue()
