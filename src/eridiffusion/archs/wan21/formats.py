"""Wan 2.1 files in the original Wan repository's layout, as ComfyUI keeps them
(`diffusion_models/wan2.1_t2v_14B_bf16.safetensors`, `..._fp8_e4m3fn.safetensors`, ComfyUI's scaled fp8), to and
from diffusers' WanTransformer3DModel, and the LoRA layouts.

The two layouts differ in names only: one table of renames (`_BLOCK`, `_TOP`, the data of diffusers'
`convert_wan_transformer_to_diffusers`, written here both ways so that a file converts one block at a time and
back). The original block's cross-attention norm is `norm3` (diffusers' `norm2`); the norms without weights
need no entry. VACE's control blocks (`vace_blocks.N`) are the same blocks with an input (`before_proj`, block 0
only) and an output projection (`after_proj`), fed by `vace_patch_embedding`.

LoRA files: `diffusion_model.<original name>` (`blocks.0.self_attn.q.lora_A.weight`), the only layout ComfyUI's Wan
models apply (diffusers names load 0 tensors there); diffusers' WanPipeline.load_lora_weights converts it itself,
except VACE's control blocks (its converter raises on `vace_blocks`): `trainer lora convert --to diffusers` for those.
A LoRA's alpha/rank is folded into lora_B (both loaders then use scale 1, as trained); LoHa/LoKr keep `.alpha`."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

from ...adapters.merge import fold_alphas, rank_alphas
from ..common import variant_configs

CONFIG_DIR = Path(__file__).parent / "configs"
BLOCK_LISTS = ("blocks",)
VACE_BLOCK_LISTS = ("vace_blocks", "blocks")  # execution order: the control blocks all run before the main blocks
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI/ldm-style full checkpoints; bare files have none
IGNORED = ("scaled_fp8",)  # ComfyUI's scaled-fp8 marker
LORA_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet"

# diffusers -> original names inside a block: modules (and the block's own `scale_shift_table` parameter)
_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
          "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
          "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
          "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
          "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
          "attn2.norm_added_k": "cross_attn.norm_k_img",
          "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation"}
_VACE_BLOCK = {**_BLOCK, "proj_in": "before_proj", "proj_out": "after_proj"}
_TOP = {"patch_embedding": "patch_embedding", "vace_patch_embedding": "vace_patch_embedding",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
        "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
        "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
        "proj_out": "head.head", "scale_shift_table": "head.modulation"}
_BLOCK_BACK = {b: a for a, b in _BLOCK.items()}
_VACE_BLOCK_BACK = {b: a for a, b in _VACE_BLOCK.items()}
_TOP_BACK = {b: a for a, b in _TOP.items()}
_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight",
             "head.head.weight", "head.modulation", "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.q.weight",
             "blocks.0.ffn.0.weight", "blocks.0.modulation")


def _rename(name: str, block: Mapping[str, str], vace_block: Mapping[str, str], top: Mapping[str, str]) -> str:
    """A parameter or module name through the tables: the longest named entity it starts with is renamed, the rest
    (`.weight`, `.lora_A.weight`, `.scale_weight`, nothing) kept."""
    if name.startswith(("blocks.", "vace_blocks.")):
        blocks, i, inner = name.split(".", 2)
        head, table = f"{blocks}.{i}.", block if blocks == "blocks" else vace_block
    else:
        head, inner, table = "", name, top
    for entity in sorted(table, key=len, reverse=True):
        if inner == entity or inner.startswith(entity + "."):
            return head + table[entity] + inner[len(entity):]
    raise ValueError(f"'{name}' is not a Wan 2.1 transformer weight or module")


def to_original(name: str) -> str:
    """diffusers name -> the Wan repo's (ComfyUI's) name."""
    return _rename(name, _BLOCK, _VACE_BLOCK, _TOP)


def to_diffusers(name: str) -> str:
    """The Wan repo's (ComfyUI's) name -> diffusers'."""
    return _rename(name, _BLOCK_BACK, _VACE_BLOCK_BACK, _TOP_BACK)


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A WanTransformer3DModel state dict in the original layout (what ComfyUI's diffusion_models/ files hold)."""
    return {to_original(k): v for k, v in state.items()}


# ---- recognising a single file and reading its config ---------------------------------------------------------
def known_configs() -> dict[str, dict]:
    """The released T2V variants' transformer and scheduler configs shipped in configs/, by folder name."""
    return variant_configs(CONFIG_DIR)


def strip_prefix(keys: Iterable[str]) -> tuple[str, list[str]]:
    """(the prefix the file's transformer keys carry, the transformer's keys without it; markers dropped)."""
    keys = list(keys)
    prefix = next((p for p in PREFIXES if any(k.startswith(p + "patch_embedding.") for k in keys)), "")
    return prefix, [k[len(prefix):] for k in keys if k.startswith(prefix) and k not in IGNORED
                    and not k.endswith(".scale_input")]


def variant(names: Iterable[str]) -> str:
    """'t2v', 'i2v' or 'vace' from a transformer's original-layout names."""
    names = list(names)
    if any(k.startswith("vace_blocks.") for k in names):
        return "vace"
    if any(k.startswith("img_emb.") or ".k_img." in k for k in names):
        return "i2v"
    return "t2v"


def config_variant(config: Mapping) -> str:
    """'t2v', 'i2v' or 'vace' from a diffusers transformer config."""
    return "vace" if "vace_layers" in config else "i2v" if config.get("image_dim") else "t2v"


ARCH_OF = {"t2v": "wan21", "i2v": "wan21_i2v", "vace": "wan21_vace"}  # model.arch that trains each variant
# each variant's diffusers class and its repeated blocks in execution order
TRANSFORMER_CLS = {"t2v": WanTransformer3DModel, "i2v": WanTransformer3DModel, "vace": WanVACETransformer3DModel}
BLOCK_LISTS_OF = {"t2v": BLOCK_LISTS, "i2v": BLOCK_LISTS, "vace": VACE_BLOCK_LISTS}


def require_variant(names: Iterable[str], source, want: str) -> None:
    """The original-layout names are a Wan 2.1 transformer of variant `want` ('t2v', 'i2v' or 'vace'), else a clear
    error."""
    names = [k for k in names if not k.endswith(".scale_weight")]
    missing = [k for k in _REQUIRED if k not in names]
    if missing:
        from ..flux.formats import describe_checkpoint  # knows the other common checkpoint layouts

        hint = ("it is in diffusers' layout: point model.name_or_path at its diffusers folder"
                if any(k.startswith("blocks.0.attn1.") for k in names) else describe_checkpoint(names))
        raise ValueError(f"{source} is not a Wan 2.1 transformer in the original layout (no {missing[0]}): {hint}")
    check_variant(variant(names), source, want)


def check_variant(kind: str, source, want: str) -> None:
    if kind == want:
        return
    what = {"t2v": "a text-to-video (T2V) model", "i2v": "an image-to-video (I2V) model (img_emb / k_img)",
            "vace": "a VACE model (vace_blocks)"}[kind]
    raise ValueError(f"{source} is {what}: set model.arch: {ARCH_OF[kind]} (model.arch {ARCH_OF[want]} trains "
                     f"{want.upper()} models)")


def infer_config(shapes: Mapping[str, tuple], base: Mapping | None = None) -> dict:
    """WanTransformer3DModel's (WanVACETransformer3DModel's) config from original-layout tensor shapes: widths, depth,
    patch and channels. What no weight tells (head size, norm eps, rotary table length) comes from `base` (the
    components folder's transformer config), else from the releases' (every Wan 2.1 has 128-wide heads). A VACE
    model's control blocks feed main blocks spaced evenly from block 0, as in both releases (every 2nd of 30 in 1.3B,
    every 5th of 40 in 14B) and as ComfyUI's VaceWanModel assumes: no tensor says which."""
    inner, in_channels, *patch = shapes["patch_embedding.weight"]
    defaults = known_configs()["wan2.1-t2v-1.3b"]["transformer"]
    base = dict(base or {})
    head_dim = base.get("attention_head_dim", defaults["attention_head_dim"])
    if inner % head_dim:
        raise ValueError(f"patch_embedding width {inner} is not a multiple of the attention head size {head_dim}")
    return {
        **{k: base.get(k, defaults[k]) for k in ("eps", "rope_max_seq_len")},
        "patch_size": list(patch), "num_attention_heads": inner // head_dim, "attention_head_dim": head_dim,
        "in_channels": in_channels, "out_channels": shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]),
        "text_dim": shapes["text_embedding.0.weight"][1], "freq_dim": shapes["time_embedding.0.weight"][1],
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
        "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        # I2V: the CLIP vision width the image embedder takes, and the image keys' input width
        "image_dim": shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else None,
        "added_kv_proj_dim": shapes["blocks.0.cross_attn.k_img.weight"][1]
        if "blocks.0.cross_attn.k_img.weight" in shapes else None,
        "pos_embed_seq_len": None,
        **(_vace_config(shapes) if "vace_patch_embedding.weight" in shapes else {}),
    }


def _vace_config(shapes: Mapping[str, tuple]) -> dict:
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    count = len({k.split(".")[1] for k in shapes if k.startswith("vace_blocks.")})
    if not count or layers % count:
        raise ValueError(f"{count} VACE control blocks do not divide the {layers} main blocks evenly, as in the released "
                         "VACE models; which blocks they feed is not in the file: use the model's diffusers folder")
    return {"vace_layers": list(range(0, layers, layers // count)),
            "vace_in_channels": shapes["vace_patch_embedding.weight"][1]}


def computed_buffers(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    """What no file stores: the rotary tables, computed as diffusers' __init__ does, in their own dtype."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = model.rope
    fresh = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    return {"rope.freqs_cos": fresh.freqs_cos, "rope.freqs_sin": fresh.freqs_sin}


def load_single_file(path: str | Path, base, base_config: Mapping | None = None, want: str = "t2v") -> WanTransformer3DModel:
    """A WanTransformer3DModel (WanVACETransformer3DModel) from one original-layout file (bf16/fp16/fp32, float8,
    ComfyUI scaled fp8; prefixed or not) of variant `want` ('t2v', 'i2v', 'vace'), read block by block and finished by
    `base` (quantized, moved)."""
    from itertools import chain

    from ..blockwise import materialize, read_units
    from ..sd3.formats import open_file

    reader = open_file(path)
    prefix, names = strip_prefix(reader.keys())
    require_variant(names, path, want)
    shapes = {k: reader.shape(prefix + k) for k in names if not k.endswith(".scale_weight")}
    config = infer_config(shapes, base_config)
    with torch.device("meta"):
        model = TRANSFORMER_CLS[want].from_config(config)
    expected = {to_original(k): tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = [k for k in expected if k not in shapes], [k for k in shapes if k not in expected]
    wrong = [f"{k} {shapes[k]} != {s}" for k, s in expected.items() if k in shapes and shapes[k] != s]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not fit the Wan transformer their shapes describe ({config['num_layers']} "
                         f"blocks of width {config['num_attention_heads'] * config['attention_head_dim']}): {len(missing)} "
                         f"missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} of the wrong "
                         f"shape {wrong[:5]}")
    readers = {prefix + k: reader for k in names}
    block_lists = BLOCK_LISTS_OF[want]
    units = read_units(readers, block_lists, rename=lambda k: to_diffusers(k[len(prefix):]))
    return materialize(model, chain(units, [computed_buffers(model)]), base, block_lists, str(path),
                       exact=frozenset(computed_buffers(model)))


# ---- LoRA files -----------------------------------------------------------------------------------------------
def lora_to_file(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft-named tensors with `<module>.alpha` -> `diffusion_model.<original name>`, alpha/rank folded into lora_B of
    LoRA, LoCon and DoRA modules (LoHa / LoKr keep `.alpha`)."""
    return {LORA_PREFIX + to_original(k): v for k, v in fold_alphas(dict(state), with_dora=True).items()}


@cache
def _original_module_names() -> list[str]:
    """Every Linear a Wan 2.1 transformer (I2V's image layers and VACE's control blocks included) has, by its original
    name."""
    config = {**known_configs()["wan2.1-t2v-1.3b"]["transformer"], "num_layers": 40, "image_dim": 1280,
              "added_kv_proj_dim": 1536, "vace_layers": list(range(40))}
    with torch.device("meta"):
        model = WanVACETransformer3DModel.from_config(config)
    return sorted(to_original(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def lora_from_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan LoRA file -> peft-named tensors of the transformer with an `.alpha` per LoRA module (rank where the file
    has none: scale 1). Reads ours (`diffusion_model.<original name>`), diffusers' (`transformer.<diffusers name>`,
    DoRA magnitudes as `lora_magnitude_vector`) and kohya/musubi-tuner's (`lora_unet_<original name with _>`)."""
    from ...adapters.kohya import from_kohya

    heads = (LORA_PREFIX, DIFFUSERS_PREFIX, KOHYA_PREFIX + "_")
    head = next((h for h in heads if any(k.startswith(h) for k in tensors)), None)
    stray = [k for k in tensors if head is None or not k.startswith(head)]
    if stray:
        raise ValueError(f"not a Wan LoRA key: '{stray[0]}' (expected one layout: {', '.join(h + '...' for h in heads)})")
    if head == DIFFUSERS_PREFIX:
        state = {k[len(head):]: v for k, v in tensors.items()}
        for key in [k for k in state if k.endswith(".lora_magnitude_vector")]:
            state[key[: -len(".lora_magnitude_vector")] + ".dora_scale"] = state.pop(key).reshape(-1, 1)
        return rank_alphas(state)
    if head == LORA_PREFIX:
        original = {k[len(head):]: v for k, v in tensors.items()}
    else:
        original, alphas = from_kohya(dict(tensors), _original_module_names(), KOHYA_PREFIX)
        original.update({f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()})
    return rank_alphas({to_diffusers(k): v for k, v in original.items()})


def lora_to_layout(tensors: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A Wan LoRA file in any layout lora_from_file reads -> `comfy` (ours, `diffusion_model.<original name>`),
    `diffusers` (`transformer.<diffusers name>`, as WanPipeline.save_lora_weights writes; DoRA magnitudes as peft's
    `lora_magnitude_vector`) or `kohya` (`lora_unet_<original name with _>` with `.alpha`, musubi-tuner's)."""
    from ...adapters.kohya import to_kohya

    state = lora_from_file(tensors)
    if layout == "comfy":
        return lora_to_file(state)
    if layout == "diffusers":
        out = {}
        for key, t in fold_alphas(state, with_dora=True).items():
            if ".hada_" in key or ".lokr_" in key:
                raise ValueError(f"{key}: diffusers reads LoRA and DoRA only; LoHa/LoKr files stay in the ComfyUI layout")
            if key.endswith(".dora_scale"):
                key, t = key[: -len(".dora_scale")] + ".lora_magnitude_vector", t.reshape(-1)
            out[DIFFUSERS_PREFIX + key] = t
        return out
    original = {to_original(k): v for k, v in state.items()}
    alphas = {k[: -len(".alpha")]: float(v) for k, v in original.items() if k.endswith(".alpha")}
    return to_kohya({k: v for k, v in original.items() if not k.endswith(".alpha")}, alphas, KOHYA_PREFIX)
