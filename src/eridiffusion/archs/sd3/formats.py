"""SD3 / SD3.5 single files in Stability AI's layout, as ComfyUI users keep them (`sd3.5_large.safetensors`,
`sd3.5_medium.safetensors`), to and from diffusers' components, and the SD3 LoRA layouts.

    model.diffusion_model.*                 the MMDiT (`joint_blocks.N.x_block` / `.context_block`, fused qkv)
    first_stage_model.*                     the VAE (LDM layout; SAI's files carry it)
    text_encoders.clip_l.transformer.*      CLIP-L, CLIP-G and T5-XXL in transformers' own layout (optional: most
    text_encoders.clip_g.transformer.*      files leave them out; ComfyUI then loads clip_l / clip_g / t5xxl files)
    text_encoders.t5xxl.transformer.*

The MMDiT tables below are diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (and ComfyUI's
`mmdit_to_diffusers`) written as data, so that a file converts one block at a time and back; the tests check them
against diffusers' converter. The VAE goes through the SDXL module's LDM converters (the same LDM VAE layout).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from ...adapters.fused import fuse_lora, require_lora, split_lora
from ..blockwise import split_rows
from ..sources import SAFETENSORS_SUFFIXES, _require_weight_suffix, load_state_dict_file

PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text encoder component -> its prefix inside an all-in-one file
TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}
BLOCK_LISTS = ("transformer_blocks",)
BLOCKS = "joint_blocks."

# diffusers -> SAI module names inside a block (weight and bias move together)
_BLOCK = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
          "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
          "attn2.to_out.0": "x_block.attn2.proj",
          "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
          "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# SAI's AdaLayerNormContinuous rows are (shift, scale), diffusers' (scale, shift): the final norm and the last
# block's context norm (the block whose text stream ends there)
_SWAPPED_TOP = "norm_out.linear"
_SWAPPED_LAST = "norm1_context.linear"
_REQUIRED = ("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight", "t_embedder.mlp.0.weight",
             "final_layer.linear.weight", "pos_embed", "joint_blocks.0.x_block.attn.qkv.weight",
             "joint_blocks.0.context_block.attn.qkv.weight")
IGNORED = ("scaled_fp8",)  # ComfyUI's scaled-fp8 marker


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


# ---- recognising a file and reading its config --------------------------------------------------
def transformer_part(state: Mapping) -> dict:
    """The MMDiT's entries without `model.diffusion_model.` (a bare MMDiT file is taken as it is)."""
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith((VAE_PREFIX, "text_encoders."))}


def is_sai_sd3(keys: Iterable[str]) -> bool:
    names = transformer_part(dict.fromkeys(keys))
    return all(k in names for k in _REQUIRED)


def require_sai_sd3(keys: Iterable[str], path) -> None:
    keys = list(keys)
    if not is_sai_sd3(keys):
        raise ValueError(f"{path} is not an SD3 / SD3.5 MMDiT in Stability AI's layout "
                         f"(model.diffusion_model.joint_blocks...): it {describe(keys)}")


def describe(keys: Iterable[str]) -> str:
    """Why a file is not an SD3 MMDiT in SAI's layout: what it looks like instead."""
    keys = list(keys)
    if any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in keys) and not any(
            k.startswith("single_transformer_blocks.") for k in keys):
        return ("looks like a diffusers-layout SD3 transformer (transformer/diffusion_pytorch_model.safetensors): point "
                "model.name_or_path at its diffusers folder instead")
    from ..flux.formats import describe_checkpoint  # knows the other common checkpoint layouts

    return describe_checkpoint(keys)


def infer_sd3_config(state: Mapping[str, torch.Tensor]) -> dict:
    """SD3Transformer2DModel's config from a SAI-layout state dict's shapes (values may be size-only stand-ins):
    depth, width, dual-attention blocks (3.5 Medium's attn2) and QK norm (3.5) are all read from the tensors.
    Heads are 64 wide, as in every SD3 release, unless the QK-norm weights say otherwise; sample_size (the
    pipeline's default resolution, which no weight holds) is the releases' 128."""
    sd = transformer_part(state)
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith(BLOCKS)})
    ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q.shape[0] if ln_q is not None else 64
    if hidden % head_dim:
        raise ValueError(f"x_embedder width {hidden} is not a multiple of the attention head size {head_dim}")
    positions = sd["pos_embed"].shape[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"pos_embed holds {positions} positions, not a square grid")
    return {
        "sample_size": 128, "patch_size": patch, "in_channels": in_channels, "num_layers": len(blocks),
        "attention_head_dim": head_dim, "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["context_embedder.weight"].shape[1],
        "caption_projection_dim": sd["context_embedder.weight"].shape[0],
        "pooled_projection_dim": sd["y_embedder.mlp.0.weight"].shape[1],
        "out_channels": sd["final_layer.linear.weight"].shape[0] // (patch * patch),
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
        "qk_norm": None if ln_q is None else "layer_norm" if "joint_blocks.0.x_block.attn.ln_q.bias" in sd else "rms_norm",
    }


# ---- diffusers <-> SAI state dicts ---------------------------------------------------------------
def sai_module(name: str, num_layers: int) -> tuple[str, int | None, int, bool]:
    """A diffusers module name -> (its SAI module, its part in a fused qkv or None, the number of parts, whether
    its rows are swapped (shift, scale))."""
    if name.startswith("transformer_blocks."):
        i, _, inner = name[len("transformer_blocks."):].partition(".")
        dst = f"{BLOCKS}{i}."
        if inner in _BLOCK:
            return dst + _BLOCK[inner], None, 1, inner == _SWAPPED_LAST and int(i) == num_layers - 1
        if inner in _NORMS:
            return dst + _NORMS[inner], None, 1, False
        for target, parts in _FUSED.items():
            if inner in parts:
                return dst + target, parts.index(inner), len(parts), False
    elif name in _TOP:
        return _TOP[name], None, 1, name == _SWAPPED_TOP
    raise ValueError(f"'{name}' is not an SD3 transformer module with an MMDiT name")


def diffusers_to_sai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> SAI MMDiT keys (no prefix): q/k/v fused into qkv, the two
    shift/scale norms swapped back. Written here because diffusers ships no inverse."""
    num_layers = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    out, fused = {}, {}
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        target, index, count, swap = sai_module(module, num_layers)
        if index is None:
            out[f"{target}.{param}"] = swap_halves(value) if swap else value
        else:
            fused.setdefault(f"{target}.{param}", [None] * count)[index] = value
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"{key}: q, k and v are not all in the state dict")
        out[key] = torch.cat(parts)
    return out


def sai_to_diffusers(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SAI MMDiT keys (no prefix; the whole model or any of its blocks) -> diffusers keys. ComfyUI scaled-fp8
    `<layer>.scale_weight` entries travel with their weights (a fused one's scale to each of its parts)."""
    inverse = {}
    for a, b in {**_BLOCK, **_NORMS}.items():
        inverse[b] = (a, None)
    for b, parts in _FUSED.items():
        inverse[b] = (None, parts)
    top = {b: a for a, b in _TOP.items()}
    out = {}
    for key, value in state.items():
        if key in IGNORED or key.endswith(".scale_input"):
            continue
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        if module.startswith(BLOCKS):
            i, _, inner = module[len(BLOCKS):].partition(".")
            if inner not in inverse:
                raise ValueError(f"'{key}' is not an SD3 MMDiT weight")
            name, parts = inverse[inner]
            src = f"transformer_blocks.{i}."
            if parts is None:
                swap = name == _SWAPPED_LAST and int(i) == num_layers - 1 and param != "scale_weight"
                out[f"{src}{name}.{param}"] = swap_halves(value) if swap else value
            elif param == "scale_weight":
                out.update({f"{src}{p}.{param}": value for p in parts})
            else:
                out.update({f"{src}{p}.{param}": piece for p, piece in zip(parts, split_rows(value, [value.shape[0] // 3] * 3))})
        elif module in top:
            swap = top[module] == _SWAPPED_TOP and param != "scale_weight"
            out[f"{top[module]}.{param}"] = swap_halves(value) if swap else value
        else:
            raise ValueError(f"'{key}' is not an SD3 MMDiT weight")
    return out


def _sai_chunks(reader, prefix: str, num_layers: int) -> Iterator[dict[str, torch.Tensor]]:
    """diffusers-layout chunks of a SAI file: the top-level layers, then one joint block at a time."""
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]
    units: dict[str, list[str]] = {}
    for k in keys:
        units.setdefault(".".join(k.split(".")[:2]) if k.startswith(BLOCKS) else "", []).append(k)
    for unit in sorted(units, key=lambda u: -1 if not u else int(u.split(".")[1])):
        yield sai_to_diffusers({k: reader.read(prefix + k) for k in units[unit]}, num_layers)


def open_file(path: str | Path):
    """A reader over a weights file: safetensors read one tensor at a time, pickles whole (weights only)."""
    from ..blockwise import DictReader, SafetensorsReader

    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return SafetensorsReader(_require_weight_suffix(path, "weights file"))
    return DictReader(load_state_dict_file(path))


def file_prefix(keys: Iterable[str]) -> str:
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else ""


def load_sd3_single_file(reader, path, dtype: torch.dtype = torch.bfloat16, base=None) -> SD3Transformer2DModel:
    """The SD3Transformer2DModel of a SAI-layout file (bf16/fp16/fp32, float8, ComfyUI scaled fp8; prefixed or
    not, with or without VAE and text encoders beside it), read block by block and finished by `base`."""
    from ..blockwise import FrozenBase, materialize

    shapes = {k: reader.meta(k) for k in reader.keys()}
    require_sai_sd3(shapes, path)
    sd = {k: v for k, v in transformer_part(shapes).items() if k not in IGNORED and not k.endswith((".scale_weight", ".scale_input"))}
    config = infer_sd3_config(sd)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    # compared in the file's own names, so that a truncated or extended file is reported as the user sees it
    expected = {k: v.shape for k, v in diffusers_to_sai(model.state_dict()).items()}
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not fit the SD3 MMDiT their shapes describe ({config['num_layers']} blocks): "
                         f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
                         f"{len(wrong)} of the wrong shape {wrong[:5]}")
    base = base or FrozenBase(torch.device("cpu"), dtype)
    return materialize(model, _sai_chunks(reader, file_prefix(shapes), config["num_layers"]), base, BLOCK_LISTS, str(path))


def read_part(reader, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` of a file, without it (cast to `dtype` when floating)."""
    out = {}
    for key in [k for k in reader.keys() if k.startswith(prefix)]:
        t = reader.read(key)
        out[key[len(prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def vae_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """`first_stage_model.*` (LDM) tensors -> diffusers AutoencoderKL keys (diffusers' converter)."""
    from ..sdxl.formats import sgm_to_diffusers

    return sgm_to_diffusers(dict(state), {"vae": dict(config)})["vae"]


def vae_to_sai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ..sdxl.formats import diffusers_to_sgm

    return diffusers_to_sgm({"vae": state})


def diffusers_to_sai_file(transformer: Mapping[str, torch.Tensor], vae: Mapping | None = None,
                          text_encoders: Mapping[str, Mapping] | None = None) -> dict[str, torch.Tensor]:
    """One all-in-one file in SAI's layout: the MMDiT, the VAE if given, and text encoders (`text_encoder`,
    `text_encoder_2`, `text_encoder_3`, transformers' state dicts) if given. T5's tied input embedding is
    written once, as `shared.weight`."""
    out = {PREFIX + k: v for k, v in diffusers_to_sai(transformer).items()}
    if vae is not None:
        out.update(vae_to_sai(vae))
    for name, state in (text_encoders or {}).items():
        out.update({TEXT_PREFIXES[name] + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"})
    return out


# ---- LoRA files: diffusers names <-> SAI names (`diffusion_model.` / kohya `lora_unet_`) -----------------
# A LoRA on q, k and v becomes one LoRA on the fused qkv (adapters/fused.py): exact both ways. LoHa/LoKr factors do
# not stack, so only LoRA and DoRA convert.
def lora_diffusers_to_sai(modules: Mapping[str, Mapping[str, torch.Tensor]], num_layers: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per diffusers module, its LoRA tensors by role -> per SAI module. `num_layers` says which block is the last."""
    out, groups = {}, {}
    for name, m in modules.items():
        target, index, count, swap = sai_module(name, num_layers)
        if index is None:
            out[target] = {k: swap_halves(v) if swap and k in ("lora_B.weight", "dora_scale") else v for k, v in m.items()}
        else:
            require_lora(m, target)
            groups.setdefault(target, [None] * count)[index] = m
    for target, members in groups.items():
        width = next(m["lora_B.weight"].shape[0] for m in members if m is not None)
        out[target] = fuse_lora(members, [width] * len(members), target)
    return out


def lora_sai_to_diffusers(modules: Mapping[str, Mapping[str, torch.Tensor]], num_layers: int) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of lora_diffusers_to_sai: fused LoRAs split by rows of B, sharing A; parts it leaves at zero dropped."""
    inverse = {b: a for a, b in {**_BLOCK, **_TOP}.items()}
    out = {}
    for name, m in modules.items():
        if name.startswith(BLOCKS):
            i, _, inner = name[len(BLOCKS):].partition(".")
            if inner in _FUSED:
                rows = m["lora_B.weight"].shape[0] // 3
                for part, piece in zip(_FUSED[inner], split_lora(m, [rows] * 3)):
                    if piece is not None:
                        out[f"transformer_blocks.{i}.{part}"] = piece
                continue
            if inner not in inverse:
                raise ValueError(f"'{name}' is not an SD3 MMDiT Linear that a LoRA file can name")
            target = f"transformer_blocks.{i}.{inverse[inner]}"
        elif name in inverse:
            target = inverse[name]
        else:
            raise ValueError(f"'{name}' is not an SD3 MMDiT Linear that a LoRA file can name")
        _, _, _, swap = sai_module(target, num_layers)
        out[target] = {k: swap_halves(v) if swap and k in ("lora_B.weight", "dora_scale") else v for k, v in m.items()}
    return out
