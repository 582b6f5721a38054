"""trainer lora convert / merge / inspect for Kolors: SDXL's tools on the UNet alone. kohya (ours; `comfy` means the
same) <-> diffusers layout, which KolorsPipeline's `load_lora_weights` applies with the trainer's outputs (the
projection of ChatGLM's states, conv layers and DoRA included); merge into a Kolors folder or its UNet file equals
the unmerged model."""
from __future__ import annotations

import pytest
import torch
from diffusers import KolorsPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.adapters.merge import adapter_modules, update

from .conftest import train_config
from .test_sdxl_e2e import unet_inputs
from .test_sdxl_lora_tools import trainer_unet

# every UNet Linear (encoder_hid_proj, time embeddings) and 3x3 conv, alpha != rank: what the files must carry exactly
EVERY_LAYER = {"linear": 4, "linear_alpha": 8, "conv": 2, "conv_alpha": 1, "transformer_only": False}


def kolors_inputs():
    return unet_inputs(text_len=16, text_dim=32)  # ChatGLM's width before encoder_hid_proj


@pytest.fixture(scope="module")
def runs(tiny_kolors, tmp_path_factory):
    import shutil

    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("kolors-lora")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    networks = {"lora": EVERY_LAYER, "dora": {**EVERY_LAYER, "type": "dora"}, "small": {"linear": 2, "linear_alpha": 1}}
    out = {}
    for kind, network in networks.items():
        cfg = train_config(tiny_kolors, data, tmp / kind, arch="kolors", steps=3, network=network, sample={"prompts": []},
                           train={"lr": 1e-2})
        (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main([str(tmp / f"{kind}.yaml")]) == 0
        out[kind] = tmp / kind / "test_lora"
    return out


def convert(path, layout, out, *extra) -> dict[str, torch.Tensor]:
    assert cli.main(["lora", "convert", str(path), "--to", layout, "-o", str(out), *extra]) == 0
    return load_file(out)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_layouts_round_trip_and_the_diffusers_one_loads_in_kolors_pipeline(kind, runs, tiny_kolors, tmp_path):
    kohya = runs[kind] / "test_lora.safetensors"
    original = load_file(kohya)
    comfy = convert(kohya, "comfy", tmp_path / "c.safetensors")
    diffusers = convert(kohya, "diffusers", tmp_path / "d.safetensors")
    back = convert(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors")
    # comfy is kohya's layout itself: ComfyUI's Kolors nodes apply lora_unet_<diffusers name>, encoder_hid_proj too
    assert comfy.keys() == original.keys() and all(torch.equal(comfy[k], v) for k, v in original.items())
    assert all(k.startswith("unet.") for k in diffusers) and "unet.encoder_hid_proj.lora_A.weight" in diffusers
    assert not any(k.endswith(".alpha") for k in diffusers)  # folded into lora_B: diffusers reads no alpha
    a, b = adapter_modules(original), adapter_modules(back)
    assert a.keys() == b.keys() and any(v["lora_A.weight"].dim() == 4 for v in a.values())
    for name in a:  # every module's update (and DoRA magnitude) survives kohya -> diffusers -> kohya
        torch.testing.assert_close(update(b[name]), update(a[name]), atol=1e-6, rtol=1e-5)
        if "dora_scale" in a[name]:
            torch.testing.assert_close(b[name]["dora_scale"], a[name]["dora_scale"])

    pipe = KolorsPipeline.from_pretrained(tiny_kolors, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**kolors_inputs())[0], trainer_unet(tiny_kolors, runs[kind], kind)(**kolors_inputs())[0],
                                   atol=1e-5, rtol=1e-5)


def test_merge_two_loras_into_a_kolors_folder(runs, tiny_kolors, tmp_path):
    first = runs["lora"] / "test_lora.safetensors"
    second = tmp_path / "small.diffusers.safetensors"  # merge reads any layout convert writes
    convert(runs["small"] / "test_lora.safetensors", "diffusers", second)
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(tiny_kolors), "--lora", str(first), "--strength", "0.7",
                     "--lora", str(second), "--strength", "0.5", "-o", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "text_encoder").is_dir() and (out / "tokenizer").is_dir()
    base = UNet2DConditionModel.from_pretrained(tiny_kolors, subfolder="unet", local_files_only=True).state_dict()
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet", local_files_only=True)
    assert not torch.equal(merged.state_dict()["encoder_hid_proj.weight"], base["encoder_hid_proj.weight"])

    # unmerged: both adapters live in diffusers' UNet at their strengths
    first_diffusers = tmp_path / "first.diffusers.safetensors"
    convert(first, "diffusers", first_diffusers)
    pipe = KolorsPipeline.from_pretrained(tiny_kolors, local_files_only=True)
    pipe.load_lora_weights(str(first_diffusers), adapter_name="first")
    pipe.load_lora_weights(str(second), adapter_name="second")
    pipe.unet.set_adapters(["first", "second"], weights=[0.7, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(merged(**kolors_inputs())[0], pipe.unet(**kolors_inputs())[0], atol=1e-5, rtol=1e-5)


def test_merge_into_a_kolors_unet_file(runs, tiny_kolors, tmp_path):
    single = tiny_kolors / "unet" / "diffusion_pytorch_model.safetensors"  # as Kolors ships it, and ComfyUI loads it
    out = tmp_path / "kolors-unet-merged.safetensors"
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(runs["dora"] / "test_lora.safetensors"),
                     "-o", str(out)]) == 0
    assert load_file(out).keys() == load_file(single).keys()
    unet = UNet2DConditionModel.from_pretrained(tiny_kolors, subfolder="unet", local_files_only=True)
    unet.load_state_dict(load_file(out))
    with torch.no_grad():
        torch.testing.assert_close(unet(**kolors_inputs())[0], trainer_unet(tiny_kolors, runs["dora"], "dora")(**kolors_inputs())[0],
                                   atol=1e-5, rtol=1e-5)


def test_kolors_errors_and_inspect(runs, tiny_kolors, tmp_path, capsys):
    kohya = load_file(runs["lora"] / "test_lora.safetensors")
    bare = tmp_path / "bare.safetensors"  # no metadata: inspect reads the architecture from the module names
    save_file(kohya, str(bare))
    assert inspect_file(bare).architecture == "kolors (from module names)"
    # ChatGLM LoRAs are neither trained nor read: an error naming the key, never silently dropped
    diffusers = convert(bare, "diffusers", tmp_path / "d.safetensors", "--arch", "kolors")
    for key, tensors in (("lora_te_encoder_layers_0_self_attention_dense.lora_down.weight", kohya),
                         ("text_encoder.encoder.layers.0.self_attention.dense.lora_A.weight", diffusers)):
        save_file({**tensors, key: torch.zeros(1, 32)}, str(tmp_path / "x.safetensors"))
        capsys.readouterr()
        assert cli.main(["lora", "convert", str(tmp_path / "x.safetensors"), "--to", "comfy", "-o",
                         str(tmp_path / "y.safetensors"), "--arch", "kolors"]) == 1
        assert f"{key}: not a Kolors LoRA key" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--base", str(tiny_kolors / "vae" / "diffusion_pytorch_model.safetensors"),
                     "--lora", str(bare), "--arch", "kolors", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "not a Kolors UNet" in capsys.readouterr().err
