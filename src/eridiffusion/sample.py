"""Preview images during training, through the architecture's diffusers pipeline and the live weights."""
from __future__ import annotations

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
        for item in sample_cfg.samples:  # the config has filled every field from the section (and walked the seed)
            self.requests.append((
                SampleRequest(
                    text=arch.encode_prompts([item.prompt.replace("[trigger]", trigger or "")]),
                    neg_text=arch.encode_prompts([item.neg]) if item.neg else None,
                    width=max(div, item.width // div * div), height=max(div, item.height // div * div),
                    steps=item.sample_steps, guidance_scale=item.guidance_scale, seed=item.seed),
                item.network_multiplier))

    def render(self, step: int, scaled) -> list[Path]:
        """`scaled(multiplier)` is a context manager that sets the LoRA strength for one image."""
        paths = []
        for i, (request, multiplier) in enumerate(self.requests):
            with scaled(multiplier):
                image = self.arch.generate(request)
            fmt = self.cfg.format.lower()
            path = self.folder / f"{int(time.time() * 1000)}__{step:09d}_{i}.{fmt}"
            buf = io.BytesIO()
            image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
            atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))
            paths.append(path)
        return paths
