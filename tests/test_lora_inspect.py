"""`trainer lora inspect FILE` on the files our runs write and on the layouts other trainers write."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from eridiffusion import cli
from eridiffusion.adapters.inspect import inspect_file

from .conftest import train_config


def test_inspects_a_flux_lora_our_run_wrote(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=1)
    assert cli.main([str(write_config(cfg))]) == 0
    path = tmp_path / "out" / "test_lora" / "test_lora.safetensors"
    capsys.readouterr()
    assert cli.main(["lora", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "flux (from metadata eri_arch)"
    assert report["adapter"] == "lora" and report["layout"] == "diffusers"
    assert report["ranks"] == {"4": report["modules"]} and report["alphas"] == {"8": report["modules"]}
    assert report["keys"] == 3 * report["modules"] and not report["unknown_keys"] and not report["per_module"]
    assert set(report["groups"]) == {"transformer.transformer_blocks.*", "transformer.single_transformer_blocks.*"}
    assert report["metadata"]["ss_network_dim"] == "4"
    assert cli.main(["lora", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "rank:          4 (" in text and "layout:        diffusers" in text


def test_inspects_a_kohya_sdxl_file_with_locon(tiny_sdxl, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=1, network={"conv": 2, "conv_alpha": 1})
    assert cli.main([str(write_config(cfg))]) == 0
    report = inspect_file(tmp_path / "out" / "test_lora" / "test_lora.safetensors")
    assert report.layout == "kohya" and report.adapter == "lora" and report.conv_modules > 0
    assert report.ranks.keys() == {"4", "2"} and report.per_module  # conv modules at their own rank: listed
    assert report.architecture.startswith("sdxl")


def test_recognises_other_trainers_layouts_and_types(tmp_path):
    r = lambda *s: torch.randn(*s)
    lokr = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": r(4, 4), "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_a": r(8, 2),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": r(2, 8), "lycoris_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)}
    loha = {f"lora_unet_double_blocks_0_img_attn_qkv.hada_{w}": r(*s) for w, s in
            (("w1_a", (96, 8)), ("w1_b", (8, 32)), ("w2_a", (96, 8)), ("w2_b", (8, 32)))}
    dora = {"diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": r(16, 32),
            "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": r(32, 16),
            "diffusion_model.double_blocks.0.img_attn.proj.dora_scale": r(32, 1),
            "diffusion_model.single_blocks.0.linear1.lora_down.weight": r(8, 32),
            "diffusion_model.single_blocks.0.linear1.lora_up.weight": r(96, 8),
            "something.else": r(2)}
    for name, tensors in (("lokr", lokr), ("loha", loha), ("dora", dora)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    a, b, c = (inspect_file(tmp_path / f"{n}.safetensors") for n in ("lokr", "loha", "dora"))
    assert (a.adapter, a.layout, a.ranks, a.alphas) == ("lokr", "LyCORIS", {"2": 1}, {"2": 1})
    assert (b.adapter, b.layout, b.ranks, b.alphas) == ("loha", "kohya", {"8": 1}, {})
    assert "none stored" in b.text()
    assert c.adapter == "dora (1) + lora (1)" and c.layout == "ComfyUI" and c.architecture == "flux (from module names)"
    assert c.unknown_keys == ["something.else"] and c.per_module  # ranks 16 and 8
    assert "unrecognised keys (1): something.else" in c.text()


def test_not_a_safetensors_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"nothing")
    assert cli.main(["lora", "inspect", str(tmp_path / "x.ckpt")]) == 1
    assert "reads .safetensors" in capsys.readouterr().err
