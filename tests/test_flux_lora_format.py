"""The saved Flux LoRA uses the key layout ComfyUI's Flux loader maps completely: `transformer.` +
diffusers module name, `.lora_A.weight` / `.lora_B.weight` / `.alpha`. The accepted module names below
are the diffusers-side names of ComfyUI's Flux key map (comfy/utils.py `flux_to_diffusers`)."""
from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from eridiffusion import cli

from .conftest import train_config

COMFY_DOUBLE = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
COMFY_SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
COMFY_OTHER = {"proj_out", "x_embedder", "context_embedder", "norm_out.linear",
               *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "text_embedder", "guidance_embedder")
                 for i in (1, 2))}


def comfy_maps(module: str) -> bool:
    if m := re.fullmatch(r"transformer_blocks\.\d+\.(.+)", module):
        return m.group(1) in COMFY_DOUBLE
    if m := re.fullmatch(r"single_transformer_blocks\.\d+\.(.+)", module):
        return m.group(1) in COMFY_SINGLE
    return module in COMFY_OTHER


def train_file(tiny_flux, dataset, tmp_path, write_config, **network):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, network={"linear": 4, "linear_alpha": 2, **network})
    assert cli.main([str(write_config(cfg))]) == 0
    return load_file(tmp_path / "out" / "test_lora" / "test_lora.safetensors")


def modules(state):
    return {re.sub(r"\.(lora_A\.weight|lora_B\.weight|alpha)$", "", k) for k in state}


def test_every_key_is_one_comfyui_applies(tiny_flux, dataset, tmp_path, write_config):
    state = train_file(tiny_flux, dataset, tmp_path, write_config, transformer_only=False)
    names = modules(state)
    assert all(k.startswith("transformer.") for k in names)
    unmapped = [n for n in names if not comfy_maps(n[len("transformer."):])]
    assert not unmapped
    for n in names:  # each module is complete: down, up and a scalar alpha (ComfyUI scales by alpha / rank)
        a, b, alpha = state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"], state[f"{n}.alpha"]
        assert a.shape[0] == b.shape[1] == 4 and alpha.shape == () and alpha.item() == 2.0
    # all Linear layers were targeted: the blocks and the embedders / final layer
    assert any("x_embedder" in n for n in names) and any("single_transformer_blocks" in n for n in names)


def test_default_targets_are_the_transformer_blocks(tiny_flux, dataset, tmp_path, write_config):
    names = modules(train_file(tiny_flux, dataset, tmp_path, write_config))
    blocks = {n.split(".")[1] for n in names}
    assert blocks == {"transformer_blocks", "single_transformer_blocks"}
    suffixes = {n.split(".", 3)[3] for n in names}
    assert suffixes == COMFY_DOUBLE | COMFY_SINGLE


def test_only_and_ignore_if_contains(tiny_flux, dataset, tmp_path, write_config):
    names = modules(train_file(tiny_flux, dataset, tmp_path, write_config,
                               network_kwargs={"only_if_contains": ["attn."], "ignore_if_contains": ["to_v"]}))
    assert names and all("attn." in n and "to_v" not in n for n in names)


def test_save_dtype_and_metadata(tiny_flux, dataset, tmp_path, write_config):
    from safetensors import safe_open

    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, save={"dtype": "bf16"})
    assert cli.main([str(write_config(cfg))]) == 0
    with safe_open(tmp_path / "out" / "test_lora" / "test_lora.safetensors", "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert meta["ss_base_model_version"] == "flux.1" and meta["eri_arch"] == "flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["trigger_word"] == "shp3s" and meta["ss_sd_model_name"] == "tiny-flux" and meta["name"] == "test_lora"
    assert '"step": 2' in meta["training_info"]
