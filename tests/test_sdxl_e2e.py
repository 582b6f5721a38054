"""End to end on a tiny random-weight SDXL: the CLI trains (eps and v-prediction) with the loss falling,
and the kohya-format file (UNet attention + conv LoRA, both text encoders) loads in diffusers'
StableDiffusionXLPipeline with every tensor applied, reproducing the trainer's own outputs."""
from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config

SAMPLE = {"sampler": "euler_a", "width": 32, "height": 32, "guidance_scale": 5.0, "neg": "blurry",
          "prompts": ["[trigger] a red circle"], "sample_every": 1000}


def unet_inputs(text_len: int, text_dim: int) -> dict:
    """Fixed inputs for a tiny SDXL-style UNet forward (32x32 pixels, 8x8 latents)."""
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, text_len, text_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])},
                return_dict=False)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["eps", "v"])
def test_sdxl_trains_and_the_loss_falls(variant, tiny_sdxl, tiny_sdxl_v, dataset, tmp_path, write_config):
    model = tiny_sdxl if variant == "eps" else tiny_sdxl_v
    cfg = train_config(model, dataset, tmp_path / "out", arch="sdxl", steps=80, sample=SAMPLE, save={"save_every": 1000},
                       train={"lr": 1e-2}, network={"linear": 8, "linear_alpha": 8, "conv": 8, "conv_alpha": 8})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    values = losses(run)
    assert sum(values[-20:]) / 20 < 0.8 * sum(values[:20]) / 20
    assert len(list((run / "samples").iterdir())) == 2  # step 0 and the end


def test_v_prediction_comes_from_the_scheduler_or_the_flag(tiny_sdxl, tiny_sdxl_v, dataset, tmp_path):
    from eridiffusion.archs.sdxl import SDXL
    from eridiffusion.config import parse_config

    def prediction_type(model, **model_keys):
        cfg = train_config(model, dataset, tmp_path, arch="sdxl", model=model_keys)
        arch = SDXL(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
        arch.load()
        return arch.prediction_type

    assert prediction_type(tiny_sdxl) == "epsilon"
    assert prediction_type(tiny_sdxl_v) == "v_prediction"
    assert prediction_type(tiny_sdxl, is_v_pred=True) == "v_prediction"


def test_kohya_file_loads_in_diffusers_and_matches_the_trainer(tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=4, sample=SAMPLE,
                       network={"linear": 4, "linear_alpha": 2, "conv": 2, "conv_alpha": 1},
                       train={"lr": 1e-2, "train_text_encoder": True, "text_encoder_lr": 5e-3, "cache_text_embeddings": False})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    saved = load_file(run / "test_lora.safetensors")
    assert all(re.fullmatch(r"lora_(unet|te1|te2)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in saved)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in saved)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in saved)
    conv_down = [v for k, v in saved.items() if k.startswith("lora_unet") and k.endswith("lora_down.weight") and v.dim() == 4]
    assert conv_down and all(v.shape[0] == 2 for v in conv_down)  # conv LoRA at its own rank

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(run / "test_lora.safetensors")
    n_modules = len({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in saved})
    loaded = [k for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for k in m.state_dict() if ".lora_A." in k]
    assert len(loaded) == n_modules  # every module of the file has a LoRA in the pipeline

    state = load_state(latest_state(run))["lora"]
    ours = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    conv = sorted({k.rsplit(".lora_", 1)[0] for k, v in state["unet"].items() if v.dim() == 4})
    linear = sorted({k.rsplit(".lora_", 1)[0] for k in state["unet"]} - set(conv))
    inject_lora(ours, linear, LoraSpec(rank=4, alpha=2), conv_targets=conv, conv_spec=LoraSpec(rank=2, alpha=1))
    load_lora_state(ours, state["unet"])
    kw = unet_inputs(text_len=77, text_dim=64)
    with torch.no_grad():
        expected, got = ours(**kw)[0], pipe.unet(**kw)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # the text encoders too: our encoding with the trained LoRA equals diffusers' after load_lora_weights
    from eridiffusion.archs.sdxl import SDXL
    from eridiffusion.config import parse_config

    arch = SDXL(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    for key, te in (("te1", arch.text_encoders[0]), ("te2", arch.text_encoders[1])):
        names = sorted({k.rsplit(".lora_", 1)[0] for k in state[key]})
        inject_lora(te, names, LoraSpec(rank=4, alpha=2))
        load_lora_state(te, state[key])
    with torch.no_grad():
        ours_text = arch.encode_prompts(["a red circle"])
        embeds, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ours_text["prompt_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ours_text["pooled_prompt_embeds"], atol=1e-5, rtol=1e-5)


def test_fp16_keeps_the_vae_in_fp32(tiny_sdxl, dataset, tmp_path):
    from eridiffusion.archs.sdxl import SDXL
    from eridiffusion.config import parse_config

    def vae_dtype(**model_keys):
        cfg = train_config(tiny_sdxl, dataset, tmp_path, arch="sdxl", model=model_keys, train={"dtype": "fp16"})
        arch = SDXL(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float16)
        arch.load()
        return arch.vae.dtype, arch.unet.dtype

    assert vae_dtype() == (torch.float32, torch.float16)
    assert vae_dtype(vae_dtype="bf16") == (torch.bfloat16, torch.float16)


def test_flow_settings_are_refused_for_sdxl(tiny_sdxl, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", train={"noise_scheduler": "flowmatch"})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "noise-prediction model" in capsys.readouterr().err


def test_kolors_trains_and_its_file_loads_in_diffusers(tmp_path_factory, dataset, tmp_path, write_config):
    from diffusers import KolorsPipeline

    from eridiffusion.archs.kolors.tiny import build_tiny_kolors

    model = build_tiny_kolors(tmp_path_factory.mktemp("models") / "tiny-kolors")
    cfg = train_config(model, dataset, tmp_path / "out", arch="kolors", steps=4, sample=SAMPLE, train={"lr": 1e-2})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    saved = load_file(run / "test_lora.safetensors")
    assert saved and all(k.startswith("lora_unet_") for k in saved)
    assert len(list((run / "samples").iterdir())) == 2

    pipe = KolorsPipeline.from_pretrained(model, local_files_only=True)
    pipe.load_lora_weights(run / "test_lora.safetensors")
    state = load_state(latest_state(run))["lora"]["unet"]
    ours = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    inject_lora(ours, sorted({k.rsplit(".lora_", 1)[0] for k in state}), LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, state)
    kw = unet_inputs(text_len=16, text_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**kw)[0], ours(**kw)[0], atol=1e-5, rtol=1e-5)


def test_fp16_training_with_loss_scaling(tiny_sdxl, dataset, tmp_path, write_config):
    import math

    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3, sample={"prompts": []},
                       train={"dtype": "fp16", "lr": 1e-3})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert all(math.isfinite(v) for v in losses(run))
    assert load_state(latest_state(run))["scaler"]["scale"] > 0  # the GradScaler's state is part of the checkpoint
    cached = list((dataset / "_latent_cache").iterdir())
    assert cached and all(torch.isfinite(t).all() for f in cached for t in load_file(f).values())


def test_diffusers_layout_copy_loads_like_the_kohya_file(tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3, sample={"prompts": []},
                       network={"linear": 4, "linear_alpha": 2, "conv": 2, "conv_alpha": 1},
                       save={"diffusers_lora": True, "save_every": 2, "max_step_saves_to_keep": 1},
                       train={"lr": 1e-2, "train_text_encoder": True, "cache_text_embeddings": False})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert (run / "test_lora_000000002.diffusers.safetensors").is_file()
    outputs = []
    for name in ("test_lora.safetensors", "test_lora.diffusers.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
        pipe.load_lora_weights(run / name)
        kw = unet_inputs(text_len=77, text_dim=64)
        with torch.no_grad():
            outputs.append((pipe.unet(**kw)[0], pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)[0]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-5, rtol=1e-5)
