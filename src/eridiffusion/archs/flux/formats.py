"""FLUX.1 single files in Black Forest Labs' layout (ComfyUI `diffusion_models/flux1-dev.safetensors`):
recognise them, infer the FluxTransformer2DModel config from tensor shapes, convert to and from the
diffusers layout, and load one into a FluxTransformer2DModel.

BFL -> diffusers is diffusers' own `convert_flux_transformer_checkpoint_to_diffusers`; diffusers ships no
inverse, so diffusers -> BFL is written here (the same correspondences as ComfyUI's `flux_to_diffusers`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from ...adapters.fused import LORA_PARTS, fuse_lora, split_lora
from ..blockwise import split_rows
from ..sources import SAFETENSORS_SUFFIXES, _require_weight_suffix, load_state_dict_file

CONFIG_DIR = Path(__file__).parent / "configs"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # the repeated blocks, in execution order
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI/ldm full checkpoints; bare diffusion-model files
# Present in every FLUX.1-architecture transformer (dev, schnell, Flex.1, Fill/Depth/Canny); Chroma lacks
# vector_in and FLUX.2 lacks per-block modulation, so neither passes
_BFL_REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                 "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
                 "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
                 "double_blocks.0.img_attn.norm.query_norm.scale")

# What other files look like: (description, substrings that must each occur in some key), first match wins
_LOOKS_LIKE = (
    ("a LoRA adapter, not a full model", (".lora_",)),
    ("a LoHa adapter, not a full model", (".hada_",)),
    ("a LoKr adapter, not a full model", (".lokr_",)),
    ("a FLUX.2 transformer", ("double_stream_modulation_img.",)),
    ("a diffusers-layout Chroma transformer (load its diffusers folder instead)",
     ("single_transformer_blocks.", "distilled_guidance_layer.")),
    ("a Chroma transformer", ("distilled_guidance_layer.",)),
    ("a diffusers-layout Flux transformer (load its diffusers folder instead)",
     ("single_transformer_blocks.", "attn.add_q_proj.", "time_text_embed.")),
    ("an SD3 / SD3.5 transformer", ("joint_blocks.",)),
    ("an SDXL checkpoint", ("input_blocks.", "label_emb.")),
    ("an SD1.x / SD2.x checkpoint", ("input_blocks.",)),
    ("a diffusers UNet", ("down_blocks.", "time_embedding.")),
    ("a T5 encoder", ("encoder.block.", ".SelfAttention.")),
    ("a CLIP text encoder", ("text_model.",)),
    ("a VAE", ("decoder.up",)),
)

# diffusers -> BFL module names, per block and at the top; each module's weight and bias move together
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_BLOCKS = (("transformer_blocks.", "double_blocks.", _DOUBLE, _DOUBLE_FUSED, _DOUBLE_NORMS),
           ("single_transformer_blocks.", "single_blocks.", _SINGLE, _SINGLE_FUSED, _SINGLE_NORMS))
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
_GUIDANCE = {"time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")  # per-block modulation Linears


@dataclass(frozen=True)
class BflLayout:
    """What tells one Flux-family transformer's BFL layout from another's; the blocks' tables are shared."""

    top: Mapping[str, str]  # diffusers -> BFL names of the top-level Linears every file has
    optional: Mapping[str, str]  # the same for those a file may lack (FLUX.1-schnell has no guidance embedder)
    modulation: bool  # per-block modulation Linears and the final layer's adaLN (Chroma has neither)
    top_norms: Mapping[str, str] = field(default_factory=dict)  # top-level RMSNorms: diffusers `.weight`, BFL `.scale`

    def blocks(self):
        if self.modulation:
            return _BLOCKS
        return tuple((src, dst, {a: b for a, b in renames.items() if a not in _MODULATION}, fused, norms)
                     for src, dst, renames, fused, norms in _BLOCKS)


FLUX = BflLayout(_TOP, _GUIDANCE, modulation=True)


def _transformer_part(state: Mapping) -> dict:
    """The transformer's entries with any ComfyUI/ldm prefix removed; an all-in-one checkpoint's VAE and
    text encoder entries (outside the prefix) are left out."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def is_bfl_flux(keys: Iterable[str]) -> bool:
    """Whether these state-dict keys are a FLUX.1 transformer in BFL's layout (prefixed or not)."""
    names = _transformer_part(dict.fromkeys(keys))
    return all(k in names for k in _BFL_REQUIRED)


def describe_checkpoint(keys: Iterable[str]) -> str:
    """What a state dict looks like, for an error that says why it is the wrong file: 'looks like ...'."""
    keys = list(keys)
    if is_bfl_flux(keys):
        return "looks like a FLUX.1 transformer in the Black Forest Labs layout"
    for what, markers in _LOOKS_LIKE:
        hits = [next((k for k in keys if m in k), None) for m in markers]
        if all(hits):
            return f"looks like {what} (e.g. key '{hits[0]}')"
    return f"does not look like any model this recognises (first keys: {', '.join(keys[:5]) or 'none'})"


@cache
def known_flux_configs() -> dict[str, dict]:
    """The released FLUX.1-architecture configs shipped in archs/configs/, by file stem (flux-dev, ...)."""
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
            for p in sorted(CONFIG_DIR.glob("flux-*.json"))}


def known_flux_variant(config: Mapping) -> str | None:
    """The name of the shipped config equal to `config` (flux-dev, flux-schnell, flux-flex1), if any."""
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
    return next((name for name, known in known_flux_configs().items() if known == ours), None)


def _rope_axes(head_dim: int) -> list[int]:
    # Not stored in the weights. FLUX.1 splits its 128 rotary dims 16/56/56 (index, height, width): each
    # spatial axis takes the largest even number <= 7/16 of head_dim and the index axis the rest, which
    # also gives build_tiny_flux's 4/6/6 for head_dim 16
    spatial = (7 * head_dim // 16) // 2 * 2
    return [head_dim - 2 * spatial, spatial, spatial]


def infer_flux_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """FluxTransformer2DModel's config from a BFL-layout state dict's shapes; a shipped config when one
    matches exactly (it also carries what shapes cannot tell, the rotary split)."""
    sd = _transformer_part(state_dict)
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"img_in width {hidden} is not a multiple of the attention head size {head_dim}")
    out_channels = sd["final_layer.linear.weight"].shape[0]  # patch_size 1: one output row per channel
    config = {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,  # Fill/Depth/Canny take more in
        "num_layers": len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")}),
        "num_single_layers": len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")}),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": _rope_axes(head_dim),
    }
    shape_only = {k: v for k, v in config.items() if k != "axes_dims_rope"}
    for known in known_flux_configs().values():
        if {k: known[k] for k in shape_only} == shape_only:
            return dict(known)
    return config


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping,
                     convert: Callable[[dict], dict] = convert_flux_transformer_checkpoint_to_diffusers) -> dict[str, torch.Tensor]:
    """BFL layout -> diffusers FluxTransformer2DModel keys (or those of another of the family, with its
    diffusers converter `convert`), through diffusers' single-file converter. Every key must convert; a
    leftover one is a ValueError naming it."""
    sd = _transformer_part(state_dict)  # a fresh dict: diffusers' converter pops from what it is given
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    widths = [hidden] * 3 + [4 * hidden]  # FluxSingleTransformerBlock's MLP is always 4x wide
    # diffusers splits single-block linear1 at FLUX.1's fixed widths (3072, 4x); split it at this model's
    # widths here and hand diffusers size-only meta placeholders, whose pieces are replaced below
    linear1 = {}
    for key in [k for k in sd if k.startswith("single_blocks.") and ".linear1." in k]:
        _, i, _, param = key.split(".")
        base = f"single_transformer_blocks.{i}."
        parts = sd[key].split(widths)
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
            linear1[f"{base}{name}.{param}"] = part.clone()  # own storage: safetensors will not save views
        sd[key] = torch.empty(7 * 3072, device="meta")
    out = convert(sd)
    if sd:
        raise ValueError(f"not a {'FLUX.1' if convert is convert_flux_transformer_checkpoint_to_diffusers else 'Flux-family'} "
                         f"transformer state dict: {len(sd)} keys did not convert, "
                         f"e.g. {sorted(sd)[:5]}")
    return out | linear1


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # diffusers' AdaLayerNormContinuous reads (scale, shift), BFL's LastLayer (shift, scale); diffusers'
    # own swap lives inside its converter, so it cannot be reused
    first, second = t.chunk(2)
    return torch.cat([second, first])


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor], layout: BflLayout = FLUX) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys (or those of another of the family `layout` describes) -> BFL
    layout (what ComfyUI and BFL's code load): q/k/v fused into qkv, single-block q/k/v/mlp into linear1.
    Written here because diffusers has no inverse."""
    sd, out = dict(state_dict), {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"not a diffusers Flux transformer state dict: '{name}' is missing")
        return sd.pop(name)

    def move(renames: Mapping[str, str], src: str = "", dst: str = "") -> None:
        for a, b in renames.items():
            for param in ("weight", "bias"):
                out[f"{dst}{b}.{param}"] = take(f"{src}{a}.{param}")

    for src_prefix, dst_prefix, renames, fused, norms in layout.blocks():
        for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith(src_prefix)}):
            src, dst = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            move(renames, src, dst)
            for b, parts in fused.items():
                for param in ("weight", "bias"):
                    out[f"{dst}{b}.{param}"] = torch.cat([take(f"{src}{a}.{param}") for a in parts])
            for a, b in norms.items():
                out[f"{dst}{b}.scale"] = take(f"{src}{a}.weight")
    move(layout.top)
    for a, b in layout.top_norms.items():
        out[f"{b}.scale"] = take(f"{a}.weight")
    move({a: b for a, b in layout.optional.items() if f"{a}.weight" in sd})
    if layout.modulation:
        for param in ("weight", "bias"):
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(take(f"norm_out.linear.{param}"))
    if sd:
        raise ValueError(f"not a diffusers Flux transformer state dict: {len(sd)} keys have no BFL name, "
                         f"e.g. {sorted(sd)[:5]}")
    return out


def bfl_chunks(reader, config: Mapping, layout: BflLayout = FLUX) -> Iterator[dict[str, torch.Tensor]]:
    """BFL-layout tensors -> diffusers-layout state-dict chunks: the top-level layers, then one block at a
    time (the inverse of diffusers_to_bfl's tables, so that a block is converted without the whole file).
    ComfyUI scaled-fp8 `<layer>.scale_weight` entries travel with their weights."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in reader.keys())), "")
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix) and not k.endswith(".scale_input")
            and k[len(prefix):] != "scaled_fp8"]
    read = lambda k: reader.read(prefix + k)

    def rename(table: Mapping[str, str], src: str, dst: str, bfl: set[str], out: dict) -> None:
        for a, b in table.items():  # diffusers a <- BFL b
            for param in ("weight", "bias", "scale_weight"):
                if f"{src}{b}.{param}" in bfl:
                    out[f"{dst}{a}.{param}"] = read(f"{src}{b}.{param}")

    top = {k for k in keys if not k.startswith(("double_blocks.", "single_blocks."))}
    out: dict[str, torch.Tensor] = {}
    rename({**layout.top, **layout.optional}, "", "", top, out)
    for a, b in layout.top_norms.items():
        out[f"{a}.weight"] = read(f"{b}.scale")
    if layout.modulation:
        for param in ("weight", "bias"):
            out[f"norm_out.linear.{param}"] = _swap_halves(read(f"final_layer.adaLN_modulation.1.{param}"))
        if "final_layer.adaLN_modulation.1.scale_weight" in top:
            out["norm_out.linear.scale_weight"] = read("final_layer.adaLN_modulation.1.scale_weight")
    yield out
    for dst_prefix, src_prefix, renames, fused, norms in layout.blocks():
        count = config["num_layers"] if dst_prefix.startswith("transformer") else config["num_single_layers"]
        for i in range(count):
            src, dst = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            bfl = {k for k in keys if k.startswith(src)}
            out = {}
            rename(renames, src, dst, bfl, out)
            for b, parts in fused.items():
                widths = [hidden] * 3 + ([4 * hidden] if len(parts) == 4 else [])  # single blocks' MLP is 4x wide
                for param in ("weight", "bias"):
                    for name, piece in zip(parts, split_rows(read(f"{src}{b}.{param}"), widths)):
                        out[f"{dst}{name}.{param}"] = piece
                if f"{src}{b}.scale_weight" in bfl:
                    scale = read(f"{src}{b}.scale_weight")
                    for name in parts:
                        out[f"{dst}{name}.scale_weight"] = scale
            for a, b in norms.items():
                out[f"{dst}{a}.weight"] = read(f"{src}{b}.scale")
            yield out


def open_bfl_file(path: str | Path):
    """(a reader of the file, its keys -> size-only tensors, and those of the transformer's own weights: any
    ComfyUI/ldm prefix removed, scaled-fp8 scales left out) for a single file in a BFL-style layout."""
    from ..blockwise import DictReader, SafetensorsReader

    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        reader = SafetensorsReader(_require_weight_suffix(path, "weights file"))
    else:
        reader = DictReader(load_state_dict_file(path))
    shapes = {k: reader.meta(k) for k in reader.keys()}
    sd = {k: v for k, v in _transformer_part(shapes).items() if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))}
    return reader, shapes, sd


def require_fit(path, sd: Mapping[str, torch.Tensor], model: torch.nn.Module, to_bfl, what: str) -> None:
    """The file's tensors `sd` are exactly those of `model` (on the meta device) in the file's own names, so that
    a truncated or extended file is reported as the user sees it; `what` names the model in the error."""
    expected = {k: v.shape for k, v in to_bfl(model.state_dict()).items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not fit the {what} their shapes describe: "
                         f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
                         f"{len(wrong)} of the wrong shape {wrong[:5]}")


def load_flux_single_file(path: str | Path, dtype: torch.dtype = torch.bfloat16, base=None) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel from one BFL-layout file (bf16/fp16/fp32, float8_e4m3fn/e5m2, or ComfyUI
    scaled fp8; prefixed or not), read block by block and finished by `base` (quantized, moved), with the
    config its shapes imply. float8 weights stay float8 when the base is stored in float8."""
    from ..blockwise import FrozenBase, materialize

    reader, shapes, sd = open_bfl_file(path)
    if not is_bfl_flux(sd):
        raise ValueError(f"{path} is not a FLUX.1 transformer in the Black Forest Labs layout: it "
                         f"{describe_checkpoint(list(shapes))}")
    config = infer_flux_config(sd)
    with torch.device("meta"):  # no random init of 12B weights that are replaced at once
        model = FluxTransformer2DModel.from_config(config)
    what = known_flux_variant(config) or f"{config['num_layers']} double + {config['num_single_layers']} single blocks"
    require_fit(path, sd, model, diffusers_to_bfl, f"Flux transformer ({what})")
    base = base or FrozenBase(torch.device("cpu"), dtype)
    return materialize(model, bfl_chunks(reader, config), base, BLOCK_LISTS, str(path))


# ---- LoRA files: diffusers names <-> BFL names (ComfyUI's `diffusion_model.` and kohya's `lora_unet_`) -----------
# A LoRA on q, k and v (and the single blocks' MLP) becomes one LoRA on the fused BFL weight (adapters/fused.py);
# LoHa/LoKr factors do not stack this way, so only LoRA (and DoRA) convert.


def _lora_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    from ...adapters.merge import adapter_modules

    modules = adapter_modules(dict(state))
    for name, parts in modules.items():
        if set(parts) - LORA_PARTS:
            raise ValueError(f"{name}.{sorted(set(parts) - LORA_PARTS)[0]}: only LoRA and DoRA files convert between "
                             "Flux layouts (LoHa/LoKr factors do not fuse into BFL's q/k/v weights)")
    return modules


def _bfl_name(name: str) -> tuple[str, int | None, tuple[str, ...]]:
    """A diffusers Flux module name -> (its BFL module, its part index in a fused weight or None, the parts)."""
    for src_prefix, dst_prefix, renames, fused, _ in _BLOCKS:
        if name.startswith(src_prefix):
            i, _, inner = name[len(src_prefix):].partition(".")
            if inner in renames:
                return f"{dst_prefix}{i}.{renames[inner]}", None, ()
            for target, parts in fused.items():
                if inner in parts:
                    return f"{dst_prefix}{i}.{target}", parts.index(inner), parts
    if name in _TOP or name in _GUIDANCE:
        return (_TOP | _GUIDANCE)[name], None, ()
    if name == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", None, ()
    raise ValueError(f"'{name}' is not a Flux transformer Linear that a LoRA file can name")


def lora_diffusers_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Peft-named LoRA tensors of the transformer (no `transformer.` prefix) -> BFL-named ones."""
    out, groups = {}, {}
    for name, m in _lora_modules(state).items():
        target, index, parts = _bfl_name(name)
        if index is None:
            swap = target == "final_layer.adaLN_modulation.1"  # its rows are (shift, scale), diffusers' (scale, shift)
            out.update({f"{target}.lora_A.weight": m["lora_A.weight"],
                        f"{target}.lora_B.weight": _swap_halves(m["lora_B.weight"]) if swap else m["lora_B.weight"]})
            for extra in ("alpha", "dora_scale"):
                if extra in m:
                    out[f"{target}.{extra}"] = _swap_halves(m[extra]) if swap and extra == "dora_scale" else m[extra]
        else:
            groups.setdefault(target, [None] * len(parts))[index] = m
    for target, members in groups.items():
        width = next(m["lora_B.weight"].shape[0] // (4 if i == 3 else 1) for i, m in enumerate(members) if m is not None)
        rows = [4 * width if i == 3 else width for i in range(len(members))]  # single blocks' MLP is 4x wide
        out.update({f"{target}.{k}": v for k, v in fuse_lora(members, rows, target).items()})
    return out


def lora_bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of lora_diffusers_to_bfl: fused LoRAs split by rows of B, sharing A; all-zero parts dropped."""
    inverse = {}
    for src_prefix, dst_prefix, renames, fused, _ in _BLOCKS:
        inverse[dst_prefix] = (src_prefix, {b: a for a, b in renames.items()}, fused)
    top = {b: a for a, b in (_TOP | _GUIDANCE).items()}
    out = {}
    for name, m in _lora_modules(state).items():
        block = next((p for p in inverse if name.startswith(p)), None)
        if block is None:
            if name == "final_layer.adaLN_modulation.1":
                parts = {"norm_out.linear": (m["lora_B.weight"], True)}
            elif name in top:
                parts = {top[name]: (m["lora_B.weight"], False)}
            else:
                raise ValueError(f"'{name}' is not a Flux (BFL layout) Linear that a LoRA file can name")
            for target, (up, swap) in parts.items():
                out.update({f"{target}.lora_A.weight": m["lora_A.weight"], f"{target}.lora_B.weight": _swap_halves(up) if swap else up})
                out.update({f"{target}.{k}": (_swap_halves(m[k]) if swap and k == "dora_scale" else m[k]) for k in ("alpha", "dora_scale") if k in m})
            continue
        src_prefix, renames, fused = inverse[block]
        i, _, inner = name[len(block):].partition(".")
        if inner in renames:
            target = f"{src_prefix}{i}.{renames[inner]}"
            out.update({f"{target}.{k}": v for k, v in m.items()})
            continue
        parts = fused[inner]
        width = m["lora_B.weight"].shape[0] // (7 if len(parts) == 4 else 3)
        rows = [4 * width if j == 3 else width for j in range(len(parts))]
        for part, piece in zip(parts, split_lora(m, rows, name)):
            if piece is not None:
                out.update({f"{src_prefix}{i}.{part}.{k}": v for k, v in piece.items()})
    return out
