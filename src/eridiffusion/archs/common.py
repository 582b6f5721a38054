"""Small helpers that several architecture modules share (local diffusers folders, fingerprints)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def require_diffusers_folder(path: str, subfolders: list[str]) -> Path:
    """Check a local diffusers folder has what we will load, naming the first missing file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model.name_or_path: '{root}' does not exist (EriDiffusion loads local files only, nothing is downloaded)")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: '{root}' is not a diffusers folder: {root / 'model_index.json'} is missing")
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"model.name_or_path: missing component folder {folder}")
        if sub.startswith("tokenizer"):
            continue
        config = next((folder / n for n in ("config.json", "scheduler_config.json") if (folder / n).is_file()), None)
        if config is None:
            raise FileNotFoundError(f"model.name_or_path: missing {folder / 'config.json'}")
        if sub != "scheduler" and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise FileNotFoundError(f"model.name_or_path: no weights (*.safetensors) in {folder}")
    return root


def folder_fingerprint(*folders: Path, extra: str = "") -> str:
    """Identity of model components for cache keys: their configs plus weight file sizes and mtimes."""
    h = hashlib.sha256(extra.encode())
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.suffix == ".json":
                h.update(f.read_bytes())
            elif f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
