"""A tiny random-initialised Chroma folder in the real diffusers on-disk format (as `ChromaPipeline.save_pretrained`
writes it, lodestones/Chroma1-HD's layout), and its transformer as one BFL-style file (chroma-unlocked-vNN's layout),
for tests and the demo: no download."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_parts import tiny_t5_config, tiny_t5_tokenizer, tiny_vae


def build_tiny_chroma(folder: str | Path, *, num_layers: int = 1, num_single_layers: int = 1, seed: int = 0) -> Path:
    """VAE scale factor 2 with FLUX.1's 16 latent channels, scaling and shift, packed 2x2 as Chroma does: pixel sides
    divisible by 4. T5 d_model 32, a 2-layer approximator of width 32 (Chroma's has 5 of 5120)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel

    folder = Path(folder)
    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(tiny_t5_config(tokenizer, d_model=32))
        torch.manual_seed(seed)
        vae = tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=text_encoder.config.d_model, axes_dims_rope=(4, 6, 6),
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    # Chroma1-HD's scheduler: FLUX.1-dev's resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder, safe_serialization=True)
    return folder


def write_single_file(folder: str | Path, path: str | Path, dtype: torch.dtype = torch.bfloat16, prefix: str = "") -> Path:
    """The transformer of a Chroma diffusers folder as one file in the BFL-style layout lodestones ships."""
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import save_file

    from .formats import diffusers_to_bfl

    model = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}, str(path))
    return Path(path)
