"""HiDream's routed experts in training through one grouped matmul per weight, instead of diffusers' masked loop,
which waits on the GPU 8 times per MoE layer (it sizes each expert's rows on the host) and so breaks each compiled
block into several graphs. Here every shape is static and nothing waits: the (token, choice) rows are sorted by
expert on the device, each expert's rows start at a multiple of ALIGN (rows of zeros pad the rest, at most ALIGN - 1
per expert), and `torch._grouped_mm` runs all experts at once on their weights, stacked per call (dequantized where
the base is quantized). The same experts see the same rows with the same routing weights as in diffusers' loop.
Measured on the H200 (bench/RESULTS.md): the 17B transformer's LoRA step 0.93 s against 1.01 s with diffusers' loop.

Written here because diffusers' MoE layer has no grouped path, and torch's grouped matmul is the maintained kernel."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ...quant import dequantized

ALIGN = 16  # rows per expert group rounded up to this (the CUDA grouped kernels' alignment)


def grouped_ready(layer, x: torch.Tensor) -> bool:
    """Whether this call can take the grouped path: training, plain expert Linears (an adapter on an expert, which
    ai-toolkit's example excludes with ignore_if_contains, keeps diffusers' loop), and a device with the kernel
    (CUDA: Hopper or newer, bf16; the CPU: any float)."""
    if not layer.training or layer._force_inference_output:
        return False
    if any(type(m) is not torch.nn.Linear for e in layer.experts for m in (e.w1, e.w2, e.w3)):
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device) >= (9, 0) and layer.experts[0].w1.weight.dtype == torch.bfloat16
    return x.device.type == "cpu"


def grouped_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MOEFeedForwardSwiGLU.forward with its training path through grouped matmuls (diffusers' own otherwise)."""
    if not grouped_ready(self, x):
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
    """Give every MoE feed-forward of `transformer` the grouped training path; returns how many."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    layers = [m for m in transformer.modules() if isinstance(m, MOEFeedForwardSwiGLU)]
    for layer in layers:
        layer.forward = types.MethodType(grouped_forward, layer)
    return len(layers)
