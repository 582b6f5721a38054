"""Experiment for issue 11's HiDream target (bench/arch_step.py --grouped-moe): HiDream's routed experts in training
through torch's grouped matmul instead of diffusers' masked loop, which syncs with the host 8 times per MoE layer and
breaks each compiled block into several graphs. Here every shape is static and nothing waits for the GPU: the
(token, choice) rows are sorted by expert on the device, each expert's rows start at a multiple of ALIGN (padding
rows of zeros, at most ALIGN - 1 per expert), and one `torch._grouped_mm` per weight (w1, w3, w2) runs all experts,
with the experts' weights dequantized and stacked per call. Same experts on the same rows with the same routing
weights as diffusers' loop. Moves into archs/hidream once measured faster on the GPU.

  PYTHONPATH=src python3 bench/moe_grouped.py     # checks it against diffusers' loop on the CPU
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from eridiffusion.quant import dequantized

ALIGN = 16  # rows per expert group rounded up to this (the CUDA grouped kernels' alignment)


def grouped_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MOEFeedForwardSwiGLU.forward with the training path through grouped matmuls."""
    if not self.training or self._force_inference_output:
        return type(self).forward(self, x)
    dtype, shape, k, n_experts = x.dtype, x.shape, self.num_activated_experts, len(self.experts)
    topk_idx, topk_weight, _ = self.gate(x)
    expert_of = topk_idx.reshape(-1)  # row t * k + j: token t's j-th expert
    order = expert_of.argsort(stable=True)
    counts = torch.bincount(expert_of, minlength=n_experts)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    sorted_expert = expert_of[order]
    # the padded slot of each sorted row: its expert's padded start + its rank among that expert's rows
    rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
    slot = (padded.cumsum(0) - padded)[sorted_expert] + rank
    weights = {name: torch.stack([dequantized(getattr(e, name).weight) for e in self.experts]).transpose(-2, -1)
               for name in ("w1", "w2", "w3")}  # (experts, in, out) views of (experts, out, in)
    rows = x.new_zeros(order.numel() + n_experts * ALIGN, shape[-1], dtype=weights["w1"].dtype)
    rows = rows.index_copy(0, slot, x.reshape(-1, shape[-1])[order // k].to(rows.dtype))
    offs = padded.cumsum(0).to(torch.int32)
    hidden = F.silu(torch._grouped_mm(rows, weights["w1"], offs=offs)) * torch._grouped_mm(rows, weights["w3"], offs=offs)
    out = torch._grouped_mm(hidden, weights["w2"], offs=offs)[slot][order.argsort()].to(dtype)  # token-major
    y = (out.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.view(*shape).to(dtype) + self.shared_experts(x)


def use_grouped_experts(transformer: torch.nn.Module) -> int:
    """Give every MoE feed-forward of `transformer` the grouped training path; returns how many. The experts must
    carry no adapter: their weights are stacked as they are."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    layers = [m for m in transformer.modules() if isinstance(m, MOEFeedForwardSwiGLU)]
    for layer in layers:
        if any(type(m) is not torch.nn.Linear for e in layer.experts for m in (e.w1, e.w2, e.w3)):
            raise ValueError("grouped experts: an expert's Linear is wrapped (an adapter); leave the experts untrained")
        layer.forward = types.MethodType(grouped_forward, layer)
    return len(layers)


def main():
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(0)
    layer = MOEFeedForwardSwiGLU(dim=32, hidden_dim=96, num_routed_experts=4, num_activated_experts=2).train()
    ours = __import__("copy").deepcopy(layer)
    use_grouped_experts(ours)
    with torch.no_grad():  # route no row to the last expert
        for m in (layer, ours):
            m.gate.weight[-1] = -10.0
    x = torch.rand(2, 40, 32)
    results = []
    for m in (layer, ours):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xx.grad, m.gate.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # one graph (no data-dependent shapes); the compiler's shape rules for grouped matmuls take bf16 only
    ours = ours.to(torch.bfloat16)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.bfloat16()), ours(x.bfloat16()))
    print("grouped experts match diffusers' loop (outputs, input and gate gradients), and trace as one graph")


if __name__ == "__main__":
    main()
