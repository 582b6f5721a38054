"""A tiny random-initialised FLUX.1 folder in the real diffusers on-disk format.

Tests and the demo need a model folder that loads through exactly the code paths a downloaded
one does, without a download: the real classes, the real file layout, random weights, and
tokenizers built here from a short built-in text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_parts import (tiny_clip_text_config, tiny_clip_tokenizer, tiny_t5_config, tiny_t5_tokenizer, tiny_vae,
                          write_clip_tokenizer)


def build_tiny_flux(
    folder: str | Path,
    *,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 1,
    seed: int = 0,
) -> Path:
    """Write a tiny random Flux.1 folder as `FluxPipeline.save_pretrained` lays it out.

    VAE scale factor 2 with 4 latent channels, so the pixel height and width must be divisible
    by 4 (the pipeline packs 2x2 latent patches). Text dims: CLIP hidden 32, T5 d_model 32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()

    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(tiny_t5_config(tokenizer_2, d_model=32))
        torch.manual_seed(seed)
        vae = tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,  # 2x2 packed latent patches
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer", tokenizer)  # as FLUX.1-dev's tokenizer/
    return folder
