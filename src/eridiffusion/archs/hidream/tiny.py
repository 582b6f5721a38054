"""A tiny random-initialised HiDream-I1 folder in the real diffusers on-disk format (as
`HiDreamImagePipeline.save_pretrained` writes it), and a tiny Llama 3 folder laid out as a Hugging Face Llama
repo (config, weights and tokenizer side by side), for tests and the demo: no download."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_parts import (tiny_clip_text_config, tiny_clip_tokenizer, tiny_llama_config, tiny_llama_tokenizer,
                          tiny_t5_config, tiny_t5_tokenizer, tiny_vae, write_clip_tokenizer)

LLAMA_WIDTH, LLAMA_LAYERS = 48, 3


def tiny_llama(seed: int = 0):
    """(LlamaForCausalLM, its tokenizer): 3 layers of width 48."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_llama_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer, LLAMA_WIDTH, LLAMA_LAYERS))
    return model, tokenizer


def build_tiny_llama(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Llama 3 folder as unsloth/Meta-Llama-3.1-8B-Instruct lays it out (what model_kwargs.llama_model_path
    names)."""
    folder = Path(folder)
    model, tokenizer = tiny_llama(seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_hidream(folder: str | Path, *, with_llama: bool = True, num_layers: int = 2, num_single_layers: int = 2,
                       seed: int = 0) -> Path:
    """VAE scale factor 2 with 16 latent channels (the FLUX.1 VAE's factors, as HiDream uses it), transformer patch
    size 2: pixel sides divisible by 4. CLIP-L and CLIP-G of width 32 (pooled 32 + 32) with 248 positions (the
    Long-CLIP HiDream pads to 128 tokens), T5 of width 32, Llama of width 48 and 3 layers, the blocks reading its
    layers 0, 1, 2, 2 (the last one repeated, as HiDream's 48 blocks read Llama's 32). A mixture of 4 routed
    experts with 2 active, as the released model. Non-square latents are padded to max_resolution 32 x 32
    (256 patches: 64 x 64 px). The scheduler is HiDream-I1-Full's (UniPC over flow sigmas, shift 3). With
    `with_llama` the Llama is bundled as text_encoder_4 / tokenizer_4 (a folder the pipeline saves whole)."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel, UniPCMultistepScheduler
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(folder)
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer, max_position_embeddings=248))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer_2, hidden_act="gelu",
                                                                           max_position_embeddings=248))
        torch.manual_seed(seed)
        text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3, d_model=32))
        torch.manual_seed(seed)
        vae = tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)
        torch.manual_seed(seed)
        blocks = num_layers + num_single_layers
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=16, num_attention_heads=2, caption_channels=[32, LLAMA_WIDTH],
            text_emb_dim=2 * text_encoder.config.projection_dim, num_routed_experts=4, num_activated_experts=2,
            axes_dims_rope=(8, 4, 4), max_resolution=(32, 32),
            llama_layers=[min(i, LLAMA_LAYERS - 1) for i in range(blocks)])
    text_encoder_4, tokenizer_4 = tiny_llama(seed) if with_llama else (None, None)
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    pipe = HiDreamImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer", tokenizer)  # vocab.json + merges.txt, as HiDream-I1's tokenizer folders
    write_clip_tokenizer(folder / "tokenizer_2", tokenizer_2)
    return folder
