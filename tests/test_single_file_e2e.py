"""Training from model files as users keep them: a single-file FLUX.1 transformer in Black Forest Labs
layout (bf16 and float8) with the rest from `extras_name_or_path`, a repo id found in the local HF cache,
and a separate VAE folder."""
from __future__ import annotations

import shutil

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from eridiffusion import cli
from eridiffusion.archs.flux.formats import diffusers_to_bfl

from .conftest import sgm_single_file, train_config


def bfl_file(tiny_flux, path, dtype):
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    state = {f"model.diffusion_model.{k}": v.to(dtype) for k, v in diffusers_to_bfl(model.state_dict()).items()}
    save_file(state, str(path))
    return path


def test_trains_from_a_single_file_transformer(tiny_flux, dataset, tmp_path, write_config):
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        file = bfl_file(tiny_flux, tmp_path / f"flux1-tiny-{str(dtype)[6:]}.safetensors", dtype)
        cfg = train_config(file, dataset, tmp_path / str(dtype), steps=2, model={"extras_name_or_path": str(tiny_flux)})
        assert cli.main([str(write_config(cfg, f"{str(dtype)[6:]}.yaml"))]) == 0
        assert (tmp_path / str(dtype) / "test_lora" / "test_lora.safetensors").is_file()


def test_single_file_without_extras_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    file = bfl_file(tiny_flux, tmp_path / "flux1-tiny.safetensors", torch.bfloat16)
    assert cli.main([str(write_config(train_config(file, dataset, tmp_path / "out")))]) == 1
    assert "extras_name_or_path" in capsys.readouterr().err


def test_wrong_architecture_file_says_what_it_looks_like(tiny_flux, dataset, tmp_path, write_config, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae", local_files_only=True)
    save_file({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}, str(tmp_path / "not-flux.safetensors"))
    cfg = train_config(tmp_path / "not-flux.safetensors", dataset, tmp_path / "out", model={"extras_name_or_path": str(tiny_flux)})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert "not-flux.safetensors" in err and "VAE" in err


def test_trains_from_a_repo_id_in_the_local_hf_cache(tiny_flux, dataset, tmp_path, write_config, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-flux" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_flux, snapshot)
    (cache / "models--someone--tiny-flux" / "refs").mkdir()
    (cache / "models--someone--tiny-flux" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be fetched
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, model={"name_or_path": "someone/tiny-flux"})
    assert cli.main([str(write_config(cfg))]) == 0


def test_repo_id_not_in_the_cache_says_where_it_looked(tiny_flux, dataset, tmp_path, write_config, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", model={"name_or_path": "black-forest-labs/FLUX.1-dev"})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "empty-hub") in err and "never downloads" in err


def test_separate_vae_folder(tiny_flux, dataset, tmp_path, write_config):
    vae_dir = shutil.copytree(tiny_flux / "vae", tmp_path / "my-vae")
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, model={"vae_path": str(vae_dir)})
    assert cli.main([str(write_config(cfg))]) == 0


def test_trains_sdxl_from_an_all_in_one_sgm_checkpoint(tiny_sdxl, dataset, tmp_path, write_config, capsys):
    file = sgm_single_file(tiny_sdxl, tmp_path / "sd_xl_tiny.safetensors")
    cfg = train_config(file, dataset, tmp_path / "out", arch="sdxl", steps=2, sample={"prompts": ["a red circle"], "width": 32, "height": 32},
                       model={"extras_name_or_path": str(tiny_sdxl)})
    assert cli.main([str(write_config(cfg))]) == 0
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()
    # without a tokenizer source the error says what to provide
    cfg["config"]["process"][0]["model"].pop("extras_name_or_path")
    assert cli.main([str(write_config(cfg, "b.yaml"))]) == 1
    assert "tokenizer/ and tokenizer_2/" in capsys.readouterr().err


def test_text_encoders_from_their_own_files(tiny_flux, dataset, tmp_path, write_config):
    from transformers import CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder", local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2", local_files_only=True)
    # ComfyUI's clip_l keeps `text_model.`; its T5 files carry `shared.weight` but not the tied encoder embedding
    save_file({f"text_model.{k}": v for k, v in clip.state_dict().items()}, str(tmp_path / "clip_l.safetensors"))
    save_file({k: v.half() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(tmp_path / "t5xxl_fp16.safetensors"))
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, model={"model_paths": {
        "text_encoder": str(tmp_path / "clip_l.safetensors"), "text_encoder_2": str(tmp_path / "t5xxl_fp16.safetensors")}})
    assert cli.main([str(write_config(cfg))]) == 0

    from eridiffusion.archs.common import load_text_encoder

    loaded = load_text_encoder(T5EncoderModel, tmp_path / "t5xxl_fp16.safetensors", tiny_flux, "text_encoder_2", torch.float32)
    ids = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(loaded(ids).last_hidden_state, t5(ids).last_hidden_state, atol=2e-3, rtol=2e-3)


def test_sdxl_with_a_vae_from_a_single_file(tiny_sdxl, dataset, tmp_path, write_config):
    from diffusers import AutoencoderKL

    from eridiffusion.archs.sdxl.formats import diffusers_to_sgm

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae", local_files_only=True)
    sgm = diffusers_to_sgm({"vae": vae.state_dict()})
    save_file({k[len("first_stage_model."):]: v.contiguous() for k, v in sgm.items()}, str(tmp_path / "vae-fix.safetensors"))
    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=2, sample={"prompts": []},
                       model={"vae_path": str(tmp_path / "vae-fix.safetensors")})
    assert cli.main([str(write_config(cfg))]) == 0
    loaded = AutoencoderKL.from_single_file(str(tmp_path / "vae-fix.safetensors"), config=str(tiny_sdxl), subfolder="vae",
                                            local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def test_incomplete_tokenizer_folder_names_the_files(tiny_flux, dataset, tmp_path, write_config, capsys):
    folder = shutil.copytree(tiny_flux / "tokenizer", tmp_path / "clip-tokenizer")
    (folder / "merges.txt").unlink()
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", model={"model_paths": {"tokenizer": str(folder)}})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert "merges.txt" in err and "tokenizer.json" in err
