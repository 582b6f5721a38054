"""A tiny random-initialised SDXL folder in the real diffusers on-disk format.

The same layout, classes and configuration keys as stabilityai/stable-diffusion-xl-base-1.0, at
widths of 8 to 64, so that tests load it through the code paths a downloaded SDXL goes through.
The UNet and VAE builders are shared with the SDXL-derived tiny folders (Kolors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_parts import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae, write_clip_tokenizer

ADDITION_TIME_EMBED_DIM = 8  # SDXL's is 256; 6 micro-conditioning numbers (sizes, crop) each get this many


def build_tiny_sdxl(folder: str | Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random SDXL folder as `StableDiffusionXLPipeline.save_pretrained` lays it out.

    VAE scale factor 2 with 4 latent channels and a UNet that halves the latents twice, so pixel
    sizes must be divisible by 8, which is also what the pipeline checks. Default size 32x32.
    Text: two CLIP encoders of hidden size 32 whose penultimate states concatenate to the UNet's
    cross-attention width 64; the second one's 32-wide projection is the pooled embedding.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")  # OpenCLIP bigG's tokenizer pads with "!"

    # One seeded stream for all models, so that the two same-shaped text encoders differ;
    # fork_rng leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer_2, hidden_act="gelu"))
        vae = tiny_sdxl_vae()
        unet = tiny_sdxl_unet(
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            pooled_dim=text_encoder_2.config.projection_dim,
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=euler_scheduler(num_train_timesteps=1000, beta_end=0.012, prediction_type=prediction_type),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # SDXL base ships both tokenizers as vocab.json + merges.txt
    write_clip_tokenizer(folder / "tokenizer", tokenizer)
    write_clip_tokenizer(folder / "tokenizer_2", tokenizer_2)
    return folder


def tiny_sdxl_unet(*, cross_attention_dim: int, pooled_dim: int, **extra):
    """SDXL's UNet layout, narrowed: three levels (a plain ResNet level, then two cross-attention
    levels with deeper transformers in the last one and the mid block, as SDXL's (1, 2, 10)),
    linear proj_in/out, 3x3 convs, and "text_time" added conditioning whose input is the pooled
    text embedding plus 6 sinusoidal time ids.

    The channels stay narrower than the text width, so that to_k/to_v are not square, as in SDXL
    (2048 -> 640/1280). `extra` adds UNet config keys, e.g. Kolors' projection of its text states.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 4),  # as in SDXL's config, the number of heads per level (of 8 channels each)
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=pooled_dim + 6 * ADDITION_TIME_EMBED_DIM,
        **extra,
    )


def tiny_sdxl_vae():
    """SDXL's VAE config (4 latent channels, scaling factor 0.13025, upcast to fp32, quant convs)
    with two levels, so a scale factor of 2."""
    return tiny_vae(4, scaling_factor=0.13025)


def euler_scheduler(*, num_train_timesteps: int, beta_end: float, prediction_type: str = "epsilon"):
    """The EulerDiscreteScheduler config SDXL-family releases ship (scaled-linear betas from 0.00085,
    "leading" spacing with offset 1); they differ in the schedule's length and end."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=beta_end,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
