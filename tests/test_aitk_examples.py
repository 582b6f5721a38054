"""ai-toolkit's own FLUX.1 / Flex.1 / schnell / SD 3.5 / Chroma / HiDream / Wan 2.1 1.3B example configs, verbatim from ../shared/aitk-examples/, run
through the CLI with only paths, sizes and the CUDA-only optimizer changed. The README's list of examples
that run is this test's list."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from eridiffusion import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "aitk-examples"
RUNS = ["train_lora_flux_24gb.yaml", "train_lora_flex_24gb.yaml", "train_lora_flux_schnell_24gb.yaml",
        "modal/modal_train_lora_flux_24gb.yaml", "modal/modal_train_lora_flux_schnell_24gb.yaml",
        "train_full_fine_tune_flex.yaml", "train_lora_sd35_large_24gb.yaml", "train_lora_chroma_24gb.yaml",
        "train_lora_hidream_48.yaml", "train_lora_wan21_1b_24gb.yaml", "train_lora_wan21_14b_24gb.yaml"]


def adapted(example: str, model: Path, data: Path, out: Path, assistant: Path | None, llama: Path | None = None) -> dict:
    """The example with paths pointed here, sizes made tiny, and adamw8bit (bitsandbytes, CUDA) -> adamw."""
    path = EXAMPLES / example
    assert path.is_file(), f"{path} is missing: the ai-toolkit examples live in ../shared/aitk-examples/"
    cfg = yaml.safe_load(path.read_text())
    proc = cfg["config"]["process"][0]
    proc.update(training_folder=str(out), device="cpu")
    proc["model"]["name_or_path"] = str(model)
    if "assistant_lora_path" in proc["model"]:
        proc["model"]["assistant_lora_path"] = str(assistant)
    if "extras_name_or_path" in proc["model"]:
        proc["model"]["extras_name_or_path"] = str(model)
    if "llama_model_path" in proc["model"].get("model_kwargs", {}):
        proc["model"]["model_kwargs"]["llama_model_path"] = str(llama)
    for ds in proc["datasets"]:
        ds.update(folder_path=str(data), resolution=[32, 48])
    proc["train"].update(steps=4, optimizer="adamw" if proc["train"]["optimizer"] == "adamw8bit" else proc["train"]["optimizer"])
    proc["save"]["save_every"] = 2
    proc["sample"].update(sample_every=4, width=32, height=32, sample_steps=2)
    return cfg


def tiny_adapter(model: Path, path: Path) -> Path:
    """A small random LoRA in the diffusers layout over some of the tiny model's Linears (the stand-in for
    ostris/FLUX.1-schnell-training-adapter, which is in this layout)."""
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", local_files_only=True)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, layer in m.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(("to_q", "proj_mlp", "ff.net.2")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.1
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.1
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("example", RUNS)
def test_ai_toolkit_example_runs(example, request, dataset, tmp_path, write_config):
    own = {"sd35": "tiny_sd3", "hidream": "tiny_hidream", "chroma": "tiny_chroma", "schnell": "tiny_flux_schnell",
           "wan21": "tiny_wan21"}  # file name part -> fixture
    model = request.getfixturevalue(next((f for part, f in own.items() if part in example), "tiny_flux"))
    adapter = None if any(k in example for k in ("sd35", "chroma", "hidream", "wan21")) else tiny_adapter(model, tmp_path / "adapter.safetensors")
    llama = request.getfixturevalue("tiny_llama") if "hidream" in example else None
    cfg = adapted(example, model, dataset, tmp_path / "out", adapter, llama)
    proc = cfg["config"]["process"][0]
    assert proc["model"].get("quantize") or proc["model"].get("quantize_te")  # each quantizes (qfloat8)
    assert cli.main([str(write_config(cfg, Path(example).name))]) == 0
    run = tmp_path / "out" / cfg["config"]["name"]
    saved = load_file(run / f"{cfg['config']['name']}.safetensors")  # the LoRA, or the fine-tuned model
    assert saved and all(torch.isfinite(v.float()).all() for v in saved.values())
    clip = proc["sample"].get("num_frames", 1) > 1  # Wan's: its 40 frames (41, 4k + 1) as .mp4
    assert len(list((run / "samples").glob("*.mp4" if clip else "*.jpg"))) == 2 * len(proc["sample"]["prompts"])  # step 0 and the end
