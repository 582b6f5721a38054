"""Files of a run: LoRA files named as ai-toolkit names them, whole-state checkpoints for resume,
all written atomically (temporary file, fsync, rename) so a crash never leaves a half-written file."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

STATE_DIR = "state"


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` then fsync and rename over `path`; the old file stays intact until then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partial_files(run_dir: Path) -> None:
    """Temporary files of saves that a crash interrupted (they never replaced a complete file)."""
    for folder in (run_dir, run_dir / STATE_DIR):
        for f in folder.glob(".*.tmp*") if folder.is_dir() else []:
            f.unlink(missing_ok=True)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_state(run_dir: Path, step: int, state: dict) -> Path:
    path = run_dir / STATE_DIR / f"{step:09d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def latest_state(run_dir: Path) -> Path | None:
    """Newest complete whole-state checkpoint (temporary files never match)."""
    files = sorted((run_dir / STATE_DIR).glob("[0-9]" * 9 + ".pt"))
    return files[-1] if files else None


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def step_file(run_dir: Path, name: str, step: int) -> Path:
    return run_dir / f"{name}_{step:09d}.safetensors"


def diffusers_copy(path: Path) -> Path:
    """Where `save.diffusers_lora` writes the diffusers-layout twin of a LoRA file."""
    return path.with_suffix(".diffusers.safetensors")


def prune(run_dir: Path, name: str, keep: int) -> None:
    """Keep the newest `keep` step files and states; called only after a new save is complete."""
    pattern = re.compile(re.escape(name) + r"_(\d{9})\.safetensors")
    steps = sorted(int(m.group(1)) for f in run_dir.iterdir() if (m := pattern.fullmatch(f.name)))
    for step in steps[:-keep] if keep > 0 else []:
        step_file(run_dir, name, step).unlink(missing_ok=True)
        diffusers_copy(step_file(run_dir, name, step)).unlink(missing_ok=True)
    states = sorted((run_dir / STATE_DIR).glob("[0-9]" * 9 + ".pt"))
    for f in states[:-keep] if keep > 0 else []:
        f.unlink(missing_ok=True)
