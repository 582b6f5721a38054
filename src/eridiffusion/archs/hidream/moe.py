"""HiDream's mixture-of-experts feed-forward in training, with one host sync per layer.

diffusers' MOEFeedForwardSwiGLU trains through boolean masks: for each of the 4 routed experts it gathers its rows
(`x[mask]`) and scatters their outputs back (`y[mask] = ...`), each a nonzero() that waits for the GPU: 8 syncs per
layer, 48 layers, forward and recompute. Here the (token, choice) rows are sorted by expert once, split by the
experts' row counts (read back once per layer), and put back in place with the inverse permutation: the same
experts on the same rows with the same routing weights, so the same outputs. (Written here: diffusers has no
training path without the masks; grouped matmuls would need the experts' weights stacked, which a quantized base or
LoRA on the experts does not allow.)"""
from __future__ import annotations

import types

import torch


def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MOEFeedForwardSwiGLU.forward, with the training path sorted by expert instead of masked."""
    if not self.training or self._force_inference_output:
        return type(self).forward(self, x)
    dtype, shape, k = x.dtype, x.shape, self.num_activated_experts
    topk_idx, topk_weight, _ = self.gate(x)
    expert_of = topk_idx.reshape(-1)  # row t * k + j: token t's j-th expert
    order = expert_of.argsort(stable=True)
    counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()  # the one sync
    rows = x.reshape(-1, shape[-1])[order // k]
    # every expert runs, an empty one on no rows, as diffusers' loop does (its parameters still get gradients)
    out = torch.cat([expert(part).to(dtype) for expert, part in zip(self.experts, rows.split(counts))])
    out = out[order.argsort()]  # back to token-major order
    y = (out.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.view(*shape).to(dtype) + self.shared_experts(x)


def sort_routed_experts(transformer: torch.nn.Module) -> int:
    """Give every MoE feed-forward of `transformer` the sorted training path; returns how many."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    layers = [m for m in transformer.modules() if isinstance(m, MOEFeedForwardSwiGLU)]
    for layer in layers:
        layer.forward = types.MethodType(routed_forward, layer)
    return len(layers)
