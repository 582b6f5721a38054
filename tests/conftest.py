"""Shared fixtures: tiny random-weight model folders for the session, a dataset, and a config writer."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from eridiffusion.archs.chroma.tiny import build_tiny_chroma
from eridiffusion.archs.flux.tiny import build_tiny_flux
from eridiffusion.archs.hidream.tiny import build_tiny_hidream, build_tiny_llama
from eridiffusion.archs.kolors.tiny import build_tiny_kolors
from eridiffusion.archs.sd3.tiny import build_tiny_sd3
from eridiffusion.archs.sdxl.tiny import build_tiny_sdxl
from eridiffusion.archs.wan21.tiny import build_tiny_wan21
from eridiffusion.demo import DEMO_DATA_DIR


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", guidance_embeds=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_v(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_kolors(tmp_path_factory) -> Path:
    return build_tiny_kolors(tmp_path_factory.mktemp("models") / "tiny-kolors")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny-chroma")


@pytest.fixture(scope="session")
def tiny_hidream(tmp_path_factory) -> Path:
    return build_tiny_hidream(tmp_path_factory.mktemp("models") / "tiny-hidream")


@pytest.fixture(scope="session")
def tiny_wan21(tmp_path_factory) -> Path:
    return build_tiny_wan21(tmp_path_factory.mktemp("models") / "tiny-wan21")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def dataset(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO_DATA_DIR, tmp_path / "dataset"))


def sgm_single_file(sdxl_folder: Path, path: Path) -> Path:
    """A diffusers SDXL folder written as one all-in-one SGM checkpoint (sd_xl_base_1.0.safetensors' layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from eridiffusion.archs.sdxl.formats import diffusers_to_sgm

    load = dict(local_files_only=True)
    parts = {"unet": UNet2DConditionModel.from_pretrained(sdxl_folder, subfolder="unet", **load).state_dict(),
             "vae": AutoencoderKL.from_pretrained(sdxl_folder, subfolder="vae", **load).state_dict(),
             "text_encoder": CLIPTextModel.from_pretrained(sdxl_folder, subfolder="text_encoder", **load).state_dict(),
             "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(sdxl_folder, subfolder="text_encoder_2", **load).state_dict()}
    save_file({k: v.contiguous() for k, v in diffusers_to_sgm(parts).items()}, str(path))
    return path


def train_config(model_dir: Path, data_dir: Path, out: Path, *, arch="flux", name="test_lora", steps=6, **overrides) -> dict:
    """A small ai-toolkit-style config; `overrides` maps section -> dict of keys to update."""
    proc = {
        "type": "sd_trainer", "training_folder": str(out), "device": "cpu", "trigger_word": "shp3s",
        "training_seed": 7,
        "network": {"type": "lora", "linear": 4, "linear_alpha": 8},
        "save": {"dtype": "float32", "save_every": 3, "max_step_saves_to_keep": 2},
        "datasets": [{"folder_path": str(data_dir), "caption_ext": "txt", "resolution": [64],
                      "cache_latents_to_disk": True}],
        "train": {"batch_size": 2, "steps": steps, "lr": 1e-3, "optimizer": "adamw", "dtype": "fp32",
                  "cache_text_embeddings": True},
        "model": {"name_or_path": str(model_dir), "arch": arch},
        "sample": {"sample_every": 1000, "width": 32, "height": 32, "sample_steps": 2,
                   "prompts": ["[trigger] a red circle"]},
    }
    for section, values in overrides.items():
        if isinstance(proc.get(section), dict) and isinstance(values, dict):
            proc[section].update(values)
        else:
            proc[section] = values
    return {"job": "extension", "config": {"name": name, "process": [proc]}, "meta": {"name": "[name]"}}


@pytest.fixture
def write_config(tmp_path):
    def write(config: dict, filename="config.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path
    return write
