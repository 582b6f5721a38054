"""Model source resolution: local folders/files, the local HF cache (never the network), safe loading."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eridiffusion.archs.sources import (
    ModelSource, find_tokenizer_files, hf_cache_dir, load_state_dict_file, resolve_model_source,
)

HF_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE")
UNREACHABLE = "http://127.0.0.1:9"  # discard port: a real request would fail with a connection error


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """Clean HF env, online mode (HF_HUB_OFFLINE unset) and an endpoint nothing listens on."""
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    return tmp_path / "hf-cache"


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly on any connection or DNS attempt made in this process."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def fake_cached_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


class Evil:
    """Unpickling this calls print("pwned"); harmless, and visible in captured output if it ever runs."""
    def __reduce__(self):
        return (print, ("pwned",))


# --- local paths -----------------------------------------------------------------------------------

def test_local_diffusers_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == ModelSource("diffusers_folder", tmp_path)


def test_folder_without_model_index_says_what_is_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_source(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "model_index.json") in msg and "is missing" in msg
    assert "needs model_index.json" in msg
    assert f"{tmp_path}/model.safetensors" in msg  # the single-file alternative, spelled out


@pytest.mark.parametrize("name", ["m.safetensors", "m.SFT", "m.ckpt", "m.pt", "m.pth", "m.bin"])
def test_local_single_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert resolve_model_source(str(tmp_path / name)) == ModelSource("single_file", tmp_path / name)


def test_unknown_suffix_is_refused(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.gguf'.*\.safetensors"):
        resolve_model_source(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize("text", ["/no/such/model", "./no-such-model", "~/no-such-model-xyz", "single-word"])
def test_missing_path_that_is_not_a_repo_id(text, hf_env):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        resolve_model_source(text, key="model.vae_path")
    assert str(err.value).startswith("model.vae_path:")
    assert text.lstrip("./~") in str(err.value)


# --- the local HF cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"])
def test_repo_id_resolves_from_local_cache(env, hf_env, monkeypatch, no_network):
    monkeypatch.setenv(env, str(hf_env.parent / "hf-home") if env == "HF_HOME" else str(hf_env))
    cache = hf_env.parent / "hf-home" / "hub" if env == "HF_HOME" else hf_env
    assert hf_cache_dir() == cache
    snapshot = fake_cached_repo(cache, "owner/name", {"model_index.json": b"{}", "unet/config.json": b"{}"})
    source = resolve_model_source("owner/name")
    assert source.kind == "hf_cache" and source.path.resolve() == snapshot.resolve()
    assert (source.path / "model_index.json").is_file()
    assert not no_network


def test_repo_file_resolves_from_local_cache(hf_env, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env))
    snapshot = fake_cached_repo(hf_env, "owner/name", {"sub/model.safetensors": b"x"})
    source = resolve_model_source("owner/name/sub/model.safetensors")
    assert source.kind == "hf_cache" and source.path.resolve() == (snapshot / "sub/model.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match="file other.safetensors"):
        resolve_model_source("owner/name/other.safetensors")
    assert not no_network


def test_cached_repo_without_model_index_suggests_a_file(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env))
    fake_cached_repo(hf_env, "owner/name", {"weights.safetensors": b"x"})
    with pytest.raises(FileNotFoundError, match=r"model_index.json is missing.*e\.g\. owner/name/weights\.safetensors"):
        resolve_model_source("owner/name")


def test_uncached_repo_id_names_the_cache_and_never_downloads(hf_env, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_source("owner/not-cached")
    assert time.perf_counter() - start < 2
    msg = str(err.value)
    assert "not in the local cache" in msg and str(hf_env / "models--owner--not-cached") in msg
    assert "never downloads" in msg and "huggingface-cli download owner/not-cached" in msg
    assert not no_network


def test_uncached_repo_id_in_a_fresh_process_with_unreachable_endpoint(tmp_path):
    """huggingface_hub reads HF_* at import, so prove it in a fresh interpreter: online mode, an endpoint
    nothing listens on, and an audit hook that records every socket connect / DNS lookup."""
    code = textwrap.dedent("""
        import sys, time
        events = []
        sys.addaudithook(lambda e, a: events.append(e) if e in ("socket.connect", "socket.getaddrinfo") else None)
        from eridiffusion.archs.sources import resolve_model_source
        start = time.perf_counter()
        try:
            resolve_model_source("owner/not-cached")
        except FileNotFoundError as e:
            print("ERR", e)
        print("ELAPSED", time.perf_counter() - start)
        print("NET", events)
    """)
    env = {k: v for k, v in os.environ.items() if k not in HF_ENV}
    env.update(HF_ENDPOINT=UNREACHABLE, HF_HUB_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("ERR", "ELAPSED", "NET")))
    assert "not in the local cache" in lines["ERR"] and str(tmp_path / "cache") in lines["ERR"]
    assert float(lines["ELAPSED"]) < 2
    assert lines["NET"] == "[]"


# --- loading weights -------------------------------------------------------------------------------

def test_safetensors_float8_cast(tmp_path):
    values = torch.tensor([0.5, -2.0, 1.0])
    save_file({"w8": values.to(torch.float8_e4m3fn), "w5": values.to(torch.float8_e5m2),
               "ids": torch.arange(3)}, tmp_path / "m.sft")
    raw = load_state_dict_file(tmp_path / "m.sft")
    assert raw["w8"].dtype == torch.float8_e4m3fn and raw["w5"].dtype == torch.float8_e5m2
    state = load_state_dict_file(tmp_path / "m.sft", dtype=torch.bfloat16)
    assert state["w8"].dtype == state["w5"].dtype == torch.bfloat16
    assert torch.equal(state["w8"].float(), values) and torch.equal(state["w5"].float(), values)
    assert state["ids"].dtype == torch.int64  # only floating tensors are cast


def test_safe_ckpt_with_state_dict_wrapper_loads(tmp_path):
    weights = {"model.diffusion_model.w": torch.randn(2, 3), "model.diffusion_model.b": torch.zeros(3)}
    torch.save({"state_dict": weights, "global_step": 1000, "epoch": 3}, tmp_path / "m.ckpt")
    state = load_state_dict_file(tmp_path / "m.ckpt", dtype=torch.float16)
    assert state.keys() == weights.keys()
    assert torch.equal(state["model.diffusion_model.w"], weights["model.diffusion_model.w"].half())


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "step": 5}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"not a flat state dict.*'step'"):
        load_state_dict_file(tmp_path / "m.pt")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, capsys, writer):
    path = tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="contains pickled code.*refused for safety.*\\.safetensors"):
        load_state_dict_file(path)
    assert "pwned" not in capsys.readouterr().out


def test_load_unknown_suffix(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_state_dict_file(tmp_path / "m.npz")


# --- tokenizer files -------------------------------------------------------------------------------

CLIP_OR_FAST = [["vocab.json", "merges.txt"], ["tokenizer.json"]]


def test_tokenizer_files_any_complete_set(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({}))
    assert find_tokenizer_files(tmp_path, CLIP_OR_FAST) == tmp_path
    (tmp_path / "spiece.model").write_bytes(b"")
    assert find_tokenizer_files(tmp_path, ["spiece.model"]) == tmp_path
    assert find_tokenizer_files(tmp_path, ["spiece.model", "tokenizer.json"]) == tmp_path  # one set: both


def test_tokenizer_files_error_lists_missing_per_set(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        find_tokenizer_files(tmp_path, CLIP_OR_FAST)
    assert str(err.value) == (f"tokenizer folder {tmp_path} is incomplete; it needs vocab.json + merges.txt "
                              f"(missing merges.txt); or tokenizer.json (missing tokenizer.json)")
    with pytest.raises(FileNotFoundError, match=r"needs spiece.model \(missing spiece.model\); or tokenizer.json"):
        find_tokenizer_files(tmp_path, ["spiece.model", ["tokenizer.json"]])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_tokenizer_files(tmp_path / "nope", CLIP_OR_FAST)
