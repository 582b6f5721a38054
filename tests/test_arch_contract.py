"""The contract every registered architecture keeps, checked on its tiny random-weight model:
encode, noise and predict with gradients reaching the LoRA, the same loss and gradients with gradient
checkpointing, LoRA keys that survive the file layout both ways, and a preview image of the asked size."""
from __future__ import annotations

import pytest
import torch

from eridiffusion.adapters import LoraSpec, inject_lora, lora_alphas, lora_state
from eridiffusion.archs import ARCHS, SampleRequest, get_arch_class
from eridiffusion.config import parse_config
from eridiffusion.data import Batch

from .conftest import train_config


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory):
    name = request.param
    cls = get_arch_class(name)
    folder = cls.build_tiny(tmp_path_factory.mktemp(name) / "model")
    cfg = train_config(folder, folder, folder, model={"name_or_path": str(folder), "arch": name})
    arch = cls(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    params = []
    for t in arch.lora_components(transformer_only=True, train_text_encoder=False).values():
        params += inject_lora(t.module, t.linear, LoraSpec(rank=4, alpha=4), conv_targets=t.conv,
                              conv_spec=LoraSpec(rank=2, alpha=1), seed=0)
    with torch.no_grad():  # non-zero LoRA B, so that the LoRA changes outputs and gets gradients on A too
        for p in params:
            p.normal_(std=0.02)
    return arch, params


def loss_and_grads(arch, params, checkpointing: bool):
    arch.denoiser.train()
    if checkpointing:
        arch.denoiser.enable_gradient_checkpointing()
    else:
        arch.denoiser.disable_gradient_checkpointing()
    d = arch.bucket_divisibility
    pixels = torch.rand(2, 3, 2 * d, 3 * d, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = arch.encode_images(*controlled(arch, pixels))
    text = arch.encode_prompts(["a red circle", "a green square"])
    batch = Batch(pixels=pixels, latents=latents, captions=["a red circle", "a green square"], text=text,
                  original_sizes=[tuple(pixels.shape[2:])] * 2, crop_top_lefts=[(0, 0)] * 2,
                  target_sizes=[tuple(pixels.shape[2:])] * 2, paths=[], loss_weights=torch.ones(2))
    loss = arch.training_loss(latents, text, batch, torch.Generator().manual_seed(1)).mean()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def controlled(arch, pixels: torch.Tensor) -> list[torch.Tensor]:
    """encode_images' arguments: the pixels, and for an architecture that takes controls a control of their layout."""
    return [pixels, pixels.flip(-1)] if getattr(arch, "takes_control", False) else [pixels]


def test_loss_and_gradients(arch):
    arch, params = arch
    loss, grads = loss_and_grads(arch, params, checkpointing=False)
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) == len(grads)  # every LoRA matrix learns


def test_gradient_checkpointing_changes_nothing(arch):
    arch, params = arch
    loss_a, grads_a = loss_and_grads(arch, params, checkpointing=False)
    loss_b, grads_b = loss_and_grads(arch, params, checkpointing=True)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def test_lora_file_layout_round_trips(arch):
    arch, params = arch
    states = {}
    for name, t in arch.lora_components(transformer_only=True, train_text_encoder=False).items():
        states[name] = {**lora_state(t.module), **{f"{m}.alpha": torch.tensor(float(a)) for m, a in lora_alphas(t.module).items()}}
    back = arch.lora_from_file(arch.lora_to_file(states))
    assert back.keys() == states.keys()
    for name, state in states.items():
        assert back[name].keys() == state.keys() and all(torch.equal(back[name][k], state[k]) for k in state)


def test_preview_has_the_asked_size(arch, tmp_path):
    arch, _ = arch
    d = arch.bucket_divisibility
    arch.denoiser.eval()
    ctrl_img = None
    if getattr(arch, "takes_ctrl_img", False):  # image-to-video's start image, a control model's control image
        from PIL import Image

        Image.new("RGB", (5 * d, 2 * d), (200, 40, 40)).save(ctrl_img := tmp_path / "start.png")
    image = arch.generate(SampleRequest(text=arch.encode_prompts(["a red circle"]), neg_text=None,
                                        width=3 * d, height=2 * d, steps=2, guidance_scale=3.5, seed=0,
                                        ctrl_img=ctrl_img and str(ctrl_img)))
    assert image.size == (3 * d, 2 * d)
