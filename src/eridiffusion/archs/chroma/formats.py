"""Chroma single files as lodestones ships them (`chroma-unlocked-v50.safetensors`, `Chroma1-HD.safetensors`): FLUX.1's
Black Forest Labs layout without the per-block modulation Linears (`img_mod`, `txt_mod`, `modulation`), the
`vector_in`/`time_in`/`guidance_in` embedders and the final adaLN, plus `distilled_guidance_layer.*`, the one network
that computes every block's modulation. The block tables, block-by-block loading and LoRA layouts are Flux's
(archs/flux/formats.py); BFL -> diffusers is also diffusers' own `convert_chroma_transformer_checkpoint_to_diffusers`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

from ..flux import formats as flux
from ..flux.formats import BLOCK_LISTS, BflLayout, open_bfl_file, require_fit

_REQUIRED = ("img_in.weight", "txt_in.weight", "final_layer.linear.weight", "distilled_guidance_layer.in_proj.weight",
             "distilled_guidance_layer.out_proj.weight", "double_blocks.0.img_attn.qkv.weight",
             "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.linear1.weight")
_APPROXIMATOR = "distilled_guidance_layer."


def layout(approximator_layers: int) -> BflLayout:
    """Chroma's BFL names beside Flux's block tables: the embedders, the final Linear and the approximator's
    `layers.N.in_layer/out_layer` (diffusers `linear_1/linear_2`) and `norms.N.scale` (diffusers `.weight`)."""
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           f"{_APPROXIMATOR}in_proj": f"{_APPROXIMATOR}in_proj", f"{_APPROXIMATOR}out_proj": f"{_APPROXIMATOR}out_proj"}
    for i in range(approximator_layers):
        top[f"{_APPROXIMATOR}layers.{i}.linear_1"] = f"{_APPROXIMATOR}layers.{i}.in_layer"
        top[f"{_APPROXIMATOR}layers.{i}.linear_2"] = f"{_APPROXIMATOR}layers.{i}.out_layer"
    norms = {f"{_APPROXIMATOR}norms.{i}": f"{_APPROXIMATOR}norms.{i}" for i in range(approximator_layers)}
    return BflLayout(top, {}, modulation=False, top_norms=norms)


def _approximator_layers(keys: Iterable[str]) -> int:
    # the same prefix in both layouts: distilled_guidance_layer.layers.N.
    return len({k.split(".")[2] for k in keys if k.startswith(f"{_APPROXIMATOR}layers.")})


def is_bfl_chroma(keys: Iterable[str]) -> bool:
    """Whether these state-dict keys are a Chroma transformer in the BFL-style layout (prefixed or not)."""
    names = flux._transformer_part(dict.fromkeys(keys))
    return all(k in names for k in _REQUIRED) and not any(".img_mod." in k for k in names)


def infer_chroma_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """ChromaTransformer2DModel's config from a BFL-layout state dict's shapes: block counts, widths and the
    approximator's size; the rotary split, which no shape tells, as FLUX.1's (16/56/56 at head size 128)."""
    sd = flux._transformer_part(state_dict)
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"img_in width {hidden} is not a multiple of the attention head size {head_dim}")
    out_channels = sd["final_layer.linear.weight"].shape[0]  # patch_size 1: one output row per channel
    approximator_hidden, approximator_in = sd[f"{_APPROXIMATOR}in_proj.weight"].shape
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")}),
        "num_single_layers": len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")}),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "axes_dims_rope": flux._rope_axes(head_dim),
        "approximator_num_channels": approximator_in,
        "approximator_hidden_dim": approximator_hidden,
        "approximator_layers": _approximator_layers(sd),
    }


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ChromaTransformer2DModel keys -> the BFL-style layout lodestones' files, ComfyUI and diffusers'
    single-file loader read. diffusers ships only the other direction."""
    return flux.diffusers_to_bfl(state_dict, layout(_approximator_layers(state_dict)))


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """BFL-style layout -> diffusers keys through diffusers' own converter (at this model's widths)."""
    return flux.bfl_to_diffusers(state_dict, config, convert=convert_chroma_transformer_checkpoint_to_diffusers)


def computed_buffers(model: ChromaTransformer2DModel) -> dict[str, torch.Tensor]:
    """What no file stores: `time_text_embed.mod_proj`, a fixed sinusoidal table, computed as diffusers' __init__
    does (its shape, read off the meta-device model, gives its sizes)."""
    from diffusers.models.transformers.transformer_chroma import ChromaCombinedTimestepTextProjEmbeddings

    rows, width = model.time_text_embed.mod_proj.shape
    return {"time_text_embed.mod_proj": ChromaCombinedTimestepTextProjEmbeddings(num_channels=width // 2, out_dim=rows).mod_proj}


def load_chroma_single_file(path: str | Path, dtype: torch.dtype = torch.bfloat16, base=None) -> ChromaTransformer2DModel:
    """A ChromaTransformer2DModel from one BFL-style file (bf16/fp16/fp32, float8, ComfyUI scaled fp8; prefixed or
    not) with the config its shapes imply, read block by block and finished by `base` (quantized, moved)."""
    from ..blockwise import FrozenBase, materialize

    reader, shapes, sd = open_bfl_file(path)
    if not is_bfl_chroma(sd):
        raise ValueError(f"{path} is not a Chroma transformer in the Black Forest Labs layout: it "
                         f"{flux.describe_checkpoint(list(shapes))}")
    config = infer_chroma_config(sd)
    with torch.device("meta"):  # no random init of 9B weights that are replaced at once
        model = ChromaTransformer2DModel.from_config(config)
    require_fit(path, sd, model, diffusers_to_bfl,
                f"Chroma transformer ({config['num_layers']} double + {config['num_single_layers']} single blocks)")
    chunks = flux.bfl_chunks(reader, config, layout(config["approximator_layers"]))
    base = base or FrozenBase(torch.device("cpu"), dtype)
    return materialize(model, chain(chunks, [computed_buffers(model)]), base, BLOCK_LISTS, str(path))


# ---- ai-toolkit's names for the released files ----------------------------------------------------------------
UNLOCKED = re.compile(r"chroma-unlocked-v(\d+)\.safetensors")


def file_in_cached_repo(name: str) -> Path | None:
    """ai-toolkit's `lodestones/Chroma` (that repo's newest chroma-unlocked-vNN.safetensors) and
    `lodestones/Chroma/vNN` (that version), read from the local HF cache. None for anything else (a local path, a
    diffusers repo such as lodestones/Chroma1-HD, a file path inside a repo), which the usual resolution handles."""
    from ..sources import resolve_folder

    parts = name.split("/")
    version = parts[2] if len(parts) == 3 and re.fullmatch(r"v\d+", parts[2]) else None
    if Path(name).expanduser().exists() or not (len(parts) == 2 or version):
        return None
    try:
        folder = resolve_folder("/".join(parts[:2]), key="model.name_or_path")
    except (FileNotFoundError, ValueError):
        if version:  # only this form names a version: say that the repo is missing
            raise
        return None
    if (folder / "model_index.json").is_file():
        return None
    versions = {int(m.group(1)): folder / m.group(0) for f in folder.iterdir() if (m := UNLOCKED.fullmatch(f.name))}
    if not versions:
        return None
    if version is None:
        return versions[max(versions)]
    if int(version[1:]) not in versions:
        raise FileNotFoundError(f"model.name_or_path: '{name}': {folder} has no chroma-unlocked-{version}.safetensors "
                                f"(cached versions: {', '.join(f'v{v}' for v in sorted(versions))})")
    return versions[int(version[1:])]
