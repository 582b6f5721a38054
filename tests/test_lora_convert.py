"""trainer lora convert: a Flux LoRA between diffusers (`transformer.`), ComfyUI (`diffusion_model.` + BFL names)
and kohya (`lora_unet_` + BFL names) layouts; every module's weight update survives each way exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.archs.flux import Flux, _bfl_module_names
from eridiffusion.archs.flux.formats import _lora_modules

from .conftest import train_config


def updates(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers module -> its weight update (alpha/rank)·B@A, from a file in any layout."""
    state = {k.removeprefix("transformer."): v for k, v in Flux.lora_to_layout(tensors, "diffusers").items()}
    return {name: (float(m["alpha"]) / m["lora_A.weight"].shape[0] if "alpha" in m else 1.0)
            * m["lora_B.weight"].double() @ m["lora_A.weight"].double() for name, m in _lora_modules(state).items()}


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    import shutil

    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("convert")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    # every Linear (embedders and final layer too), alpha != rank
    cfg = train_config(tiny_flux, data, tmp / "out", steps=3, network={"linear": 4, "linear_alpha": 8, "transformer_only": False},
                       sample={"prompts": []})
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main([str(tmp / "c.yaml")]) == 0
    return tmp / "out" / "test_lora" / "test_lora.safetensors"


@pytest.mark.parametrize("layout, prefix", [("comfy", "diffusion_model."), ("kohya", "lora_unet_")])
def test_round_trip_keeps_every_update(layout, prefix, trained, tmp_path, capsys):
    out, back = tmp_path / f"{layout}.safetensors", tmp_path / "back.safetensors"
    assert cli.main(["lora", "convert", str(trained), "--to", layout, "-o", str(out)]) == 0
    assert cli.main(["lora", "convert", str(out), "--to", "diffusers", "-o", str(back)]) == 0
    original, converted = load_file(trained), load_file(out)
    assert converted and all(k.startswith(prefix) for k in converted)
    if layout == "comfy":  # names ComfyUI's generic rule maps: diffusion_model.<its (BFL) module name>
        names = {k[len(prefix):].rsplit(".", 2 if ".lora_" in k else 1)[0] for k in converted}
        assert names <= set(_bfl_module_names()) and any(n.endswith("img_attn.qkv") for n in names)
    expected = updates(original)
    for name, delta in updates(converted).items():  # fused q/k/v(/mlp) hold each part's update in its rows
        assert name in expected
    for which in (converted, load_file(back)):
        got = updates(which)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-6)


def test_convert_errors_are_clear(trained, tmp_path, capsys):
    assert cli.main(["lora", "convert", str(trained), "--to", "onetrainer", "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "flux LoRA files convert to diffusers, comfy, kohya" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "bare.safetensors"))
    assert cli.main(["lora", "convert", str(tmp_path / "bare.safetensors"), "--to", "comfy", "-o", str(tmp_path / "y")]) == 1
    assert "pass --arch" in capsys.readouterr().err
