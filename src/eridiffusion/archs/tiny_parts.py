"""Parts shared by the tiny random model folders (`archs/<name>/tiny.py`): tokenizers, text-encoder configs
and the VAE.

Every tokenizer here is built from a short built-in text, without a download, and saves in the
same on-disk format as the released one it stands in for.
"""

from __future__ import annotations

import io
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

# Caption-like English, so the tiny tokenizers split typical prompts into a few real pieces.
CORPUS = """\
a photo of a cat sitting on a red chair. a photo of a dog in the park.
a red circle on a blue background. a green square on a yellow background.
a blue triangle on a white background. a purple star on a black background.
an orange ring and a small pink dot. two shapes, one large and one small.
a painting of a house by the sea, in the style of [trigger].
the quick brown fox jumps over the lazy dog. a close-up portrait of a woman smiling.
a landscape with mountains, trees and a river at sunset. a city street at night with lights.
high quality, detailed, sharp focus, soft light, 4k, 35mm film.
"""

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MERGES = 300
_T5_EXTRA_IDS = 100


def tiny_clip_tokenizer(*, pad_token: str = CLIP_EOS):
    """A CLIP tokenizer (77 tokens) over a byte-level BPE vocabulary learned from CORPUS.

    OpenAI's CLIP pads with its end token; OpenCLIP's (SDXL's `tokenizer_2`) pads with "!".
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def write_clip_tokenizer(folder: Path, tokenizer) -> None:
    """Swap the tokenizer.json that `save_pretrained` wrote into `folder` for the vocab.json +
    merges.txt layout of the released SD/SDXL/FLUX.1 tokenizer folders, so a tiny folder goes
    through the same loading path as a real one."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in model["merges"])
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    special = {name: str(getattr(tokenizer, name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def tiny_clip_text_config(tokenizer, **overrides):
    """A 2-layer CLIP text config of width 32 (projection 32) for `tokenizer`'s vocabulary and
    special ids. Two layers, so that the penultimate hidden state SD/SDXL read is a real layer."""
    from transformers import CLIPTextConfig

    config = dict(
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
    return CLIPTextConfig(**{**config, **overrides})


def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary learned from CORPUS.

    The ids follow CLIP's order: bytes, bytes + "</w>", merges, then the two special tokens.
    The merges are learned here rather than by `tokenizers`' BpeTrainer, whose tie-breaking
    changes from run to run.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and pre-tokeniser
    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS.splitlines():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1

    merges = _learn_merges(words, _CLIP_MERGES)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(a + "</w>" for a in alphabet), *("".join(m) for m in merges), CLIP_BOS, CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _learn_merges(words: Counter[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Up to `count` BPE merges of `words` (symbol tuples with their counts), the most frequent pair first and
    ties broken by the pair itself, so the result is the same on every run."""
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_pair(word, best): n for word, n in words.items()})
    return merges


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


def tiny_t5_tokenizer():
    """A T5 Unigram tokenizer (512 tokens) over the CORPUS words plus single characters.

    Ids follow T5's layout: <pad>=0, </s>=1, <unk>=2, the pieces, then <extra_id_99>..<extra_id_0>.
    Word scores are log-frequencies; characters score far lower so that known words stay whole
    and unknown ones fall back to characters.
    """
    from transformers import T5Tokenizer

    counts = Counter(re.findall(r"\w+|[^\w\s]", CORPUS))
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


LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|eot_id|>"
_LLAMA_MERGES = 300


def tiny_llama_tokenizer():
    """A Llama-3-style tokenizer (byte-level BPE, BOS added in front, as Meta-Llama-3.1-8B-Instruct's
    tokenizer.json) over merges learned from CORPUS, built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(tuple(piece) for line in CORPUS.splitlines() for piece, _ in pre.pre_tokenize_str(line))
    merges = _learn_merges(words, _LLAMA_MERGES)
    vocab: dict[str, int] = {}
    for token in [*sorted(pre_tokenizers.ByteLevel.alphabet()), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer, backend.decoder = pre, decoders.ByteLevel()
    backend.add_special_tokens([LLAMA_BOS, LLAMA_EOS])
    backend.post_processor = processors.TemplateProcessing(single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
                                                           special_tokens=[(LLAMA_BOS, len(vocab))])  # the id add_special_tokens gave it
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS,
                                   model_max_length=131072)


def tiny_llama_config(tokenizer, hidden_size: int, num_layers: int):
    """A Llama 3 decoder config (grouped-query attention, RoPE) of width `hidden_size` for `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def tiny_sentencepiece_model(vocab_size: int = 512) -> bytes:
    """A serialised SentencePiece BPE model (a `tokenizer.model` file) trained on CORPUS.

    <unk>=0, <s>=1, </s>=2, the 256 byte pieces, then the learned pieces, in which CORPUS words
    are whole: byte fallback lets any other text, Chinese included, encode without <unk>.
    One thread and identity normalisation keep the file small and the same on every run.
    """
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def tiny_t5_config(tokenizer, d_model: int):
    """A 2-layer T5 v1.1 encoder config (gated GELU, untied embeddings, as Flux's and SD3's T5-XXL) of width
    `d_model` for `tokenizer`'s vocabulary and special ids."""
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, quant_convs: bool = True):
    """A two-level AutoencoderKL (scale factor 2, upcast to fp32) with the released model's latent channels,
    scaling/shift factors and quant convs (SD/SDXL have them; Flux's and SD3's 16-channel VAEs do not)."""
    from diffusers import AutoencoderKL

    extra = {} if quant_convs else {"use_quant_conv": False, "use_post_quant_conv": False}
    if shift_factor is not None:
        extra["shift_factor"] = shift_factor
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
                         scaling_factor=scaling_factor, force_upcast=True, **extra)


def tiny_umt5_config(tokenizer, d_model: int):
    """A 2-layer UMT5 encoder config (gated GELU, untied embeddings, a relative-attention bias per layer, as
    google/umt5-xxl, Wan's text encoder) of width `d_model` for `tokenizer`'s vocabulary and special ids."""
    from transformers import UMT5Config

    return UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
