"""SD 3.5 single files as ComfyUI users keep them, on the tiny model: Stability AI's layout (the MMDiT, the VAE, and
the text encoders inside or as separate clip_l / clip_g / t5xxl files) converts as diffusers' own converter does,
loads into the same model as the diffusers folder, and a full fine-tune writes that layout back key for key."""
from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.archs.sd3 import SD3
from eridiffusion.archs.sd3.formats import (PREFIX, TEXT_PREFIXES, diffusers_to_sai, infer_sd3_config, sai_to_diffusers,
                                            transformer_part)
from eridiffusion.archs.sd3.tiny import configs_only, write_tiny_sd3_single_file
from eridiffusion.config import parse_config

from .conftest import train_config
from .test_flux_e2e import read_log


@pytest.fixture(scope="module")
def files(tiny_sd3, tmp_path_factory):
    """The tiny model as SAI files: MMDiT + VAE (sd3.5_medium.safetensors), everything in one, and the three text
    encoders as ComfyUI's separate files; beside them its folder without weights (the extras)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tmp = tmp_path_factory.mktemp("sd3-files")
    out = {"medium": write_tiny_sd3_single_file(tiny_sd3, tmp / "sd3.5_medium.safetensors"),
           "all_in_one": write_tiny_sd3_single_file(tiny_sd3, tmp / "sd3.5_medium_incl_clips_t5xxl.safetensors", text_encoders=True),
           "extras": configs_only(tiny_sd3, tmp / "configs")}
    for name, cls, file in (("text_encoder", CLIPTextModelWithProjection, "clip_l"),
                            ("text_encoder_2", CLIPTextModelWithProjection, "clip_g"), ("text_encoder_3", T5EncoderModel, "t5xxl_fp16")):
        state = cls.from_pretrained(tiny_sd3, subfolder=name, local_files_only=True).state_dict()
        save_file({k: v.to(torch.float16) for k, v in state.items() if k != "encoder.embed_tokens.weight"}, str(tmp / f"{file}.safetensors"))
        out[name] = tmp / f"{file}.safetensors"
    return out


def load_arch(cfg) -> SD3:
    arch = SD3(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def test_sai_layout_is_diffusers_converter_both_ways(tiny_sd3, files):
    sd = load_file(files["all_in_one"])
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "text_encoders"}
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd  # 3.5 Medium's dual attention
    reference = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    ref = reference.state_dict()
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd.items() if k.startswith(PREFIX)})
    ours = sai_to_diffusers(transformer_part(sd), reference.config.num_layers)
    for converted in (theirs, ours):
        assert converted.keys() == ref.keys() and all(torch.equal(converted[k], ref[k]) for k in ref)
    back = diffusers_to_sai(ref)
    assert {PREFIX + k for k in back} == {k for k in sd if k.startswith(PREFIX)}
    assert all(torch.equal(v, sd[PREFIX + k]) for k, v in back.items())
    # depth, widths, dual attention and QK norm read from the tensors (sample_size is no weight's: the releases' 128)
    config = infer_sd3_config(sd)
    assert {**config, "sample_size": 32} == {k: tuple(v) if isinstance(v, list) else v for k, v in reference.config.items()
                                              if k in config}


@pytest.mark.parametrize("layout", ["all_in_one", "separate_text_encoders"])
def test_single_file_loads_as_the_folder_does(tiny_sd3, files, layout, tmp_path):
    folder = load_arch(train_config(tiny_sd3, tiny_sd3, tmp_path, arch="sd3"))
    model = {"arch": "sd3", "name_or_path": str(files["all_in_one"]), "extras_name_or_path": str(files["extras"])}
    if layout == "separate_text_encoders":  # ComfyUI's clip_l / clip_g / t5xxl_fp16 files beside sd3.5_medium.safetensors
        model.update(name_or_path=str(files["medium"]), te_dtype="fp32",
                     model_paths={n: str(files[n]) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")})
    single = load_arch(train_config(tiny_sd3, tiny_sd3, tmp_path, arch="sd3", model=model))
    for a, b in ((folder.transformer, single.transformer), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    prompts = ["a red circle", "two shapes"]
    atol = 0 if layout == "all_in_one" else 1e-2  # the separate files are fp16, as ComfyUI's are
    for k, v in folder.encode_prompts(prompts).items():
        torch.testing.assert_close(single.encode_prompts(prompts)[k], v, atol=atol, rtol=0)


def test_single_file_errors_name_what_to_fix(tiny_sd3, files, tmp_path, dataset, write_config, capsys):
    diffusers_file = tiny_sd3 / "transformer" / "diffusion_pytorch_model.safetensors"
    cfg = train_config(diffusers_file, dataset, tmp_path / "out", arch="sd3", model={"extras_name_or_path": str(files["extras"])})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "looks like a diffusers-layout SD3 transformer" in capsys.readouterr().err
    # the weights-less extras folder lacks the VAE's and text encoders' weights, which the MMDiT-only file does not carry
    cfg = train_config(files["medium"], dataset, tmp_path / "out", arch="sd3", model={"extras_name_or_path": str(files["extras"])})
    cfg["config"]["process"][0]["model"]["vae_path"] = None
    save_file({k: v for k, v in load_file(files["medium"]).items() if k.startswith(PREFIX)}, str(tmp_path / "mmdit.safetensors"))
    cfg["config"]["process"][0]["model"]["name_or_path"] = str(tmp_path / "mmdit.safetensors")
    assert cli.main([str(write_config(cfg))]) == 1
    assert "no weights (*.safetensors) in" in capsys.readouterr().err


def full_config(model, extras, dataset, out, steps):
    cfg = train_config(model, dataset, out, arch="sd3", steps=steps, sample={"prompts": []},
                       train={"optimizer": "adamw", "lr": 1e-3, "batch_size": 4}, save={"save_every": 100},
                       model={"extras_name_or_path": str(extras), "only_if_contains": ["transformer.transformer_blocks."]})
    del cfg["config"]["process"][0]["network"]
    return cfg


def test_full_fine_tune_round_trips_the_sai_file_and_trains(tiny_sd3, files, dataset, tmp_path, write_config):
    # untrained: the file written back is the file read, key for key and value for value
    arch = load_arch(full_config(files["medium"], tiny_sd3, dataset, tmp_path, 1))
    original, written = load_file(files["medium"]), arch.full_to_file()
    assert written.keys() == original.keys() and all(torch.equal(written[k], v) for k, v in original.items())

    cfg = full_config(files["all_in_one"], files["extras"], dataset, tmp_path / "out", 8)
    cfg["config"]["process"][0]["save"]["save_format"] = "diffusers"
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert all(torch.isfinite(torch.tensor(losses)))
    saved = load_file(run / "test_lora.safetensors")
    assert saved.keys() == original.keys()  # the MMDiT and the VAE, as sd3.5_medium.safetensors; no text encoders
    changed = {k for k in saved if not torch.equal(saved[k], original[k])}
    assert changed and all(k.startswith(PREFIX + "joint_blocks.") for k in changed)
    # the diffusers folder: this transformer, and the VAE and text encoders the single file carried (the extras
    # folder has none), so that diffusers loads it whole
    pipe = StableDiffusion3Pipeline.from_pretrained(run / "test_lora", local_files_only=True)
    trained = sai_to_diffusers(transformer_part(saved), pipe.transformer.config.num_layers)
    assert all(torch.equal(trained[k], v) for k, v in pipe.transformer.state_dict().items())
    assert pipe.text_encoder_3 is not None and not any(k.startswith(tuple(TEXT_PREFIXES.values())) for k in saved)


def test_a_clip_l_file_without_projection_gets_the_identity(tiny_sd3, files, tmp_path):
    from transformers import CLIPTextModelWithProjection

    from eridiffusion.archs.common import load_text_encoder

    state = load_file(files["text_encoder"])
    del state["text_projection.weight"]  # as some clip_l.safetensors are kept; ComfyUI then projects by the identity
    save_file(state, str(tmp_path / "clip_l.safetensors"))
    model = load_text_encoder(CLIPTextModelWithProjection, tmp_path / "clip_l.safetensors", tiny_sd3, "text_encoder", torch.float32)
    width = model.config.hidden_size
    assert torch.equal(model.text_projection.weight, torch.eye(width))
    assert torch.equal(model.text_model.final_layer_norm.weight, state["text_model.final_layer_norm.weight"].float())
