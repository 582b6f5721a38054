"""A tiny random-initialised SD 3.5 folder in the real diffusers on-disk format (as
`StableDiffusion3Pipeline.save_pretrained` writes it), for tests and the demo: no download."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_parts import (tiny_clip_text_config, tiny_clip_tokenizer, tiny_t5_config, tiny_t5_tokenizer, tiny_vae,
                          write_clip_tokenizer)


def build_tiny_sd3(folder: str | Path, *, num_layers: int = 2, with_t5: bool = True, seed: int = 0,
                   attention_head_dim: int = 8, num_attention_heads: int = 4) -> Path:
    """VAE scale factor 2 with 16 latent channels, transformer patch size 2: pixel sides divisible by 4.
    CLIP-L and CLIP-G of width 32 (pooled 32 + 32), T5 d_model 64 = the joint attention width, which must
    hold the two CLIPs' states side by side. The first block has SD3.5's second (dual) attention and
    every block QK RMS-norm, as SD3.5 Medium. `with_t5=False` leaves text_encoder_3 out (zeros in its place).
    ComfyUI's SD3 LoRA map assumes SAI's widths (64-wide heads, as many as blocks): attention_head_dim=64,
    num_attention_heads=num_layers builds such a model (bench/comfy_check.py)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(folder)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")  # OpenCLIP-G pads with "!"
    tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer_2, hidden_act="gelu"))
        text_encoder_3 = None
        if with_t5:
            torch.manual_seed(seed)
            text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3, d_model=64))
        torch.manual_seed(seed)
        vae = tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False)
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads, joint_attention_dim=64,
            caption_projection_dim=attention_head_dim * num_attention_heads,
            pooled_projection_dim=2 * text_encoder.config.projection_dim, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    # SD3.5 ships both CLIP tokenizers as vocab.json + merges.txt
    write_clip_tokenizer(folder / "tokenizer", tokenizer)
    write_clip_tokenizer(folder / "tokenizer_2", tokenizer_2)
    return folder


def write_tiny_sd3_single_file(folder: str | Path, path: str | Path, *, vae: bool = True, text_encoders: bool = False) -> Path:
    """A tiny SD3 folder (build_tiny_sd3's) as one file in Stability AI's layout, as ComfyUI users keep
    sd3.5_medium.safetensors: the MMDiT, the VAE (unless `vae=False`), and with `text_encoders` CLIP-L, CLIP-G and
    T5 (where the folder has it) inside too."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from .formats import diffusers_to_sai_file

    folder, load = Path(folder), dict(local_files_only=True)
    encoders = {}
    if text_encoders:
        for name, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                          ("text_encoder_3", T5EncoderModel)):
            if (folder / name).is_dir():
                encoders[name] = cls.from_pretrained(folder / name, **load).state_dict()
    tensors = diffusers_to_sai_file(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", **load).state_dict(),
                                    AutoencoderKL.from_pretrained(folder, subfolder="vae", **load).state_dict() if vae else None,
                                    encoders)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)


def configs_only(folder: str | Path, out: str | Path) -> Path:
    """A copy of a diffusers folder without weights (configs, tokenizers, scheduler): what model.extras_name_or_path
    needs beside a single file that carries the weights."""
    import shutil

    return Path(shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))
