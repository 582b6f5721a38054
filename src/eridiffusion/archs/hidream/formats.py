"""HiDream-I1 single files and LoRA files.

The single-file layout (ComfyUI's `diffusion_models/hidream_i1_full_fp16.safetensors`) is the diffusers
HiDreamImageTransformer2DModel state dict itself: ComfyUI's HiDream model uses diffusers' module names, and
diffusers' own converter (`convert_hidream_transformer_to_diffusers`) only strips an optional
`model.diffusion_model.` prefix. So a file is read with its names as they are (that prefix, or `diffusion_model.`,
removed) and written bare. The weights do not tell the head size, the rotary split, the patch size or which Llama
layer feeds each block, so the config is the one among the released configs (configs/) and the base folder's own
transformer config whose model has exactly the file's tensor names and shapes.

LoRA files are diffusers' layout, `transformer.<diffusers name>.lora_A/lora_B.weight`, which ComfyUI's HiDream
branch and HiDreamImagePipeline.load_lora_weights both apply. diffusers refuses `.alpha` entries, so a LoRA's
alpha / rank is folded into lora_B and the file has none: both loaders then scale by 1, as the trainer did.
LoHa / LoKr modules keep `.alpha` (ComfyUI reads it; diffusers loads neither type).

`trainer lora convert` writes the same tensors under ComfyUI's other HiDream names: its generic
`diffusion_model.<name>` (which diffusers' HiDream loader converts too) and kohya's `lora_unet_<name with _>`, every
module with its `.alpha`; SimpleTuner's `lycoris_<name with _>` is read as well. The names are diffusers' in every
layout, so a conversion only renames."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from diffusers import HiDreamImageTransformer2DModel

from ...adapters.kohya import from_kohya, to_kohya
from ...adapters.merge import fold_alphas, rank_alphas
from ..common import variant_configs
from ..sources import SAFETENSORS_SUFFIXES, _require_weight_suffix, load_state_dict_file

CONFIG_DIR = Path(__file__).parent / "configs"
BLOCK_LISTS = ("double_stream_blocks", "single_stream_blocks")  # the repeated blocks, in execution order
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI/ldm full checkpoints; diffusion-model files
REQUIRED = ("caption_projection.0.linear.weight", "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight")
FILE_PREFIX = "transformer."


def known_configs() -> dict[str, dict]:
    """The released variants' transformer and scheduler configs shipped in configs/, by folder name."""
    return variant_configs(CONFIG_DIR)


def static_shift(scheduler_config) -> float:
    """The flow shift a HiDream scheduler config samples with: UniPC's `flow_shift` over flow sigmas (Full), else
    the flow-matching schedulers' `shift` (Dev, Fast). HiDream's schedulers never shift by resolution."""
    cfg = dict(scheduler_config)
    if cfg.get("use_dynamic_shifting"):
        raise ValueError(f"{cfg.get('_class_name')}: a resolution-dependent shift is not what HiDream uses; "
                         "point model.extras_name_or_path at a HiDream-I1 folder")
    if cfg.get("use_flow_sigmas"):
        return float(cfg["flow_shift"])
    if "shift" not in cfg:
        raise ValueError(f"{cfg.get('_class_name')} is not a flow-matching scheduler (no shift); HiDream needs one")
    return float(cfg["shift"])


def strip_prefix(keys) -> tuple[str, list[str]]:
    """(the prefix the file's transformer keys carry, those keys without it)."""
    keys = list(keys)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
    return prefix, [k[len(prefix):] for k in keys if k.startswith(prefix) and k != "scaled_fp8"
                    and not k.endswith(".scale_input")]


def require_transformer(names, source: str) -> None:
    """An error naming what is missing unless `names` (unprefixed) are a HiDream-I1 transformer's."""
    missing = [k for k in REQUIRED if k not in names]
    if missing:
        raise ValueError(f"{source} is not a HiDream-I1 transformer: it lacks {missing} (first keys: {sorted(names)[:5]})")


def config_for(shapes: dict[str, tuple], candidates: list[dict], source: str) -> dict:
    """The first candidate config whose model has exactly these tensor names and shapes (ComfyUI scaled-fp8
    `.scale_weight` entries aside)."""
    names = {k: s for k, s in shapes.items() if not k.endswith(".scale_weight")}
    require_transformer(names, source)
    tried = []
    for config in candidates:
        with torch.device("meta"):
            model = HiDreamImageTransformer2DModel.from_config(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if expected == names:
            return config
        tried.append(f"{config['num_layers']}+{config['num_single_layers']} blocks of width "
                     f"{config['num_attention_heads'] * config['attention_head_dim']}")
    blocks = len({k.split(".")[1] for k in names if k.startswith("double_stream_blocks.")})
    singles = len({k.split(".")[1] for k in names if k.startswith("single_stream_blocks.")})
    raise ValueError(f"{source}: a HiDream transformer of {blocks}+{singles} blocks and width "
                     f"{names['x_embedder.proj.weight'][0]} fits none of the known configs ({'; '.join(tried)}); its "
                     "head size, rotary split and Llama layers cannot be read from the weights: set "
                     "model.extras_name_or_path to a HiDream diffusers folder whose transformer/config.json describes it")


def load_single_file(path: str | Path, base, extra_configs: list[dict] = ()) -> HiDreamImageTransformer2DModel:
    """A HiDreamImageTransformer2DModel from one file (bf16/fp16/fp32 or float8, prefixed or not), read block by
    block and finished by `base` (quantized, moved)."""
    from ..blockwise import DictReader, SafetensorsReader, materialize, read_units

    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        reader = SafetensorsReader(_require_weight_suffix(path, "weights file"))
    else:
        reader = DictReader(load_state_dict_file(path))
    prefix, names = strip_prefix(reader.keys())
    config = config_for({k: reader.shape(prefix + k) for k in names},
                        [*extra_configs, *(v["transformer"] for v in known_configs().values())], str(path))
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel.from_config(config)
    readers = {prefix + k: reader for k in names}
    return materialize(model, read_units(readers, BLOCK_LISTS, rename=lambda k: k[len(prefix):]), base, BLOCK_LISTS,
                       str(path))


# ---- LoRA files ---------------------------------------------------------------------------------------------------
def lora_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft-named tensors with `<module>.alpha` -> `transformer.<name>` keys, alpha / rank folded into lora_B of
    LoRA, LoCon and DoRA modules (LoHa / LoKr modules keep their `.alpha`)."""
    return {FILE_PREFIX + k: v for k, v in fold_alphas(state, with_dora=True).items()}


LORA_HEADS = {"diffusers": FILE_PREFIX, "comfy": "diffusion_model.", "kohya": "lora_unet_", "lycoris": "lycoris_"}


def lora_from_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HiDream LoRA file in any layout of LORA_HEADS -> peft names, each LoRA module with an `.alpha` (rank where
    the file has none: scale 1, as the loaders read it) and DoRA magnitudes as `.dora_scale` (out, 1)."""
    heads = tuple(LORA_HEADS.values())
    counts = {h: sum(k.startswith(h) for k in tensors) for h in heads}
    head = max(heads, key=counts.get) if any(counts.values()) else None  # the file's layout: most of its keys
    stray = [k for k in tensors if head is None or not k.startswith(head)]
    if stray:
        raise ValueError(f"not a HiDream LoRA key: '{stray[0]}' (expected one layout: {', '.join(h + '...' for h in heads)})")
    if head.endswith("_"):
        state, alphas = from_kohya(tensors, _module_names(), head[:-1])
        state.update({f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()})
    else:
        state = {k[len(head):]: v for k, v in tensors.items()}
    for key in [k for k in state if k.endswith(".lora_magnitude_vector")]:  # peft's DoRA magnitude (diffusers' saver)
        state[key[: -len(".lora_magnitude_vector")] + ".dora_scale"] = state.pop(key).reshape(-1, 1)
    return rank_alphas(state)


def lora_to_layout(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A HiDream LoRA file in any layout lora_from_file reads -> the same adapters in `layout`: `diffusers` is the
    trainer's own file (alpha folded into LoRA / DoRA), `comfy` the same under `diffusion_model.`, `kohya`
    `lora_unet_<name with _>` with every module's `.alpha`."""
    state = lora_from_file(tensors)
    if layout == "kohya":
        alphas = {k[: -len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
        return to_kohya({k: v for k, v in state.items() if not k.endswith(".alpha")}, alphas, LORA_HEADS[layout][:-1])
    return {LORA_HEADS[layout] + k: v for k, v in fold_alphas(state, with_dora=True).items()}


@cache
def _module_names() -> list[str]:
    """Every module name of HiDream-I1's transformer (all three releases share one architecture), which tells the
    `_` of a kohya name that was a `.`."""
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel.from_config(known_configs()["hidream-i1-full"]["transformer"])
    return [n for n, _ in model.named_modules() if n]
