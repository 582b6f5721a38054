"""End to end on a tiny random-weight SD 3.5: the CLI trains with falling loss, the saved LoRA file itself (alpha
folded, no `.alpha`) loads through diffusers' StableDiffusion3Pipeline.load_lora_weights and reproduces the trainer's
transformer, and reloads through our own loader into a network of its alpha; a folder without T5 trains on zeros in
its place."""
from __future__ import annotations

import logging
import re
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

    from eridiffusion.adapters import load_lora_file_state
    from eridiffusion.archs.sd3 import SD3

    cfg = sd3_config(tiny_sd3, dataset, tmp_path / "out", steps=6, network={"linear": 4, "linear_alpha": 2},
                     save={"diffusers_lora": True})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert any((run / "samples").iterdir())  # the step-0 and final previews went through the SD3 pipeline
    # diffusers' names, each LoRA's alpha/rank (0.5) folded into lora_B: no `.alpha`, which diffusers' SD3 loader
    # refuses and without which ComfyUI's applies scale 1.0, as diffusers does
    main = load_file(run / "test_lora.safetensors")
    assert main and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in main)
    assert load_file(run / "test_lora.diffusers.safetensors").keys() == main.keys()  # save.diffusers_lora's copy

    kw = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
              encoder_hidden_states=torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1)),
              pooled_projections=torch.randn(1, 64, generator=torch.Generator().manual_seed(2)),
              timestep=torch.tensor([500.0]), return_dict=False)
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in main})
    ours = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    inject_lora(ours, modules, LoraSpec(rank=4, alpha=2))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    with torch.no_grad():
        expected = ours(**kw)[0]
        base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)(**kw)[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(run / "test_lora.safetensors")
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    assert len({k for k in pipe.transformer.state_dict() if ".lora_" in k}) == len(main)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**kw)[0], expected, atol=1e-5, rtol=1e-5)  # diffusers applies it as trained

    # our own loader (network.pretrained_lora_path, the tools) puts it back into a network of alpha 2 with lora_B unfolded
    again = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    inject_lora(again, modules, LoraSpec(rank=4, alpha=2))
    load_lora_file_state(again, SD3.lora_from_file(None, main)["transformer"])
    with torch.no_grad():
        torch.testing.assert_close(again(**kw)[0], expected, atol=1e-5, rtol=1e-5)


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


def test_legacy_is_v3_flag_selects_sd3(tiny_sd3, dataset, tmp_path, write_config):
    cfg = train_config(tiny_sd3, dataset, tmp_path / "out", steps=1, model={"arch": None, "is_v3": True})
    assert cli.main([str(write_config(cfg))]) == 0


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
