"""End to end on a tiny random-weight Flux: the CLI trains, the loss falls, the saved LoRA loads in
diffusers and reproduces the trainer's own output, and a run continues from its last checkpoint."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cli_trains_and_writes_the_run_folder(tiny_flux, dataset, tmp_path, write_config):
    out = tmp_path / "out"
    assert cli.main([str(write_config(train_config(tiny_flux, dataset, out)))]) == 0
    run = out / "test_lora"
    assert (run / "config.yaml").is_file()
    assert (run / "test_lora.safetensors").is_file() and (run / "test_lora_000000003.safetensors").is_file()
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples and all(re.fullmatch(r"\d{13}__0000000(00|06)_0\.jpg", s) for s in samples), samples
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["lr"] == 1e-3 for r in log)
    # the latent and text caches were written beside the images
    assert any((dataset / "_latent_cache").iterdir()) and any((dataset / "_t_e_cache").iterdir())


def test_loss_falls_over_a_hundred_steps(tiny_flux, dataset, tmp_path, write_config):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=100, save={"save_every": 1000},
                      train={"lr": 2e-3, "timestep_type": "linear"}, sample={"sample_every": 1000, "prompts": []})
    assert cli.main([str(write_config(cfg))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "test_lora")]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)


def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(tiny_flux, dataset, tmp_path, write_config, caplog):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=8, network={"linear": 4, "linear_alpha": 2})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = run / "test_lora.safetensors"
    saved = load_file(file)

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    # every tensor of the file is applied: each LoRA matrix landed in the pipeline's transformer
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    modules = {k.rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k}
    assert len(loaded) == 2 * len(modules) == len([k for k in saved if ".lora_" in k])
    for k, v in saved.items():
        if ".lora_" in k:
            assert torch.equal(loaded[k.replace("transformer.", "", 1).replace(".weight", ".default_0.weight")], v)

    # The trainer's own model: base weights + our LoRA with the run's final raw weights.
    ours = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    inject_lora(ours, sorted(modules_of(saved)), LoraSpec(rank=4, alpha=2))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])

    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 12, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(64, 3),
              txt_ids=torch.zeros(12, 3), guidance=torch.tensor([1.0]), return_dict=False)
    with torch.no_grad():
        expected, got = ours(**kw)[0], pipe.transformer(**kw)[0]
        base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)(**kw)[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


def modules_of(saved):
    return {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k}


def test_run_continues_from_its_last_checkpoint(tiny_flux, dataset, tmp_path, write_config):
    straight = train_config(tiny_flux, dataset, tmp_path / "a", steps=6)
    assert cli.main([str(write_config(straight, "a.yaml"))]) == 0
    # the same run stopped after 3 steps, then started again with the full length
    assert cli.main([str(write_config(train_config(tiny_flux, dataset, tmp_path / "b", steps=3), "b1.yaml"))]) == 0
    assert cli.main([str(write_config(train_config(tiny_flux, dataset, tmp_path / "b", steps=6), "b2.yaml"))]) == 0
    a = load_file(tmp_path / "a" / "test_lora" / "test_lora.safetensors")
    b = load_file(tmp_path / "b" / "test_lora" / "test_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "b" / "test_lora")] == list(range(1, 7))


def test_resume_refuses_a_changed_rank(tiny_flux, dataset, tmp_path, write_config, capsys):
    assert cli.main([str(write_config(train_config(tiny_flux, dataset, tmp_path / "o", steps=3), "a.yaml"))]) == 0
    changed = train_config(tiny_flux, dataset, tmp_path / "o", steps=6, network={"linear": 8})
    assert cli.main([str(write_config(changed, "b.yaml"))]) == 1
    assert "rank" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["schnell", "flex"])
def test_variants_train(variant, tiny_flux, tiny_flux_schnell, dataset, tmp_path, write_config):
    model = tiny_flux_schnell if variant == "schnell" else tiny_flux
    extra = {"train": {"bypass_guidance_embedding": True}, "arch": "flex1"} if variant == "flex" else {}
    cfg = train_config(model, dataset, tmp_path / "out", steps=2, **extra)
    assert cli.main([str(write_config(cfg))]) == 0
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()


def test_config_typo_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", train={"lrr": 1e-4})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert "train.lrr" in err and "did you mean 'lr'" in err


def test_cuda_device_without_cuda_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = train_config(tiny_flux, dataset, tmp_path / "out")
    cfg["config"]["process"][0]["device"] = "cuda:0"
    assert cli.main([str(write_config(cfg))]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_model_file_is_named(tiny_flux, dataset, tmp_path, write_config, capsys):
    import shutil

    broken = shutil.copytree(tiny_flux, tmp_path / "broken")
    (broken / "vae" / "config.json").unlink()
    assert cli.main([str(write_config(train_config(broken, dataset, tmp_path / "out")))]) == 1
    assert str(broken / "vae" / "config.json") in capsys.readouterr().err


def test_bypass_guidance_embedding_ignores_guidance(tiny_flux, dataset, tmp_path):
    from eridiffusion.archs.flux import Flux
    from eridiffusion.config import parse_config

    def prediction(bypass: bool, cfg_scale: float):
        cfg = train_config(tiny_flux, dataset, tmp_path, train={"bypass_guidance_embedding": bypass, "cfg_scale": cfg_scale})
        arch = Flux(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
        arch.load()
        g = torch.Generator().manual_seed(0)
        noisy = torch.randn(1, 4, 8, 8, generator=g)
        text = {"prompt_embeds": torch.randn(1, 12, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
        with torch.no_grad():
            return arch.predict(noisy, torch.tensor([0.5]), text)

    assert not torch.allclose(prediction(False, 1.0), prediction(False, 5.0))  # guidance matters normally
    torch.testing.assert_close(prediction(True, 1.0), prediction(True, 5.0))  # and not at all when bypassed


def test_lr_schedule_with_warmup(tiny_flux, dataset, tmp_path, write_config):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=6,
                      train={"lr_scheduler": "cosine", "lr_scheduler_params": {"num_warmup_steps": 2}})
    assert cli.main([str(write_config(cfg))]) == 0
    lrs = [r["lr"] for r in read_log(tmp_path / "out" / "test_lora")]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and lrs[3] > lrs[4] > lrs[5] > 0


def test_gradient_accumulation_and_start_step(tiny_flux, dataset, tmp_path, write_config):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=6, train={"gradient_accumulation_steps": 2, "start_step": 4})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert [r["step"] for r in read_log(run)] == [5, 6]
    state = load_state(latest_state(run))
    assert state["data"]["epoch"] * 4 + state["data"]["position"] == 4  # 2 steps x 2 batches of the 4 per epoch


def test_adamw8bit_without_cuda_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", train={"optimizer": "adamw8bit"})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "adamw8bit" in capsys.readouterr().err


def test_compiled_model_trains_like_the_eager_one(tiny_flux, dataset, tmp_path, write_config):
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        cfg = train_config(tiny_flux, dataset, out, steps=3, model={"compile": compiled}, sample={"prompts": []})
        assert cli.main([str(write_config(cfg, f"{compiled}.yaml"))]) == 0
        losses[compiled] = [r["loss"] for r in read_log(out / "test_lora")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_unknown_model_kwargs_are_refused(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", model={"model_kwargs": {"vae_tiling": True}})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "model.model_kwargs: ['vae_tiling'] not supported yet for flux" in capsys.readouterr().err


def test_unload_text_encoder_trains_on_the_trigger_alone(tiny_flux, dataset, tmp_path, write_config):
    """ai-toolkit's train.unload_text_encoder: captions are ignored; every step is conditioned on the trigger word,
    whose embedding is cached before the text encoders are freed."""
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, train={"unload_text_encoder": True,
                                                                              "cache_text_embeddings": False})
    assert cli.main([str(write_config(cfg))]) == 0
    cached = list((dataset / "_t_e_cache").glob("*.safetensors"))
    assert len(cached) > 1 and len({p.stem.rsplit("_", 1)[1] for p in cached}) == 1  # one caption: "shp3s"
    cfg["config"]["process"][0]["train"]["train_text_encoder"] = True
    assert cli.main([str(write_config(cfg, "both.yaml"))]) == 1
