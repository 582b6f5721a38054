"""A tiny random-initialised Kolors folder in the real diffusers on-disk format.

Kolors is SDXL's UNet and VAE conditioned on one ChatGLM3 encoder instead of two CLIPs: the UNet
projects ChatGLM's penultimate hidden states to its cross-attention width ("text_proj") and takes
the last token of the final hidden states as the pooled embedding. The text encoder and tokenizer
classes are diffusers' own copies (`diffusers.pipelines.kolors`), as in Kwai-Kolors/Kolors-diffusers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..sdxl.tiny import euler_scheduler, tiny_sdxl_unet, tiny_sdxl_vae
from ..tiny_parts import tiny_sentencepiece_model

MAX_SEQUENCE_LENGTH = 256  # KolorsPipeline's default prompt length; the rotary table covers it


def build_tiny_kolors(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Kolors folder as `KolorsPipeline.save_pretrained` lays it out.

    The tiny SDXL UNet and VAE of `archs.sdxl.tiny`: pixel sizes divisible by 8, default 32x32.
    Text: a 2-layer ChatGLM of hidden size 32, projected by the UNet to its cross-attention width
    64; the 32-wide pooled embedding plus 6 x 8 time-id features make its 80-wide added conditioning.
    """
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RMSNorm
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        vocab_file = Path(tmp) / "tokenizer.model"
        vocab_file.write_bytes(tiny_sentencepiece_model())
        tokenizer = ChatGLMTokenizer(str(vocab_file))  # save_pretrained copies the file from here

        torch.manual_seed(seed)
        # ChatGLM3-6B's config (multi-query attention with 2 key/value groups, qkv bias, RMSNorm,
        # rotary on half of each head) at width 32; the vocabulary padded to a multiple of 64
        text_encoder = ChatGLMModel(
            ChatGLMConfig(
                num_layers=2,
                padded_vocab_size=-(-tokenizer.vocab_size // 64) * 64,
                hidden_size=32,
                ffn_hidden_size=64,
                kv_channels=8,
                num_attention_heads=4,
                multi_query_attention=True,
                multi_query_group_num=2,
                add_qkv_bias=True,
                seq_length=MAX_SEQUENCE_LENGTH,
                original_rope=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=False,
            ),
            empty_init=False,  # the default leaves every weight uninitialised memory
        )
        for module in text_encoder.modules():
            if isinstance(module, RMSNorm):  # allocated with torch.empty even so
                torch.nn.init.ones_(module.weight)
        hidden = text_encoder.config.hidden_size
        vae = tiny_sdxl_vae()
        unet = tiny_sdxl_unet(
            cross_attention_dim=2 * hidden,  # Kolors: ChatGLM's 4096 -> 2048
            pooled_dim=hidden,
            encoder_hid_dim_type="text_proj",
            encoder_hid_dim=hidden,
        )
        pipe = KolorsPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=euler_scheduler(num_train_timesteps=1100, beta_end=0.014),
            force_zeros_for_empty_prompt=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
