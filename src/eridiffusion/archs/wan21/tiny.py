"""A tiny random-initialised Wan 2.1 text-to-video folder in the real diffusers on-disk format (as
`WanPipeline.save_pretrained` writes it), and the same transformer as one file in the original layout (ComfyUI's
diffusion_models/), for tests and the demo: no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..tiny_parts import tiny_t5_tokenizer, tiny_umt5_config

TEXT_WIDTH = 32


def tiny_wan_vae():
    """AutoencoderKLWan with the released factors (8x spatial, 4x temporal: latent frames 1 + (F - 1) // 4, 16
    channels, the released latents_mean/std) at width 8."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def build_tiny_wan21(folder: str | Path, *, num_layers: int = 2, seed: int = 0, i2v: bool = False, vace: bool = False,
                     vace_layers: list[int] | None = None, image_dim: int = 16) -> Path:
    """Transformer patch (1, 2, 2) over the VAE's 8x: pixel sides divisible by 16; 2 heads of 12 (the rotary
    split 4/4/4), UMT5 of width 32 with the tiny T5 tokenizer (UMT5's tokenizer class is T5's). The scheduler is
    the Wan 2.1 T2V diffusers repos' (UniPC over flow sigmas, flow_shift 3). With `i2v`: the image-to-video
    transformer (36 input channels, the image embedder and k_img/v_img) and a CLIPVisionModel of width 16 (32 px
    images in 8 px patches: 17 tokens; 16 heads and gelu as ViT-H/14, which a clip_vision file is read as) with its
    CLIPImageProcessor, as WanImageToVideoPipeline.save_pretrained writes (`image_dim`: the CLIP's width, 1280 as
    ViT-H/14's for ComfyUI's Wan model, whose image embedder takes 1280 whatever the config). With `vace`: the VACE transformer (a
    control block for every main block, or for each of `vace_layers`; 96 control channels), as
    WanVACEPipeline.save_pretrained writes it."""
    from diffusers import (UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel,
                           WanVACEPipeline, WanVACETransformer3DModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5EncoderModel

    from .formats import known_configs

    folder = Path(folder)
    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(tiny_umt5_config(tokenizer, d_model=TEXT_WIDTH))
        torch.manual_seed(seed)
        vae = tiny_wan_vae()
        torch.manual_seed(seed)
        vace_kw = dict(vace_layers=vace_layers or list(range(num_layers)), vace_in_channels=96) if vace else {}
        transformer = (WanVACETransformer3DModel if vace else WanTransformer3DModel)(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36 if i2v else 16,
            out_channels=16, text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=48, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
            **(dict(image_dim=image_dim, added_kv_proj_dim=24) if i2v else {}), **vace_kw)
        torch.manual_seed(seed)
        image = dict(image_encoder=CLIPVisionModel(CLIPVisionConfig(
            hidden_size=image_dim, intermediate_size=32, num_hidden_layers=2, num_attention_heads=16, image_size=32,
            patch_size=8, hidden_act="gelu")), image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})) if i2v else {}
    scheduler = UniPCMultistepScheduler.from_config(known_configs()["wan2.1-t2v-1.3b"]["scheduler"])
    pipe = (WanImageToVideoPipeline if i2v else WanVACEPipeline if vace else WanPipeline)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                                             scheduler=scheduler, transformer=transformer, **image)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_wan21_single_file(folder: str | Path, path: str | Path, *, dtype: torch.dtype | None = None,
                                 prefix: str = "") -> Path:
    """The tiny folder's transformer as one file in the original Wan layout (ComfyUI's
    wan2.1_t2v_1.3B_bf16.safetensors), in `dtype` (float8_e4m3fn: as the _fp8_e4m3fn files, unscaled)."""
    from safetensors.torch import save_file

    from .formats import TRANSFORMER_CLS, config_variant, diffusers_to_original

    variant = config_variant(json.loads((Path(folder) / "transformer" / "config.json").read_text()))
    model = TRANSFORMER_CLS[variant].from_pretrained(folder, subfolder="transformer", local_files_only=True)
    state = diffusers_to_original(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
