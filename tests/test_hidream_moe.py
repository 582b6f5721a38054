"""HiDream's experts through grouped matmuls (archs/hidream/moe.py) against diffusers' own masked loop."""
from __future__ import annotations

import copy

import pytest
import torch

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs.hidream.moe import use_grouped_experts


def _layers():
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(0)
    layer = MOEFeedForwardSwiGLU(dim=32, hidden_dim=96, num_routed_experts=4, num_activated_experts=2).train()
    ours = copy.deepcopy(layer)
    assert use_grouped_experts(ours) == 1
    return layer, ours


def _run(module, x):
    x = x.clone().requires_grad_()
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("unused_expert", [False, True])
def test_grouped_experts_give_diffusers_outputs_and_gradients(unused_expert):
    layer, ours = _layers()
    if unused_expert:  # an expert no token chooses: its group is empty
        with torch.no_grad():
            for m in (layer, ours):
                m.gate.weight[-1] = -10.0
    x = torch.rand(2, 40, 32)
    (y, gx), (y2, gx2) = _run(layer, x), _run(ours, x)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx2, gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, layer.gate.weight.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(layer.experts.parameters(), ours.experts.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_grouped_experts_trace_as_one_graph():
    # diffusers' loop sizes each expert's rows on the host, which breaks a compiled block; this path has no such step
    _, ours = _layers()
    ours = ours.to(torch.bfloat16)
    x = torch.rand(2, 40, 32, dtype=torch.bfloat16)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x))


def test_experts_with_an_adapter_keep_diffusers_loop_and_train():
    layer, ours = _layers()
    names = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("experts.")]
    params = inject_lora(ours, names, LoraSpec(rank=2, alpha=2), seed=0)
    ref_params = inject_lora(layer, names, LoraSpec(rank=2, alpha=2), seed=0)
    x = torch.rand(2, 40, 32)
    (y, _), (y2, _) = _run(layer, x), _run(ours, x)
    torch.testing.assert_close(y2, y)
    assert all(p.grad is not None for p in params)
    # LoRA B starts at zero: only the B matrices receive gradients on the first step, the same as diffusers' loop
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)


def test_inference_keeps_diffusers_path():
    layer, ours = _layers()
    layer.eval(), ours.eval()
    x = torch.rand(1, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), layer(x))
