import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.archs.kolors.tiny import build_tiny_kolors
from eridiffusion.archs.sdxl.tiny import build_tiny_sdxl

BUILDERS = {"sdxl": build_tiny_sdxl, "kolors": build_tiny_kolors}
WEIGHT_FILES = {
    "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"],
    "kolors": ["unet", "vae", "text_encoder"],
}
TOKENIZER_FILES = {
    "sdxl": ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"],
    "kolors": ["tokenizer/tokenizer.model"],
}


def _weights(root: Path, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(root / component / name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build(root / arch) for arch, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pipes(folders):
    from diffusers import KolorsPipeline, StableDiffusionXLPipeline

    return {
        "sdxl": StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], local_files_only=True),
        "kolors": KolorsPipeline.from_pretrained(folders["kolors"], local_files_only=True),
    }


def _generate(pipe, height=None, width=None):
    out = pipe(
        "a photo of a [trigger] cat, 一只猫",
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    )
    return out.images[0]


def test_sdxl_folder_is_the_diffusers_layout(folders):
    root = folders["sdxl"]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["force_zeros_for_empty_prompt"] is True
    # both tokenizers as in stable-diffusion-xl-base-1.0: vocab.json + merges.txt, no tokenizer.json
    for name in ("tokenizer", "tokenizer_2"):
        files = {p.name for p in (root / name).iterdir()}
        assert files == {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}


def test_kolors_folder_is_the_diffusers_layout(folders):
    root = folders["kolors"]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "KolorsPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["kolors", "ChatGLMModel"]
    assert index["tokenizer"] == ["kolors", "ChatGLMTokenizer"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["image_encoder"] == index["feature_extractor"] == [None, None]
    assert index["force_zeros_for_empty_prompt"] is False
    assert (root / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.parametrize("arch", BUILDERS)
def test_small_with_all_weights(folders, arch):
    root = folders[arch]
    for component in WEIGHT_FILES[arch]:
        assert _weights(root, component), component
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 5 * 2**20


@pytest.mark.parametrize("arch", BUILDERS)
def test_pipeline_loads_offline_and_generates(pipes, arch):
    pipe = pipes[arch]
    assert pipe.vae_scale_factor == 2
    assert _generate(pipe).size == (32, 32)  # unet sample_size 16 x vae scale factor 2
    assert _generate(pipe, 32, 32).size == (32, 32)
    assert _generate(pipe, 48, 64).size == (64, 48)  # PIL size is (width, height)
    # the VAE halves the size once and the UNet twice, as the pipeline's multiple-of-8 check assumes
    levels = len(pipe.unet.config.block_out_channels)
    assert pipe.vae_scale_factor * 2 ** (levels - 1) == 8


def test_sdxl_config_numbers(pipes):
    pipe = pipes["sdxl"]
    unet, vae = pipe.unet.config, pipe.vae.config
    te, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert (vae.latent_channels, vae.scaling_factor, vae.force_upcast) == (4, 0.13025, True)
    assert (unet.in_channels, unet.out_channels, unet.sample_size) == (4, 4, 16)
    assert (te.hidden_size, te2.hidden_size, te2.projection_dim) == (32, 32, 32)
    assert (te.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size == 64
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim == 80
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end) == (1000, 0.00085, 0.012)
    assert (sched.beta_schedule, sched.timestep_spacing, sched.steps_offset) == ("scaled_linear", "leading", 1)
    assert sched.prediction_type == "epsilon"


def test_kolors_config_numbers(pipes):
    pipe = pipes["kolors"]
    unet, te = pipe.unet.config, pipe.text_encoder.config
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor) == (4, 0.13025)
    assert te.hidden_size == 32 and te.num_layers == 2
    assert te.padded_vocab_size >= pipe.tokenizer.vocab_size
    assert (unet.encoder_hid_dim_type, unet.encoder_hid_dim) == ("text_proj", te.hidden_size)
    assert unet.cross_attention_dim == 64
    assert unet.projection_class_embeddings_input_dim == te.hidden_size + 6 * unet.addition_time_embed_dim == 80
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end) == (1100, 0.00085, 0.014)
    assert (sched.beta_schedule, sched.timestep_spacing, sched.steps_offset) == ("scaled_linear", "leading", 1)


def test_sdxl_unet_has_3x3_convs_and_linear_attention(pipes):
    modules = dict(pipes["sdxl"].unet.named_modules())
    convs = [m for m in modules.values() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) > 10
    assert modules["down_blocks.0.resnets.0.conv1"].kernel_size == (3, 3)
    attn = [name for name in modules if name.endswith((".to_q", ".to_k", ".to_v", ".proj_in", ".proj_out"))]
    assert attn and all(type(modules[name]) is torch.nn.Linear for name in attn)
    to_k = modules["down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k"]
    assert (to_k.in_features, to_k.out_features) == (64, 32)  # text width -> the level's channels
    assert "mid_block.attentions.0.transformer_blocks.1.attn1.to_q" in modules


def test_tokenizers(folders, pipes):
    from transformers import AutoTokenizer

    root = folders["sdxl"]
    clip, clip_2 = (AutoTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2"))
    assert type(clip).__name__ == type(clip_2).__name__ == "CLIPTokenizer"
    assert (clip.pad_token, clip_2.pad_token) == ("<|endoftext|>", "!")  # as OpenAI CLIP and OpenCLIP bigG
    ids = clip_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert clip_2.convert_ids_to_tokens(ids[0, :7].tolist()) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>",
    ]
    assert ids[0, -1] == clip_2.pad_token_id == 0
    sdxl = pipes["sdxl"]
    assert len(clip) == sdxl.text_encoder.config.vocab_size == sdxl.text_encoder_2.config.vocab_size

    glm = pipes["kolors"].tokenizer
    ids = glm(["a photo of a cat", "一只猫"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert glm.convert_ids_to_tokens(ids[0].tolist())[-7:] == ["[gMASK]", "sop", "▁a", "▁photo", "▁of", "▁a", "▁cat"]
    assert ids[0, 0] == glm.pad_token_id  # ChatGLM pads on the left
    assert glm.tokenizer.sp_model.unk_id() not in ids[1, -9:].tolist()  # byte fallback, no <unk>


def test_v_prediction_variant(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl(tmp_path / "sdxl-v", prediction_type="v_prediction")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert _generate(pipe, 32, 32).size == (32, 32)


@pytest.mark.parametrize("arch", BUILDERS)
def test_same_seed_same_files_other_seed_other_weights(folders, tmp_path, arch):
    build = BUILDERS[arch]
    rng = torch.get_rng_state()
    start = time.perf_counter()
    again = build(tmp_path / "again")
    assert time.perf_counter() - start < 5.0
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    other = build(tmp_path / "other", seed=1)
    for component in WEIGHT_FILES[arch]:
        a, b, c = (_weights(root, component) for root in (folders[arch], again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component
        assert not all(torch.equal(a[k], c[k]) for k in a), component
    for name in TOKENIZER_FILES[arch]:
        assert (folders[arch] / name).read_bytes() == (again / name).read_bytes(), name


def test_sdxl_text_encoders_differ(folders):
    # same shapes, one seed: they must still not be copies of each other
    te, te2 = (_weights(folders["sdxl"], name) for name in ("text_encoder", "text_encoder_2"))
    # transformers 5 saves CLIPTextModel without the "text_model." prefix that the released files have
    embedding = [next(v for k, v in w.items() if k.endswith("token_embedding.weight")) for w in (te, te2)]
    assert embedding[0].shape == embedding[1].shape
    assert not torch.equal(*embedding)
