"""End to end on a tiny random-weight SD 3.5: the CLI trains with falling loss, the saved LoRA loads through
diffusers' StableDiffusion3Pipeline.load_lora_weights and reproduces the trainer's transformer, a folder without
T5 trains on zeros in its place, and what this slice does not read yet is refused by name."""
from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log

def sd3_config(model, dataset, out, **kw):
    return train_config(model, dataset, out, arch="sd3", **kw)


def test_loss_falls(tiny_sd3, dataset, tmp_path, write_config):
    cfg = sd3_config(tiny_sd3, dataset, tmp_path / "out", steps=100, save={"save_every": 1000},
                     train={"lr": 5e-3, "timestep_type": "linear"}, sample={"sample_every": 1000, "prompts": []})
    assert cli.main([str(write_config(cfg))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "test_lora")]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.85 * first, (first, last)


def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(tiny_sd3, dataset, tmp_path, write_config, caplog):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg = sd3_config(tiny_sd3, dataset, tmp_path / "out", steps=6, network={"linear": 4, "linear_alpha": 2},
                     save={"diffusers_lora": True})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert any((run / "samples").iterdir())  # the step-0 and final previews went through the SD3 pipeline
    # the main file: diffusers names with ComfyUI's `.alpha` per module, which diffusers' SD3 loader refuses
    # ("all LoRA param names contain 'lora'"); its twin, written by diffusers' own saver, carries alpha as metadata
    main = load_file(run / "test_lora.safetensors")
    assert main and all(k.startswith("transformer.transformer_blocks.") for k in main)
    assert {k for k in main if k.endswith(".alpha")} and all(float(v) == 2 for k, v in main.items() if k.endswith(".alpha"))
    file = run / "test_lora.diffusers.safetensors"
    saved = load_file(file)
    assert {k for k in saved} == {k for k in main if not k.endswith(".alpha")}

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    modules = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k}
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == 2 * len(modules) == len([k for k in saved if ".lora_" in k])

    ours = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    inject_lora(ours, sorted(modules), LoraSpec(rank=4, alpha=2))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 12, 64),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        expected, got = ours(**kw)[0], pipe.transformer(**kw)[0]
        base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)(**kw)[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


def test_folder_without_t5_trains(tmp_path, dataset, write_config):
    from eridiffusion.archs.sd3.tiny import build_tiny_sd3

    model = build_tiny_sd3(tmp_path / "no-t5", with_t5=False)
    assert not (model / "text_encoder_3").exists()
    cfg = sd3_config(model, dataset, tmp_path / "out", steps=2, train={"cache_text_embeddings": False})
    assert cli.main([str(write_config(cfg))]) == 0
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()
    from eridiffusion.archs.sd3 import SD3
    from eridiffusion.config import parse_config

    arch = SD3(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    embeds = arch.encode_prompts(["a red circle"])["prompt_embeds"]
    assert embeds.shape == (1, 77 + 256, 64) and not embeds[:, 77:].any()  # zeros where T5's tokens would be


def test_single_file_is_refused_by_name(tiny_sd3, dataset, tmp_path, write_config, capsys):
    file = tmp_path / "sd3.5_medium.safetensors"
    shutil.copy(tiny_sd3 / "transformer" / "diffusion_pytorch_model.safetensors", file)
    cfg = train_config(file, dataset, tmp_path / "out", model={"name_or_path": str(file), "arch": "sd3",
                                                                 "extras_name_or_path": str(tiny_sd3)})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "single-file checkpoints are not supported yet for sd3" in capsys.readouterr().err


def test_legacy_is_v3_flag_selects_sd3(tiny_sd3, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sd3, dataset, tmp_path / "out", steps=1, model={"arch": None, "is_v3": True})
    assert cli.main([str(write_config(cfg))]) == 0


def test_full_fine_tune_is_refused_before_loading(tiny_sd3, dataset, tmp_path, write_config, capsys):
    cfg = sd3_config(tiny_sd3, dataset, tmp_path / "out")
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 1
    assert "full fine-tune (no network section) is not supported yet for sd3" in capsys.readouterr().err


def test_lora_convert_and_merge_are_refused(tiny_sd3, dataset, tmp_path, write_config, capsys):
    assert cli.main([str(write_config(sd3_config(tiny_sd3, dataset, tmp_path / "out", steps=1)))]) == 0
    file = tmp_path / "out" / "test_lora" / "test_lora.safetensors"
    capsys.readouterr()
    assert cli.main(["lora", "convert", str(file), "--to", "comfy", "-o", str(tmp_path / "c.safetensors")]) == 1
    assert "sd3 LoRA files convert to no other layout yet" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--base", str(tiny_sd3), "--lora", str(file), "-o", str(tmp_path / "m")]) == 1
    assert "trainer lora merge is not supported yet for sd3" in capsys.readouterr().err


@pytest.mark.parametrize("storage", [None, "int8"])
def test_blockwise_load_equals_from_pretrained_and_quantizes_all_but_the_exclusions(tiny_sd3, storage):
    from diffusers import SD3Transformer2DModel

    from eridiffusion.archs.blockwise import FrozenBase
    from eridiffusion.archs.sd3 import SD3
    from eridiffusion.config import parse_config
    from eridiffusion.quant import Quantizer, is_quantized

    proc = parse_config(sd3_config(tiny_sd3, tiny_sd3, tiny_sd3)).config.process[0]
    arch = SD3(proc, torch.device("cpu"), torch.float32)
    quantizer = Quantizer(storage, SD3.quantize_exclude)
    arch.load(FrozenBase(torch.device("cpu"), torch.float32, quantizer=quantizer))
    reference = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    if storage is None:
        ours = arch.transformer.state_dict()
        assert ours.keys() == reference.state_dict().keys()
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.items())
        return
    for name, layer in arch.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear):
            kept = name.startswith(("context_embedder", "time_text_embed", "norm_out", "proj_out"))
            assert is_quantized(layer.weight) != kept, name
