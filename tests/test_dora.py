"""network.type: dora on Flux and SDXL: it learns; the file carries ComfyUI's `.dora_scale` (out, 1) that
reproduces the trainer's weights by ComfyUI's own formula; our loader and diffusers (through the
`save.diffusers_lora` copy, peft layout) give the trainer's outputs."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_file_state, load_lora_state
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log
from .test_quant import inputs


def dora_weight(weight, down, up, alpha, dora_scale, comfy: bool):
    """W' = W + (alpha/r)·up@down with its rows rescaled to dora_scale: LyCORIS (and peft, ai-toolkit) divide by
    the rows' norms of W', ComfyUI and Forge (weight_decompose, output axis) by those of the base weight W."""
    calc = weight + (alpha / down.shape[0]) * (up @ down)
    return calc * (dora_scale / (weight if comfy else calc).norm(dim=1, keepdim=True))


@pytest.fixture(scope="module")
def flux_dora_run(tiny_flux, tmp_path_factory):
    import shutil

    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("dora")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    cfg = train_config(tiny_flux, data, tmp / "out", steps=20, network={"type": "dora", "linear": 4, "linear_alpha": 8},
                       train={"lr": 3e-3, "batch_size": 4}, save={"save_every": 20, "diffusers_lora": True})
    cfg["config"]["process"][0]["sample"] = None
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main([str(tmp / "c.yaml")]) == 0
    return tmp / "out" / "test_lora"


def test_flux_dora_learns_and_writes_comfyui_dora_scale(flux_dora_run, tiny_flux):
    losses = [r["loss"] for r in read_log(flux_dora_run)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    path = flux_dora_run / "test_lora.safetensors"
    saved = load_file(path)
    modules = {k.rsplit(".lora_A", 1)[0] for k in saved if ".lora_A." in k}
    assert modules and {k.rsplit(".dora_scale", 1)[0] for k in saved if k.endswith(".dora_scale")} == modules
    assert not any("magnitude" in k for k in saved)
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    state = load_state(latest_state(flux_dora_run))["lora"]["transformer"]
    for module in sorted(modules)[:6]:
        name = module[len("transformer."):]
        weight = base.get_submodule(name).weight.detach()
        scale = saved[f"{module}.dora_scale"]
        assert scale.shape == (weight.shape[0], 1)
        args = (weight, saved[f"{module}.lora_A.weight"], saved[f"{module}.lora_B.weight"], float(saved[f"{module}.alpha"]), scale)
        calc = weight + 2.0 * state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        peft = calc * (state[f"{name}.lora_magnitude_vector"] / calc.norm(dim=1)).unsqueeze(1)
        # the file read by LyCORIS's formula is the trainer's weight exactly
        torch.testing.assert_close(dora_weight(*args, comfy=False), peft, atol=1e-5, rtol=1e-5)
        # ComfyUI's normalises by the base rows instead: off by the LoRA's change of each row's norm
        comfy, change = dora_weight(*args, comfy=True), (calc.norm(dim=1) / weight.norm(dim=1) - 1).abs().max()
        assert (comfy - peft).norm() / peft.norm() <= change + 1e-6
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] is True
    assert inspect_file(path).adapter == "dora"


def test_flux_dora_file_gives_the_trainers_outputs_in_ours_and_diffusers(flux_dora_run, tiny_flux):
    state = load_state(latest_state(flux_dora_run))["lora"]["transformer"]
    modules = sorted({k.rsplit(".lora_A", 1)[0] for k in state if ".lora_A." in k})

    def with_lora(tensors, load=load_lora_state):
        model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
        inject_lora(model, modules, LoraSpec(rank=4, alpha=8, kind="dora"))
        load(model, tensors)
        return model

    from eridiffusion.archs.flux import Flux

    trainer = with_lora(state)
    file_state = Flux.lora_from_file(None, load_file(flux_dora_run / "test_lora.safetensors"))["transformer"]
    from_file = with_lora(file_state, load_lora_file_state)
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.load_lora_weights(str(flux_dora_run / "test_lora.diffusers.safetensors"))
    with torch.no_grad():
        expected = trainer(**inputs())[0]
        plain = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)(**inputs())[0]
        assert not torch.allclose(expected, plain, atol=1e-4)
        torch.testing.assert_close(from_file(**inputs())[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.transformer(**inputs())[0], expected, atol=1e-5, rtol=1e-5)


def test_sdxl_dora_kohya_file(tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3,
                       network={"type": "dora", "linear": 4, "linear_alpha": 8, "conv": 2, "conv_alpha": 1})
    assert cli.main([str(write_config(cfg))]) == 0
    saved = load_file(tmp_path / "out" / "test_lora" / "test_lora.safetensors")
    downs = {k.rsplit(".lora_down", 1)[0]: v for k, v in saved.items() if ".lora_down." in k}
    scales = {k.rsplit(".dora_scale", 1)[0]: v for k, v in saved.items() if k.endswith(".dora_scale")}
    assert downs.keys() == scales.keys() and all(k.startswith("lora_unet_") for k in downs)
    ups = {k.rsplit(".lora_up", 1)[0]: v for k, v in saved.items() if ".lora_up." in k}
    for module, scale in scales.items():  # (out, 1) for Linear, (out, 1, 1, 1) for conv
        assert scale.shape == (ups[module].shape[0], *[1] * (ups[module].dim() - 1))
    assert any(v.dim() == 4 for v in scales.values())
    # the file read back through our loader reproduces the trainer's UNet output, conv DoRA included
    from eridiffusion.archs.sdxl import SDXL
    from eridiffusion.config import parse_config

    from .test_sdxl_e2e import unet_inputs

    state = load_state(latest_state(tmp_path / "out" / "test_lora"))["lora"]["unet"]
    linear = sorted({k.rsplit(".lora_A", 1)[0] for k in state if ".lora_A." in k and state[k].dim() == 2})
    conv = sorted({k.rsplit(".lora_A", 1)[0] for k in state if ".lora_A." in k and state[k].dim() == 4})

    def unet_with(tensors_of, load):
        arch = SDXL(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
        arch.load()
        inject_lora(arch.unet, linear, LoraSpec(4, 8, kind="dora"), conv_targets=conv, conv_spec=LoraSpec(2, 1, kind="dora"))
        load(arch.unet, tensors_of(arch))
        return arch.unet

    kw = unet_inputs(text_len=77, text_dim=64)
    with torch.no_grad():
        expected = unet_with(lambda arch: state, load_lora_state)(**kw)[0]
        got = unet_with(lambda arch: arch.lora_from_file(saved)["unet"], load_lora_file_state)(**kw)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
