"""Regional torch.compile of the denoiser: each repeated block compiled once and reused, falling back to
eager execution if the compiler fails on some shape, so a compiler bug never costs a run."""
from __future__ import annotations

import importlib.util
import sys

import torch


def want_compile(setting: bool | None, device: torch.device) -> bool:
    """`model.compile`, or when unset: on for CUDA where Triton is installed (~25% faster Flux steps on an H100)."""
    if setting is not None:
        return setting
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_denoiser(denoiser: torch.nn.Module, backend="inductor") -> None:
    # Inductor's coalescing analysis asserted on the dynamic-shape graph of small buckets (torch 2.11, H100)
    torch._inductor.config.triton.coalesce_tiling_analysis = False
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names] or [denoiser]

    warned = []

    def fall_back(block, err: Exception) -> None:
        # only the failing block: one that already ran compiled in this step must recompute (checkpointing) the same way
        block._compiled_call_impl = None
        if not warned:
            warned.append(err)
            text = str(err).strip() or type(err).__name__
            print(f"warning: torch.compile failed ({text[:300]}); continuing uncompiled (set model.compile: false to "
                  "skip compilation)", file=sys.stderr)

    for block in blocks:
        compiled = torch.compile(_with_own_outputs(block._call_impl), backend=backend)

        def call(*args, _compiled=compiled, _block=block, **kwargs):
            try:
                return _compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                fall_back(_block, err)
                return _block._call_impl(*args, **kwargs)

        block._compiled_call_impl = call  # what nn.Module.compile() sets; the module calls it instead of forward


def _with_own_outputs(fn):
    # a block returning views of one tensor (Flux's single block splits its output in two) breaks AOTAutograd
    # once weights are tensor subclasses (quantized); a copy of each output costs one activation's bandwidth
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
        return out
    return run
