"""Architecture registry. Each architecture lives in one module of this package and is imported only
when a config asks for it, so adding a model is: write `archs/<name>.py`, add one line to ARCHS."""
from __future__ import annotations

import importlib

from .base import Architecture, LoraTargets, SampleRequest

# config `model.arch` (after alias/tag resolution) -> "module:Class"
ARCHS: dict[str, str] = {
    "flux": "eridiffusion.archs.flux:Flux",
    "sdxl": "eridiffusion.archs.sdxl:SDXL",
    "kolors": "eridiffusion.archs.kolors:Kolors",
}


def get_arch_class(name: str) -> type[Architecture]:
    if name not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise ValueError(f"model.arch '{name}' is not supported yet (supported: {known})")
    module, cls = ARCHS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ARCHS", "Architecture", "LoraTargets", "SampleRequest", "get_arch_class"]
