"""network.pretrained_lora_path (continue from an adapter file) and model.lora_path (a LoRA fused into the
base before training and kept for samples)."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import lora_file_state
from eridiffusion.config import parse_config
from eridiffusion.train.loop import Run

from .conftest import train_config


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_training_starts_from_a_pretrained_adapter_file(kind, tiny_flux, dataset, tmp_path, write_config, capsys):
    network = {"type": kind, **({"lokr_full_rank": False, "linear": 2, "linear_alpha": 2} if kind == "lokr" else {})}
    first = train_config(tiny_flux, dataset, tmp_path / "a", steps=3, network=network, sample={"prompts": []})
    assert cli.main([str(write_config(first, "a.yaml"))]) == 0
    file = tmp_path / "a" / "test_lora" / "test_lora.safetensors"
    again = train_config(tiny_flux, dataset, tmp_path / "b", network={**network, "pretrained_lora_path": str(file)})
    run = Run(parse_config(again).config.process[0], {})
    saved = {k[len("transformer."):]: v for k, v in load_file(file).items() if not k.endswith(".alpha")}
    ours = lora_file_state(run.components["transformer"].module)
    assert ours.keys() == saved.keys() and all(torch.allclose(ours[k], saved[k].float()) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k or "w1" in k)  # not a fresh zero adapter

    wrong = train_config(tiny_flux, dataset, tmp_path / "c", network={**network, "linear": 8, "linear_alpha": 8,
                                                                       "pretrained_lora_path": str(file)})
    assert cli.main([str(write_config(wrong, "c.yaml"))]) == 1
    assert "network.pretrained_lora_path" in capsys.readouterr().err


def test_lora_path_is_fused_into_the_base_and_kept(tiny_flux, dataset, tmp_path):
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    layer = base.transformer_blocks[0].attn.to_q
    a, b = torch.randn(4, layer.in_features) * 0.1, torch.randn(layer.out_features, 4) * 0.1
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
               "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(8.0)}, str(tmp_path / "style.safetensors"))
    cfg = train_config(tiny_flux, dataset, tmp_path / "o", model={"lora_path": str(tmp_path / "style.safetensors")})
    run = Run(parse_config(cfg).config.process[0], {})
    fused = run.arch.denoiser.transformer_blocks[0].attn.to_q.get_base_layer().weight
    torch.testing.assert_close(fused, layer.weight + 2.0 * b @ a, atol=1e-6, rtol=1e-6)
    assert run.assistant is None  # nothing is taken out for samples
