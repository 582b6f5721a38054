"""trainer lora convert / merge for SDXL: kohya (ours, what ComfyUI applies) <-> diffusers layout, which
diffusers' own loader applies with the trainer's outputs (LoRA with conv layers, DoRA); merge into a diffusers
folder equals the unmerged model."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.adapters.merge import adapter_modules, update
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import sgm_single_file, train_config
from .test_sdxl_e2e import unet_inputs


def trainer_unet(tiny_sdxl, run, kind):
    state = load_state(latest_state(run))["lora"]["unet"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    conv = sorted({k.rsplit(".lora_", 1)[0] for k, v in state.items() if ".lora_A." in k and v.dim() == 4})
    linear = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k} - set(conv))
    inject_lora(unet, linear, LoraSpec(4, 8, kind=kind), conv_targets=conv, conv_spec=LoraSpec(2, 1, kind=kind))
    load_lora_state(unet, state)
    return unet


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_kohya_to_diffusers_loads_in_diffusers_and_converts_back(kind, tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3,
                       network={"type": kind, "linear": 4, "linear_alpha": 8, "conv": 2, "conv_alpha": 1})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    kohya, diff, back = run / "test_lora.safetensors", tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert cli.main(["lora", "convert", str(kohya), "--to", "diffusers", "-o", str(diff)]) == 0
    assert cli.main(["lora", "convert", str(diff), "--to", "kohya", "-o", str(back)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(str(diff))
    kw = unet_inputs(text_len=77, text_dim=64)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**kw)[0], trainer_unet(tiny_sdxl, run, kind)(**kw)[0], atol=1e-5, rtol=1e-5)
    # kohya -> diffusers -> kohya: every module's update (and DoRA magnitude) unchanged
    a, b = adapter_modules(load_file(kohya)), adapter_modules(load_file(back))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(update(b[name]), update(a[name]), atol=1e-6, rtol=1e-5)
        if "dora_scale" in a[name]:
            torch.testing.assert_close(b[name]["dora_scale"], a[name]["dora_scale"])


def test_merge_into_an_sdxl_folder(tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3,
                       network={"linear": 4, "linear_alpha": 8, "conv": 2, "conv_alpha": 1})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(tiny_sdxl), "--lora", str(run / "test_lora.safetensors"),
                     "-o", str(out)]) == 0
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet", local_files_only=True)
    kw = unet_inputs(text_len=77, text_dim=64)
    with torch.no_grad():
        torch.testing.assert_close(merged(**kw)[0], trainer_unet(tiny_sdxl, run, "lora")(**kw)[0], atol=1e-5, rtol=1e-5)
    assert (out / "vae" / "config.json").is_file() and (out / "tokenizer").is_dir()


def test_merge_into_an_sdxl_single_file(tiny_sdxl, dataset, tmp_path, write_config):
    single = sgm_single_file(tiny_sdxl, tmp_path / "sdxl-tiny.safetensors")
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3,
                       network={"linear": 4, "linear_alpha": 8, "conv": 2, "conv_alpha": 1})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    out = tmp_path / "merged.safetensors"
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(run / "test_lora.safetensors"), "-o", str(out)]) == 0
    merged, original = load_file(out), load_file(single)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], v) for k, v in original.items() if k.startswith("first_stage_model."))  # VAE untouched
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(tiny_sdxl), subfolder="unet", local_files_only=True)
    kw = unet_inputs(text_len=77, text_dim=64)
    with torch.no_grad():
        torch.testing.assert_close(unet(**kw)[0], trainer_unet(tiny_sdxl, run, "lora")(**kw)[0], atol=1e-5, rtol=1e-5)
