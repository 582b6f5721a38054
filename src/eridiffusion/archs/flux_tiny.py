"""A tiny random-initialised FLUX.1 folder in the real diffusers on-disk format.

Tests and the demo need a model folder that loads through exactly the code paths a downloaded
one does, without a download: the real classes, the real file layout, random weights, and
tokenizers built here from a short built-in text.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import torch

# Caption-like English, so the tiny tokenizers split typical prompts into a few real pieces.
_CORPUS = """\
a photo of a cat sitting on a red chair. a photo of a dog in the park.
a red circle on a blue background. a green square on a yellow background.
a blue triangle on a white background. a purple star on a black background.
an orange ring and a small pink dot. two shapes, one large and one small.
a painting of a house by the sea, in the style of [trigger].
the quick brown fox jumps over the lazy dog. a close-up portrait of a woman smiling.
a landscape with mountains, trees and a river at sunset. a city street at night with lights.
high quality, detailed, sharp focus, soft light, 4k, 35mm film.
"""

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MERGES = 300
_T5_EXTRA_IDS = 100


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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    clip_vocab, clip_merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=clip_merges, model_max_length=77)
    tokenizer_2 = _t5_tokenizer()

    with torch.random.fork_rng(devices=[]):  # seed every model without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux's encoder
                tie_word_embeddings=False,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        )
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
    _write_clip_vocab_files(folder / "tokenizer", clip_vocab, clip_merges)
    return folder


def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary learned from the built-in corpus.

    The ids follow CLIP's order: bytes, bytes + "</w>", merges, then the two special tokens.
    The merges are learned here rather than by `tokenizers`' BpeTrainer, whose tie-breaking
    changes from run to run.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and pre-tokeniser
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS.splitlines():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(_CLIP_MERGES):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(a + "</w>" for a in alphabet), *("".join(m) for m in merges), _CLIP_BOS, _CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _write_clip_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Swap transformers' tokenizer.json for the vocab.json + merges.txt layout of FLUX.1-dev's
    tokenizer/, so the tiny folder goes through the same loading path as the real one."""
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    special = {"bos_token": _CLIP_BOS, "eos_token": _CLIP_EOS, "pad_token": _CLIP_EOS, "unk_token": _CLIP_EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def _t5_tokenizer():
    """A T5 Unigram tokenizer over the corpus words plus single characters.

    Ids follow T5's layout: <pad>=0, </s>=1, <unk>=2, the pieces, then <extra_id_99>..<extra_id_0>.
    Word scores are log-frequencies; characters score far lower so that known words stay whole
    and unknown ones fall back to characters.
    """
    from transformers import T5Tokenizer

    counts = Counter(re.findall(r"\w+|[^\w\s]", _CORPUS))
    total = sum(counts.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word, n in sorted(counts.items(), key=lambda wn: (-wn[1], wn[0])):
        pieces.append(("▁" + word, math.log(n / total)))
        if len(word) > 1:  # the same word inside a longer one, e.g. "[trigger]" -> "▁[", "trigger", "]"
            pieces.append((word, math.log(n / total) - 1.0))
    floor = math.log(1 / total) - 10.0
    pieces += [(c, floor) for c in string.printable if not c.isspace()]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=pieces, extra_ids=_T5_EXTRA_IDS, model_max_length=512)
