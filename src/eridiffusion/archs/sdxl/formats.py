"""SDXL as one file in Stability's original (SGM) layout, the way ComfyUI, A1111 and the released
`sd_xl_base_1.0.safetensors` keep it, to and from diffusers' four components.

    model.diffusion_model.*                     UNet (LDM `input_blocks`/`middle_block`/`output_blocks`)
    first_stage_model.*                         VAE  (LDM `encoder.down.N.block.M`, 1x1-conv attention)
    conditioner.embedders.0.transformer.*       CLIP-L, already in transformers' layout (`text_model.`)
    conditioner.embedders.1.model.*             OpenCLIP bigG (`transformer.resblocks.N`, fused in_proj)

Reading goes through diffusers' own single-file converters. Writing is the inverse, which diffusers ships
only as a script outside the package, so its tables live here; the tests check them against the readers.
"""
from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, DIFFUSERS_TO_LDM_MAPPING, convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)

BASE_CONFIGS = Path(__file__).parent / "configs" / "sdxl-base"  # stabilityai/stable-diffusion-xl-base-1.0, no weights
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
CLIP_POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer in the original file, not a weight in transformers 5
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# what SDXL base's tokenizer_config.json files add to a bare vocab.json + merges.txt: 77 tokens, OpenCLIP pads with "!"
TOKENIZER_DEFAULTS = {"tokenizer": {"model_max_length": 77}, "tokenizer_2": {"model_max_length": 77, "pad_token": "!"}}

# diffusers -> SGM names inside one block; DIFFUSERS_TO_LDM_MAPPING has the top-level layers
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_CONV_ATTENTION = re.compile(r".*\.attn_1\.(q|k|v|proj_out)\.weight")  # 1x1 convs in SGM, linears in diffusers
OPEN_CLIP_QKV = re.compile(r"(.*\.attn)\.([qkv])_proj\.(weight|bias)")


# ---- recognising and describing a checkpoint ---------------------------------------------------
def is_sgm_sdxl(keys: Iterable[str]) -> bool:
    """An SDXL base-layout checkpoint: an LDM UNet with both of SDXL's text encoders beside it."""
    keys = set(keys)
    return (CHECKPOINT_KEY_NAMES["clip_sdxl"] in keys and CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in keys
            and any(k.startswith(PREFIXES["unet"] + "input_blocks.") for k in keys))


def base_config(component: str) -> dict:
    """The shipped SDXL base config of one component (`unet`, `vae`, `scheduler`, `text_encoder`, ...)."""
    return read_configs(BASE_CONFIGS)[component]


def infer_sdxl_unet_config(state_dict: Mapping[str, torch.Tensor], *, reference: Mapping | None = None) -> dict:
    """The diffusers UNet2DConditionModel config of an SGM checkpoint's `model.diffusion_model.*` weights.

    Read from the shapes: in/out channels, block_out_channels (each level's ResNet width), layers_per_block,
    which levels have cross-attention, transformer_layers_per_block (transformer blocks counted per level;
    1 where a level has none, as SDXL's config says), cross_attention_dim (attn2.to_k's input width),
    use_linear_projection, projection_class_embeddings_input_dim and addition_time_embed_dim (that width
    less the pooled OpenCLIP projection, over SDXL's 6 time ids; the reference's value without OpenCLIP).

    When these all agree with `reference` (default: the shipped SDXL base config), that config is returned
    as it is. Otherwise, for what no weight shows: heads of 64 channels, as SDXL's, or for narrower models
    of gcd(64, widths) channels; GroupNorm groups gcd(32, widths), which is SDXL's 32 when it divides;
    everything else (sample_size, norm_eps, ...) from `reference`.
    """
    reference = dict(reference if reference is not None else base_config("unet"))
    unet = _strip(state_dict, PREFIXES["unet"])
    levels, level = [], []  # input_blocks indices of each level's ResNets; a `.0.op` downsampler ends a level
    for k in range(1, _count(unet, "input_blocks.")):
        if f"input_blocks.{k}.0.op.weight" in unet:
            levels.append(level)
            level = []
        else:
            level.append(k)
    levels.append(level)
    if len({len(level) for level in levels}) != 1:
        raise ValueError(f"UNet levels hold {[len(level) for level in levels]} ResNets; diffusers' converter needs the same number in each")

    widths = [unet[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    attention = [f"input_blocks.{level[0]}.1.proj_in.weight" in unet for level in levels]
    depths = [_count(unet, f"input_blocks.{level[0]}.1.transformer_blocks.") if attn else 1
              for level, attn in zip(levels, attention)]
    if not any(attention):
        raise ValueError("the UNet has no cross-attention level; this is not an SDXL-family UNet")
    proj_in = next(v for k, v in unet.items() if k.endswith(".proj_in.weight"))
    to_k = next(v for k, v in unet.items() if k.endswith(".attn2.to_k.weight"))
    shapes = {
        "in_channels": unet["input_blocks.0.0.weight"].shape[1],
        "out_channels": unet["out.2.weight"].shape[0],
        "block_out_channels": widths,
        "layers_per_block": len(levels[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": depths,
        "cross_attention_dim": to_k.shape[1],
        "use_linear_projection": proj_in.ndim == 2,
    }
    if "label_emb.0.0.weight" in unet:  # SDXL's pooled-text + size/crop conditioning
        width = unet["label_emb.0.0.weight"].shape[1]
        pooled = state_dict.get(PREFIXES["text_encoder_2"] + "text_projection")
        time_dim = (width - pooled.shape[1]) // 6 if pooled is not None else reference["addition_time_embed_dim"]
        shapes |= {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": width,
                   "addition_time_embed_dim": time_dim}
    else:
        shapes |= {"addition_embed_type": None, "projection_class_embeddings_input_dim": None}
    if all(_same(reference.get(k), v) for k, v in shapes.items()):
        return reference
    head = math.gcd(64, *widths)
    return {**reference, **shapes, "attention_head_dim": [w // head for w in widths], "num_attention_heads": None,
            "norm_num_groups": math.gcd(32, *widths)}


def infer_sdxl_vae_latent_channels(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The VAE's latent channels: the decoder's input width."""
    return int(state_dict[PREFIXES["vae"] + "decoder.conv_in.weight"].shape[1])


# ---- SGM <-> diffusers state dicts ------------------------------------------------------------
def sgm_to_diffusers(state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SGM checkpoint into diffusers/transformers state dicts, one per component it holds.

    `configs["unet"]` and `configs["vae"]` are the diffusers configs (the converters read the block layout
    from them). Keys outside the four prefixes (EMA copies, schedule tables) are not read; neither are the
    CLIP position ids nor OpenCLIP's logit_scale, which the diffusers models have no weight for.
    Text encoder keys come in the installed transformers' layout (see `text_encoder_layout`).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    present = {name for name, prefix in PREFIXES.items() if any(k.startswith(prefix) for k in state_dict)}
    out = {}
    if "unet" in present:
        out["unet"] = convert_ldm_unet_checkpoint(state_dict, dict(configs["unet"]))
    if "vae" in present:
        out["vae"] = convert_ldm_vae_checkpoint(state_dict, dict(configs["vae"]))
    if "text_encoder" in present:
        clip = convert_ldm_clip_checkpoint(state_dict)  # strips `conditioner.embedders.0.transformer.`
        clip.pop(CLIP_POSITION_IDS, None)
        out["text_encoder"] = text_encoder_layout(clip, CLIPTextModel)
    if "text_encoder_2" in present:
        prefix = PREFIXES["text_encoder_2"]
        # the converter reads only `text_model.config.hidden_size`, and only when text_projection is missing
        stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=state_dict[prefix + "positional_embedding"].shape[1]))
        out["text_encoder_2"] = text_encoder_layout(convert_open_clip_checkpoint(stand_in, state_dict, prefix=prefix),
                                                    CLIPTextModelWithProjection)
    return out


def diffusers_to_sgm(components: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One SGM-layout state dict from diffusers/transformers state dicts (`unet`, `vae`, `text_encoder`,
    `text_encoder_2`, any of them), as `sd_xl_base_1.0.safetensors` lays it out, so ComfyUI/A1111 load it.

    Text encoders may come with or without transformers' `text_model.` level. OpenCLIP's logit_scale, a
    training temperature no diffusers model holds, is not written (the original file has it, unused).
    """
    unknown = set(components) - set(PREFIXES)
    if unknown:
        raise ValueError(f"unknown SDXL components {sorted(unknown)}; expected some of {list(PREFIXES)}")
    writers = {"unet": _unet_to_sgm, "vae": _vae_to_sgm, "text_encoder": _clip_to_sgm, "text_encoder_2": _open_clip_to_sgm}
    out = {}
    for name, state in components.items():
        out.update({PREFIXES[name] + k: v for k, v in writers[name](dict(state)).items()})
    return out


def _unet_to_sgm(state: dict) -> dict:
    keys = list(state)
    per_level = _count(keys, "down_blocks.0.resnets.")
    table = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    for i in range(_count(keys, "down_blocks.")):
        first_in, first_out = 1 + i * (per_level + 1), i * (per_level + 1)  # input_blocks.0 is conv_in
        for j in range(per_level):
            _block(table, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{first_in + j}.0", UNET_RESNET)
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{first_in + j}.1"
        table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{first_in + per_level}.0.op"
        for j in range(per_level + 1):
            _block(table, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{first_out + j}.0", UNET_RESNET)
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{first_out + j}.1"
        slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) else 1  # after the attention, if any
        table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{first_out + per_level}.{slot}.conv"
    _block(table, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    table["mid_block.attentions.0"] = "middle_block.1"
    _block(table, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    return {_rename(k, table): v for k, v in state.items()}


def _vae_to_sgm(state: dict) -> dict:
    keys = list(state)
    table = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    levels = _count(keys, "decoder.up_blocks.")
    for i in range(_count(keys, "encoder.down_blocks.")):
        for j in range(_count(keys, f"encoder.down_blocks.{i}.resnets.")):
            _block(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(levels):
        up = levels - 1 - i  # the LDM decoder numbers its levels from the latent's end
        for j in range(_count(keys, f"decoder.up_blocks.{i}.resnets.")):
            _block(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    for coder in ("encoder", "decoder"):
        for j in range(2):
            _block(table, f"{coder}.mid_block.resnets.{j}", f"{coder}.mid.block_{j + 1}", VAE_RESNET)
        _block(table, f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", VAE_ATTENTION)
    out = {}
    for key, value in state.items():
        name = _rename(key, table)
        out[name] = value[..., None, None] if VAE_CONV_ATTENTION.fullmatch(name) and value.ndim == 2 else value
    return out


def _clip_to_sgm(state: dict) -> dict:
    out = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out[CLIP_POSITION_IDS] = torch.arange(positions)[None]  # in the original file; ComfyUI's own saver writes it too
    return out


def _open_clip_to_sgm(state: dict) -> dict:
    layers, fragments = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"], DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    out, qkv = {}, defaultdict(dict)
    for key, value in state.items():
        key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if key in layers:
            # open_clip applies `x @ text_projection`; a torch Linear stores the transpose
            out[layers[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise ValueError(f"text_encoder_2 key {key!r} has no OpenCLIP counterpart")
        for diffusers_part, sgm_part in fragments.items():
            key = key.replace(diffusers_part, sgm_part)
        match = OPEN_CLIP_QKV.fullmatch("transformer." + key)
        if match:  # open_clip's nn.MultiheadAttention keeps q, k, v as one in_proj
            qkv[f"{match[1]}.in_proj_{match[3]}"][match[2]] = value
        else:
            out["transformer." + key] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _block(table: dict, diffusers: str, sgm: str, inner: Mapping[str, str]) -> None:
    table[diffusers] = sgm
    table.update({f"{diffusers}.{a}": f"{sgm}.{b}" for a, b in inner.items()})


def _rename(key: str, table: Mapping[str, str]) -> str:
    """`key` with its longest dotted prefix that `table` names replaced."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    raise ValueError(f"no SGM name for diffusers key {key!r}")


def _count(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix` has (`down_blocks.` -> 3)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def _strip(state_dict: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


@functools.cache
def _wraps_text_model(cls) -> bool:
    """transformers 5 dropped CLIPTextModel's `text_model.` level but kept CLIPTextModelWithProjection's."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=2, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=2, projection_dim=2,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        return any(k.startswith("text_model.") for k in cls(config).state_dict())


def text_encoder_layout(state: Mapping[str, torch.Tensor], cls) -> dict[str, torch.Tensor]:
    """`state` (keys with `text_model.`) in the layout `cls().state_dict()` has in the installed transformers."""
    if _wraps_text_model(cls):
        return dict(state)
    return {k.removeprefix("text_model."): v for k, v in state.items()}


# ---- loading ----------------------------------------------------------------------------------
def read_configs(folder: str | Path) -> dict:
    """The component configs of a diffusers SDXL folder (weights and tokenizers not needed)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = Path(folder)
    return {"unet": dict(UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)),
            "vae": dict(AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)),
            "text_encoder": CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True),
            "text_encoder_2": CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True),
            "scheduler": dict(diffusers.EulerDiscreteScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))}


def load_sdxl_tokenizers(folder: str | Path) -> dict:
    """SDXL's two CLIP tokenizers from `folder/tokenizer` and `folder/tokenizer_2`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    needed = [f"{sub}/{name}" for sub in TOKENIZER_DEFAULTS for name in TOKENIZER_FILES]
    missing = [path for path in needed if not (folder / path).is_file()]
    if missing:
        raise ValueError(f"tokenizer_folder {folder} must hold SDXL's two CLIP tokenizers: {', '.join(needed)} "
                         f"(as in stabilityai/stable-diffusion-xl-base-1.0); missing: {', '.join(missing)}")
    tokenizers = {}
    for sub, defaults in TOKENIZER_DEFAULTS.items():
        configured = (folder / sub / "tokenizer_config.json").is_file()
        tokenizers[sub] = CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True, **({} if configured else defaults))
    return tokenizers


def load_sdxl_single_file(path: str | Path, *, tokenizer_folder: str | Path,
                          dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float32,
                          config_folder: str | Path | None = None) -> dict:
    """UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection (all four loaded
    strictly), the scheduler and both tokenizers of an SGM-layout SDXL `.safetensors` file.

    `dtype` is one dtype or one per component name. Configs: the UNet's is inferred from the weights
    (see `infer_sdxl_unet_config`; SDXL base's when they match it), the VAE's latent channels likewise; the
    rest come from `config_folder`, a diffusers SDXL folder (default: the shipped SDXL base configs).
    """
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = load_sdxl_tokenizers(tokenizer_folder)  # before reading gigabytes
    state_dict = load_file(str(path))
    if not is_sgm_sdxl(state_dict):
        raise ValueError(f"{path} is not an SDXL checkpoint in the original layout: it lacks "
                         f"{PREFIXES['unet']}input_blocks.*, {CHECKPOINT_KEY_NAMES['clip_sdxl']} or "
                         f"{CHECKPOINT_KEY_NAMES['open_clip_sdxl']}")
    configs = read_configs(config_folder or BASE_CONFIGS)
    configs["unet"] = infer_sdxl_unet_config(state_dict, reference=configs["unet"])
    configs["vae"] = {**configs["vae"], "latent_channels": infer_sdxl_vae_latent_channels(state_dict)}
    states = sgm_to_diffusers(state_dict, configs)
    del state_dict
    missing = set(PREFIXES) - set(states)
    if missing:
        raise ValueError(f"{path} has no {', '.join(sorted(missing))} weights (prefixes {[PREFIXES[m] for m in sorted(missing)]})")

    builders = {"unet": lambda: UNet2DConditionModel.from_config(configs["unet"]),
                "vae": lambda: AutoencoderKL.from_config(configs["vae"]),
                "text_encoder": lambda: CLIPTextModel(configs["text_encoder"]),
                "text_encoder_2": lambda: CLIPTextModelWithProjection(configs["text_encoder_2"])}
    models = {}
    for name, build in builders.items():
        to = dtype[name] if isinstance(dtype, Mapping) else dtype
        with init_empty_weights():  # parameters on meta, replaced below; buffers (CLIP position ids) real
            model = build()
        # fresh copies: load_file's tensors sit at unaligned offsets, which changes CPU kernels' rounding
        state = {k: v.to(dtype=to if v.is_floating_point() else v.dtype, copy=True) for k, v in states.pop(name).items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"{path}: the {name} weights do not fit its config (from "
                             f"{'the weights' if name == 'unet' else config_folder or BASE_CONFIGS}): {error}") from error
        models[name] = model.eval()
    scheduler = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(configs["scheduler"])
    return {**models, **tokenizers, "scheduler": scheduler}
