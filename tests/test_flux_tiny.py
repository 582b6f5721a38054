import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.archs.flux.tiny import build_tiny_flux
from eridiffusion.demo import DEMO_DATA_DIR

WEIGHT_FILES = [
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_dir, local_files_only=True)


def _generate(pipe, height, width):
    out = pipe(
        "a photo of a [trigger] cat",
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    )
    return out.images[0]


def test_folder_is_the_diffusers_layout(flux_dir):
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    for name in WEIGHT_FILES:
        assert (flux_dir / name).is_file(), name
    # tokenizer/ as in FLUX.1-dev: vocab.json + merges.txt, no tokenizer.json
    assert {p.name for p in (flux_dir / "tokenizer").iterdir()} == {
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    }
    assert (flux_dir / "tokenizer_2" / "tokenizer.json").is_file()
    assert sum(p.stat().st_size for p in flux_dir.rglob("*") if p.is_file()) < 5 * 2**20


def test_pipeline_loads_offline_and_generates(pipe):
    assert pipe.vae_scale_factor == 2
    assert _generate(pipe, 32, 32).size == (32, 32)
    assert _generate(pipe, 48, 64).size == (64, 48)  # PIL size is (width, height)


def test_config_numbers(pipe):
    vae, transformer = pipe.vae.config, pipe.transformer.config
    assert vae.latent_channels == 4
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert transformer.in_channels == 4 * vae.latent_channels
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model == 32
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size == 32
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.guidance_embeds
    sched = pipe.scheduler.config
    assert sched.use_dynamic_shifting and sched.shift == 3.0
    assert (sched.base_shift, sched.max_shift) == (0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)


def test_tokenizers_load_through_autotokenizer(flux_dir, pipe):
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(flux_dir / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(flux_dir / "tokenizer_2")
    assert type(clip).__name__ == "CLIPTokenizer"
    assert type(t5).__name__ == "T5Tokenizer"
    config = json.loads((flux_dir / "tokenizer" / "tokenizer_config.json").read_text())
    config_2 = json.loads((flux_dir / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config_2["tokenizer_class"]) == ("CLIPTokenizer", "T5Tokenizer")

    ids = clip(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (1, 77)
    assert clip.convert_ids_to_tokens(ids.input_ids[0, :3].tolist()) == ["<|startoftext|>", "a</w>", "photo</w>"]
    assert (clip.bos_token, clip.eos_token, clip.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert clip.model_max_length == 77
    assert len(clip) == pipe.text_encoder.config.vocab_size
    assert clip.eos_token_id == pipe.text_encoder.config.eos_token_id

    ids = t5(["a photo of a cat"], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (1, 512)
    assert t5.convert_ids_to_tokens(ids.input_ids[0, :6].tolist()) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids("<extra_id_0>") == len(t5) - 1
    assert len(t5) == pipe.text_encoder_2.config.vocab_size


def test_same_seed_same_files_other_seed_other_weights(flux_dir, tmp_path):
    rng = torch.get_rng_state()
    start = time.perf_counter()
    again = build_tiny_flux(tmp_path / "again")
    assert time.perf_counter() - start < 5.0
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    other = build_tiny_flux(tmp_path / "other", seed=1)
    for name in WEIGHT_FILES:
        a, b, c = (load_file(root / name) for root in (flux_dir, again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name
    for name in ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/tokenizer.json"]:
        assert (flux_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_options_reach_the_transformer(tmp_path):
    from diffusers import FluxPipeline

    folder = build_tiny_flux(tmp_path / "flux", guidance_embeds=False, num_layers=2, num_single_layers=3)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    config = pipe.transformer.config
    assert (config.guidance_embeds, config.num_layers, config.num_single_layers) == (False, 2, 3)
    assert _generate(pipe, 32, 32).size == (32, 32)


def test_demo_data_has_captioned_images():
    images = sorted(p for p in DEMO_DATA_DIR.iterdir() if p.suffix in {".png", ".jpg", ".webp"})
    assert len(images) >= 8
    assert {p.suffix for p in images} == {".png", ".jpg", ".webp"}
    sizes = set()
    for path in images:
        with Image.open(path) as image:
            sizes.add(image.size)
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption, path
    assert {(64, 64), (96, 64), (64, 96)} <= sizes
    captions = [p.with_suffix(".txt").read_text() for p in images]
    assert sum("[trigger]" in c for c in captions) >= 2
    assert sum(p.stat().st_size for p in DEMO_DATA_DIR.iterdir()) < 200 * 1024


@pytest.mark.parametrize("h,w", [(4, 6), (64, 48)])
def test_position_ids_made_on_the_device_are_diffusers_own(h, w):
    from diffusers import FluxPipeline

    from eridiffusion.archs.common import latent_image_ids

    for dtype in (torch.float32, torch.bfloat16):
        ours = latent_image_ids(h, w, torch.device("cpu"), dtype)
        assert ours.dtype == dtype and torch.equal(ours, FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", dtype))
