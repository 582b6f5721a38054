"""Which of torch's SDPA kernels runs the attention (`train.attention_backend`, ai-toolkit's key: diffusers'
backend names). On an H200, cuDNN's fused attention ran 1.7-1.9x as fast as FlashAttention-2 forward and backward
at 128-wide heads, yet some models' steps ran slower with it (bench/RESULTS.md), and which kernel SDPA tries first
depends on the torch build (recent ones put cuDNN first on sm90/sm100 with cuDNN > 9.15). So `native`, the default,
puts first the kernel the architecture measured fastest with (its `attention_kernel`), cuDNN only on sm90+ and once
a small forward and backward on this GPU agrees with the math kernel. `_native_cudnn`, `_native_flash`, ... put
that kernel first for any model, including those whose attention processors call SDPA directly rather than through
diffusers' dispatch. SDPA still falls back down the order for a call the first kernel refuses (a mask, a head
size), so the choice never makes a call fail that would have run."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
TORCH_ORDER = ("flash", "efficient", "math", "cudnn")  # after the kernel put first: SDPA's order without a preference


def choose_attention(backend: str, device: torch.device, preferred: str | None = None) -> str:
    """The SDPA kernel to put first for `train.attention_backend`, or `default` (SDPA's own order). `native`: the
    architecture's `preferred` kernel (its `attention_kernel`), cuDNN only on GPUs of compute capability 9.0+
    (where it was measured) when `cudnn_works` on this one."""
    if device.type != "cuda" or not through_sdpa(backend):
        return "default"  # the CPU, or a backend outside SDPA (flash-attn, sage, ...) that diffusers runs
    if backend == "native":
        if preferred == "cudnn" and (torch.cuda.get_device_capability(device) < (9, 0) or not cudnn_works(device)):
            return "default"
        return preferred or "default"
    first = backend.removeprefix("_native_")
    if first == "cudnn" and not cudnn_works(device):
        raise RuntimeError("train.attention_backend: _native_cudnn: cuDNN's attention failed or disagreed with the "
                           "math kernel on this GPU and torch build; use native or _native_flash")
    return first


def through_sdpa(backend: str) -> bool:
    """Whether a `train.attention_backend` name is torch's SDPA (`native`, or `_native_<kernel>` for one of
    BACKENDS), which this module steers; diffusers' set_attention_backend runs the others."""
    return backend == "native" or (backend.startswith("_native_") and backend.removeprefix("_native_") in BACKENDS)


def cudnn_works(device: torch.device) -> bool:
    """A forward and backward through cuDNN's attention at the head sizes diffusion models use, against the math
    kernel in fp32: False if it raises, refuses the shape, or disagrees by more than bf16 rounding would."""
    g = torch.Generator(device).manual_seed(0)
    try:
        for dim in (64, 128):
            # an odd token count and (batch, tokens, heads, dim) views, as diffusers' processors pass them
            q, k, v = (torch.randn(1, 333, 4, dim, device=device, generator=g, dtype=torch.bfloat16).transpose(1, 2)
                       .requires_grad_() for _ in range(3))
            grad = torch.randn(1, 4, 333, dim, device=device, generator=g, dtype=torch.bfloat16)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
            q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                out = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32)
                want = [out, *torch.autograd.grad(out, (q32, k32, v32), grad.float())]
            if any(((a.float() - b).norm() / b.norm()).item() > 0.02 for a, b in zip(got, want)):
                return False
    except RuntimeError:  # no kernel for this GPU / build, or its execution failed
        return False
    return True


def attention_kernels(choice: str):
    """A context in which SDPA tries `choice` first, then the rest in torch's order. Enter it around the steps and
    samples, and inside compiled code too: torch.compile picks the kernel when it traces, and its caches do not key
    on the SDPA settings, while a context inside the compiled function is part of the graph it caches."""
    if choice == "default":
        return contextlib.nullcontext()
    order = [choice] + [name for name in TORCH_ORDER if name != choice]
    return sdpa_kernel([BACKENDS[name] for name in order], set_priority=True)
