"""Every adapter type on every registered architecture (the adapter half of the contract): the run learns, the
file's tensors give each layer's trained update by ComfyUI's own LoRA/LoHa/LoKr formulas (comfy/weight_adapter),
every module is complete, and the file read back through our loader gives the trainer's outputs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import load_lora_file_state, load_lora_state
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.archs import ARCHS, get_arch_class
from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state, load_state
from eridiffusion.train.loop import Run

from .conftest import train_config
from .test_arch_contract import controlled
from .test_flux_e2e import read_log

VARIANTS = {"lora": {"type": "lora"}, "dora": {"type": "dora"}, "locon": {"type": "locon"}, "loha": {"type": "loha"},
            "lokr": {"type": "lokr"},
            "lokr_factored": {"type": "lokr", "lokr_full_rank": False, "linear": 2, "linear_alpha": 4, "lokr_factor": 4}}


def comfy_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """The weight update ComfyUI computes from one module's tensors (lora.py / loha.py / lokr.py)."""
    if "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    if any(k.startswith("lokr_") for k in t):
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (alpha / dim if alpha is not None and dim is not None else 1.0) * torch.kron(w1, w2)
    down, up = t["lora_A.weight"], t["lora_B.weight"]
    return (alpha / down.shape[0] if alpha is not None else 1.0) * (up.flatten(1) @ down.flatten(1))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny_model(request, tmp_path_factory):
    return request.param, get_arch_class(request.param).build_tiny(tmp_path_factory.mktemp(request.param) / "model")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_adapter_type_trains_and_applies_as_comfyui_computes(tiny_model, variant, dataset, tmp_path, write_config):
    arch, model = tiny_model
    network = {"linear": 4, "linear_alpha": 8, **VARIANTS[variant]}
    if variant != "locon":  # conv layers too where the architecture has them (LoCon sets its own)
        network.update(conv=2, conv_alpha=1)
    cfg = train_config(model, dataset, tmp_path / "out", arch=arch, steps=24, network=network,
                       train={"lr": 1e-2, "batch_size": 4}, save={"save_every": 24})
    cfg["config"]["process"][0]["sample"] = None
    if getattr(get_arch_class(arch), "takes_control", False):  # each image its own control (paired by stem)
        cfg["config"]["process"][0]["datasets"][0]["control_path"] = str(dataset)
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-8:]) < sum(losses[:8])

    # the trainer's model at its last step, and the same model filled from the file by our loader
    cfg["config"]["process"][0]["train"]["cache_text_embeddings"] = False  # keep the text encoders for the probe
    proc = parse_config(cfg).config.process[0]
    trainer, reloaded = (Run(proc, {}) for _ in range(2))
    for name, t in trainer.components.items():
        load_lora_state(t.module, load_state(latest_state(run))["lora"][name])
    saved = load_file(run / "test_lora.safetensors")
    for name, state in reloaded.arch.lora_from_file(saved).items():
        load_lora_file_state(reloaded.components[name].module, state)

    # every adapted layer: ComfyUI's formula on the file's tensors == peft's trained update
    component = next(iter(trainer.components))  # the denoiser's
    layers = {n: m for n, m in trainer.components[component].module.named_modules() if hasattr(m, "get_delta_weight")}
    file_state = trainer.arch.lora_from_file(saved)[component]
    assert layers and {k.rsplit(".", 1)[0] if k.endswith(".alpha") else None for k in file_state} - {None} == set(layers)
    for name, layer in sorted(layers.items())[:12]:
        own = {k[len(name) + 1:]: v for k, v in file_state.items() if k.startswith(name + ".") and not k.endswith(".alpha")}
        alpha = file_state.get(f"{name}.alpha")
        expected = layer.get_delta_weight("default").detach()
        torch.testing.assert_close(comfy_delta(own, None if alpha is None else float(alpha)).reshape(expected.shape),
                                   expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        a, b = (_probe(r) for r in (trainer, reloaded))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert inspect_file(run / "test_lora.safetensors").adapter == {"locon": "lora", "lokr_factored": "lokr"}.get(variant, variant)


def _probe(run: Run) -> torch.Tensor:
    """The denoiser's prediction on fixed inputs, through the architecture's own loss path."""
    from eridiffusion.data import Batch

    d = run.arch.bucket_divisibility
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 2 * d, 2 * d, generator=g) * 2 - 1
    latents = run.arch.encode_images(*controlled(run.arch, pixels))
    text = run.arch.encode_prompts(["a red circle"])
    batch = Batch(pixels=pixels, latents=latents, captions=["a red circle"], text=text, original_sizes=[(2 * d, 2 * d)],
                  crop_top_lefts=[(0, 0)], target_sizes=[(2 * d, 2 * d)], paths=[], loss_weights=torch.ones(1))
    return run.arch.training_loss(latents, text, batch, torch.Generator().manual_seed(1))
