"""trainer lora convert / merge / inspect for SD 3.5 on the tiny model: our file (diffusers names, alpha folded) <->
ComfyUI's generic `diffusion_model.<SAI name>` (q/k/v fused into qkv) <-> kohya-style `lora_transformer_`, the same
updates every way; the SAI-named file applied to the SAI weights (as ComfyUI patches them) gives the trainer's
outputs; diffusers reads the converted DoRA; merge into a diffusers folder and into a SAI single file."""
from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.adapters.merge import adapter_modules, merge_into, update
from eridiffusion.archs.sd3 import read_lora
from eridiffusion.archs.sd3.formats import PREFIX, diffusers_to_sai, load_sd3_single_file, open_file, sai_to_diffusers
from eridiffusion.archs.sd3.tiny import write_tiny_sd3_single_file
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config

# every transformer Linear (embedders, the final norm whose rows SAI swaps), alpha != rank
NETWORKS = {"lora": {"linear": 4, "linear_alpha": 8, "transformer_only": False},
            "dora": {"linear": 4, "linear_alpha": 8, "type": "dora"}}


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 12, 64, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]), return_dict=False)


@pytest.fixture(scope="module")
def runs(tiny_sd3, tmp_path_factory):
    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("sd3-lora")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    out = {}
    for kind, network in NETWORKS.items():
        cfg = train_config(tiny_sd3, data, tmp / kind, arch="sd3", steps=3, network=network, sample={"prompts": []},
                           train={"lr": 1e-2})
        (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main([str(tmp / f"{kind}.yaml")]) == 0
        out[kind] = tmp / kind / "test_lora"
    return out


def trainer_transformer(tiny_sd3, run, kind) -> SD3Transformer2DModel:
    state = load_state(latest_state(run))["lora"]["transformer"]
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    model = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    inject_lora(model, modules, LoraSpec(rank=4, alpha=8, kind=kind))
    load_lora_state(model, state)
    return model.eval()


def convert(path, layout, out, *extra) -> dict[str, torch.Tensor]:
    assert cli.main(["lora", "convert", str(path), "--to", layout, "-o", str(out), *extra]) == 0
    return load_file(out)


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_layouts_round_trip_and_apply_as_trained(kind, runs, tiny_sd3, tmp_path, capsys):
    ours = runs[kind] / "test_lora.safetensors"
    if kind == "dora":  # the last block's context q has no LoRA (its output is dropped): a fused DoRA would need the
        # base weights for that part's magnitudes. ComfyUI applies our file and the kohya-style one in full
        assert cli.main(["lora", "convert", str(ours), "--to", "comfy", "-o", str(tmp_path / "c.safetensors")]) == 1
        assert "DoRA on only some of its fused parts" in capsys.readouterr().err
        shutil.copy(ours, tmp_path / "c.safetensors")
    else:
        comfy = convert(ours, "comfy", tmp_path / "c.safetensors")
        assert all(k.startswith("diffusion_model.") and "transformer_blocks" not in k for k in comfy)  # SAI's names
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight" in comfy  # q, k, v as one fused LoRA
    kohya = convert(tmp_path / "c.safetensors", "kohya", tmp_path / "k.safetensors")
    diffusers = convert(tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors")
    assert all(k.startswith("lora_transformer_") for k in kohya) and not any(k.endswith(".alpha") for k in diffusers)

    # every module's update survives ours -> comfy -> kohya -> diffusers
    a, b = adapter_modules(read_lora(load_file(ours))), adapter_modules(read_lora(diffusers))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(update(b[name]), update(a[name]), atol=1e-6, rtol=1e-5)

    expected = trainer_transformer(tiny_sd3, runs[kind], kind)
    with torch.no_grad():
        want = expected(**inputs())[0]
    if kind == "lora":  # sd-scripts' `lora_unet_<SAI name>` is read too
        from eridiffusion.adapters.kohya import to_kohya

        sai_named = {k[len("diffusion_model."):]: v for k, v in comfy.items()}
        alphas = {k[: -len(".alpha")]: float(v) for k, v in sai_named.items() if k.endswith(".alpha")}
        sd_scripts = read_lora(to_kohya({k: v for k, v in sai_named.items() if not k.endswith(".alpha")}, alphas, "lora_unet"))
        c = adapter_modules(sd_scripts)
        assert c.keys() == a.keys() and all(torch.allclose(update(c[n]), update(a[n]), atol=1e-6) for n in a)
        # ComfyUI's way: the SAI-named file's updates added to the SAI weights it names (its generic `diffusion_model.`
        # rule reads `<module>.weight` of the model's state dict); the result, back in diffusers' names, is the trainer
        sai = diffusers_to_sai(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True).state_dict())
        comfy_state = {k[len("diffusion_model."):]: v for k, v in comfy.items()}
        assert {m for m in adapter_modules(comfy_state)} <= {k.rsplit(".", 1)[0] for k in sai}
        merge_into(sai, comfy_state)
        patched = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
        patched.load_state_dict(sai_to_diffusers(sai, patched.config.num_layers))
        with torch.no_grad():
            torch.testing.assert_close(patched(**inputs())[0], want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # diffusers reads the diffusers layout, DoRA magnitudes included
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
        pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
        torch.testing.assert_close(pipe.transformer(**inputs())[0], want, atol=1e-5, rtol=1e-5)


def test_merge_into_a_folder_and_into_a_sai_single_file(runs, tiny_sd3, tmp_path):
    lora = runs["lora"] / "test_lora.safetensors"
    with torch.no_grad():
        want = trainer_transformer(tiny_sd3, runs["lora"], "lora")(**inputs())[0]
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(tiny_sd3), "--lora", str(lora), "-o", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "text_encoder_3").is_dir()
    merged = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs())[0], want, atol=1e-5, rtol=1e-5)

    single = write_tiny_sd3_single_file(tiny_sd3, tmp_path / "sd3.5_medium.safetensors", text_encoders=True)
    out = tmp_path / "sd3.5_medium_merged.safetensors"
    comfy = tmp_path / "comfy.safetensors"  # merge reads any layout convert writes
    convert(lora, "comfy", comfy)
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(comfy), "-o", str(out), "--arch", "sd3"]) == 0
    before, after = load_file(single), load_file(out)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(PREFIX))  # VAE, text encoders
    model = load_sd3_single_file(open_file(out), out, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs())[0], want, atol=1e-5, rtol=1e-5)


def test_inspect_and_errors(runs, tiny_sd3, tmp_path, capsys):
    ours = load_file(runs["lora"] / "test_lora.safetensors")
    assert inspect_file(runs["lora"] / "test_lora.safetensors").architecture == "sd3 (from metadata eri_arch)"
    convert(runs["lora"] / "test_lora.safetensors", "comfy", tmp_path / "c.safetensors")
    save_file(load_file(tmp_path / "c.safetensors"), str(tmp_path / "bare.safetensors"))  # no metadata: read from names
    report = inspect_file(tmp_path / "bare.safetensors")
    assert report.architecture == "sd3 (from module names)" and report.layout == "ComfyUI"
    save_file({**ours, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 32)},
              str(tmp_path / "x.safetensors"))
    capsys.readouterr()
    assert cli.main(["lora", "convert", str(tmp_path / "x.safetensors"), "--to", "comfy", "-o", str(tmp_path / "y.safetensors"),
                     "--arch", "sd3"]) == 1
    assert "not an SD3 LoRA key: 'lora_te1_" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--base", str(tiny_sd3 / "vae" / "diffusion_pytorch_model.safetensors"),
                     "--lora", str(runs["lora"] / "test_lora.safetensors"), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "not an SD3 / SD3.5 MMDiT in Stability AI's layout" in capsys.readouterr().err
