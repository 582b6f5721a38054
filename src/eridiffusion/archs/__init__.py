"""Architecture registry. Each architecture lives in its own package (`archs/<name>/`) and is imported only
when a config asks for it; adding a model is the checklist in archs/README.md and one line in ARCHS."""
from __future__ import annotations

import importlib

from .base import Architecture, LoraTargets, SampleRequest

# config `model.arch` (after alias/tag resolution) -> "module:Class"
ARCHS: dict[str, str] = {
    "flux": "eridiffusion.archs.flux:Flux",
    "sdxl": "eridiffusion.archs.sdxl:SDXL",
    "kolors": "eridiffusion.archs.kolors:Kolors",
    "sd3": "eridiffusion.archs.sd3:SD3",
    "chroma": "eridiffusion.archs.chroma:Chroma",
    "hidream": "eridiffusion.archs.hidream:HiDream",
    "wan21": "eridiffusion.archs.wan21:Wan21",
    "wan21_i2v": "eridiffusion.archs.wan21.i2v:Wan21I2V",
    "wan21_vace": "eridiffusion.archs.wan21.vace:Wan21VACE",
}


def get_arch_class(name: str) -> type[Architecture]:
    if name not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise ValueError(f"model.arch '{name}' is not supported yet (supported: {known})")
    module, cls = ARCHS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ARCHS", "Architecture", "LoraTargets", "SampleRequest", "get_arch_class"]
