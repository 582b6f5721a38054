"""trainer lora merge: LoRA files merged into a Flux base kept as a diffusers folder or a BFL single file, written
in the same layout; the merged model gives what the unmerged model with the adapters gives."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_file_state, lora_scale
from eridiffusion.archs.flux import Flux
from eridiffusion.archs.flux.formats import diffusers_to_bfl, load_flux_single_file

from .conftest import train_config
from .test_quant import inputs


@pytest.fixture(scope="module")
def loras(tiny_flux, tmp_path_factory):
    import shutil

    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("merge")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    files = []
    for i, network in enumerate(({"linear": 4, "linear_alpha": 8}, {"type": "dora", "linear": 2, "linear_alpha": 2})):
        cfg = train_config(tiny_flux, data, tmp / f"o{i}", steps=3, network=network, sample={"prompts": []},
                           train={"lr": 1e-2})
        (tmp / f"{i}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main([str(tmp / f"{i}.yaml")]) == 0
        files.append(tmp / f"o{i}" / "test_lora" / "test_lora.safetensors")
    return files


def unmerged(tiny_flux, files, strengths):
    """The base with each file as its own live adapter, at its strength (one model per file, outputs summed
    as deltas from the base, which is what merging several adapters adds)."""
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    with torch.no_grad():
        out = base(**inputs())[0].clone()
        for file, strength in zip(files, strengths):
            model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
            state = Flux.lora_from_file(None, load_file(file))["transformer"]
            modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})
            dora = any(k.endswith(".dora_scale") for k in state)
            rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
            alpha = float(next(v for k, v in state.items() if k.endswith(".alpha")))
            inject_lora(model, modules, LoraSpec(rank, alpha, kind="dora" if dora else "lora"))
            load_lora_file_state(model, state)
            with lora_scale(model, strength):
                out += model(**inputs())[0] - base(**inputs())[0]
    return out


def test_merge_into_a_diffusers_folder(loras, tiny_flux, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(tiny_flux), "--lora", str(loras[0]), "--strength", "0.7",
                     "-o", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "vae" / "config.json").is_file()
    merged = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer", local_files_only=True)
    with torch.no_grad():
        got = merged(**inputs())[0]
    torch.testing.assert_close(got, unmerged(tiny_flux, loras[:1], [0.7]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which, strength", [(0, 0.7), (1, 1.0)])  # LoRA (given in ComfyUI's layout), DoRA
def test_merge_into_a_single_file(which, strength, loras, tiny_flux, tmp_path):
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    single = tmp_path / "flux1-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in diffusers_to_bfl(base.state_dict()).items()}, str(single))
    lora = loras[which]
    if which == 0:  # merge reads any layout convert writes
        assert cli.main(["lora", "convert", str(lora), "--to", "comfy", "-o", str(tmp_path / "comfy.safetensors")]) == 0
        lora = tmp_path / "comfy.safetensors"
    out = tmp_path / "flux1-tiny-merged.safetensors"
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(lora), "--strength", str(strength),
                     "-o", str(out), "--arch", "flux"]) == 0
    assert all(k.startswith("model.diffusion_model.") for k in load_file(out))
    with torch.no_grad():
        got = load_flux_single_file(out, torch.float32)(**inputs())[0]
    torch.testing.assert_close(got, unmerged(tiny_flux, [loras[which]], [strength]), atol=1e-4, rtol=1e-4)


def test_merge_errors(loras, tiny_flux, tmp_path, capsys):
    assert cli.main(["lora", "merge", "--base", str(tiny_flux), "--lora", str(loras[0]), "--strength", "1",
                     "--strength", "2", "-o", str(tmp_path / "x")]) == 1
    assert "one per file" in capsys.readouterr().err
