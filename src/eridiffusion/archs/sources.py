"""What `model.name_or_path` (or a component path) points at: a local diffusers folder, a single
weights file, or a repo already in the local Hugging Face cache. Nothing is ever downloaded.

Architecture-agnostic: an architecture module resolves its source here, then loads it its own way.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # loaded with torch.load(weights_only=True) only
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

SourceKind = Literal["diffusers_folder", "single_file", "hf_cache"]


@dataclass(frozen=True)
class ModelSource:
    """`path` is a diffusers folder, or a weights file; for "hf_cache" it lies inside the local HF cache
    (a snapshot folder with model_index.json, or one file of a snapshot; check `is_file()`)."""
    kind: SourceKind
    path: Path


def resolve_model_source(name_or_path: str, *, key: str = "model.name_or_path") -> ModelSource:
    """Classify a local folder / local file / cached HF repo id, with an error saying what to fix.
    `key` names the config entry in error messages."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelSource("diffusers_folder", _require_model_index(path, key))
    if path.is_file():
        return ModelSource("single_file", _require_weight_suffix(path, key))
    repo_id, filename = _split_repo_id(name_or_path)
    if repo_id is None:
        raise FileNotFoundError(f"{key}: '{path}' does not exist (and is not a Hugging Face repo id 'owner/name')")
    return _resolve_from_hf_cache(name_or_path, repo_id, filename, key)


def resolve_folder(name_or_path: str, *, key: str) -> Path:
    """A local folder of any layout (a transformers model with its tokenizer, e.g. a Llama), or the snapshot
    folder of a repo id already in the local HF cache. Nothing is downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{key}: '{path}' is a file; it must be a folder (config.json, weights and tokenizer files)")
    repo_id, filename = _split_repo_id(name_or_path)
    if repo_id is None or filename is not None:
        raise FileNotFoundError(f"{key}: '{path}' does not exist (and is not a Hugging Face repo id 'owner/name')")
    return _resolve_from_hf_cache(name_or_path, repo_id, None, key, need_index=False).path


def hf_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (huggingface_hub reads it once at import)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def load_state_dict_file(path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file to CPU tensors; floating tensors (float8 included) are cast to `dtype` if given.
    Pickle formats go through `torch.load(weights_only=True)`, so a file that would run code is refused."""
    path = Path(path)
    suffix = _require_weight_suffix(path, "weights file").suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            wants = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise ValueError(
                f"{path}: the file contains pickled code (it needs more than plain tensors to load"
                f"{f', e.g. {wants.group(1)}' if wants else ''}) and was refused for safety. Convert it to "
                f".safetensors with a tool you trust, then point at that file.") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning-style .ckpt: weights sit beside global_step/epoch
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a mapping of names to tensors, found {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: not a flat state dict; entries that are not tensors: {not_tensors[:5]}")
    if dtype is not None:
        # float8 has almost no CPU kernels, so it must be widened before anything computes with it
        for k in list(state):  # one tensor at a time, so a 12 GB fp8 file never exists twice as bf16
            if state[k].is_floating_point():
                state[k] = state[k].to(dtype)
    return state


def find_tokenizer_files(folder: str | Path, needed: Sequence[str] | Sequence[Sequence[str]]) -> Path:
    """Check `folder` holds one complete set of tokenizer files. `needed` is one set (["vocab.json",
    "merges.txt"]) or alternative sets ([["vocab.json", "merges.txt"], ["tokenizer.json"]])."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    sets = [list(needed)] if all(isinstance(n, str) for n in needed) else [[n] if isinstance(n, str) else list(n) for n in needed]
    missing = [[name for name in files if not (folder / name).is_file()] for files in sets]
    if any(not m for m in missing):
        return folder
    options = "; or ".join(f"{' + '.join(files)} (missing {', '.join(m)})" for files, m in zip(sets, missing))
    raise FileNotFoundError(f"tokenizer folder {folder} is incomplete; it needs {options}")


def _require_model_index(folder: Path, key: str, name_as: str | None = None) -> Path:
    """`name_as` is how the user names this folder (a repo id for a cache snapshot), for the hint."""
    if (folder / "model_index.json").is_file():
        return folder
    weights = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
    hint = f", e.g. {name_as or folder}/{weights[0]}" if weights else ""
    raise FileNotFoundError(
        f"{key}: '{name_as or folder}' is not a diffusers folder: {folder / 'model_index.json'} is missing. "
        f"A folder of component subfolders needs model_index.json; for a single checkpoint, point {key} "
        f"at the weights file itself{hint}")


def _require_weight_suffix(path: Path, key: str) -> Path:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"{key}: '{path}' has an unsupported suffix '{path.suffix}' "
                         f"(expected one of {', '.join(WEIGHT_SUFFIXES)}, or a diffusers folder)")
    return path


def _split_repo_id(text: str) -> tuple[str | None, str | None]:
    """'owner/name' -> (repo_id, None); 'owner/name/sub/file.safetensors' -> (repo_id, 'sub/file.safetensors');
    anything that cannot be a repo id (absolute/relative/home paths, backslashes) -> (None, None)."""
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return None, None
    parts = text.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None, None
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None, None
    if len(parts) == 2:
        return repo_id, None
    filename = "/".join(parts[2:])
    return (repo_id, filename) if Path(filename).suffix.lower() in WEIGHT_SUFFIXES else (None, None)


def _resolve_from_hf_cache(text: str, repo_id: str, filename: str | None, key: str, need_index: bool = True) -> ModelSource:
    cache = hf_cache_dir()
    # local_files_only everywhere: these calls read the cache folder and never open a connection
    if filename is None:
        try:
            found: str | None = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
        except LocalEntryNotFoundError:
            found = None
    else:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
        found = hit if isinstance(hit, str) else None  # not-found markers are not paths
    if found is None:
        raise FileNotFoundError(
            f"{key}: '{text}' is not a local path, and Hugging Face repo '{repo_id}'"
            f"{f' (file {filename})' if filename else ''} is not in the local cache "
            f"(looked in {cache / ('models--' + repo_id.replace('/', '--'))}; cache dir from HF_HUB_CACHE / HF_HOME). "
            f"EriDiffusion never downloads: run `huggingface-cli download {repo_id}"
            f"{f' {filename}' if filename else ''}` yourself, or point {key} at a local folder or file")
    path = Path(found)
    if filename is None and need_index:
        _require_model_index(path, key, name_as=repo_id)
    return ModelSource("hf_cache", path)
