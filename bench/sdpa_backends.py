"""Which SDPA backends run a model's self-attention forward and backward on this GPU, how fast, and how close to
flash's results: eager and inside torch.compile, with q/k/v laid out as diffusers hands them to SDPA (views of
(batch, tokens, heads, dim), the gradient arriving the same way) or made contiguous first.

  python3 bench/sdpa_backends.py [flux wan13b wan14b ...]
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"flux": (4608, 24, 128), "wan13b": (32760, 12, 128), "wan14b": (32760, 40, 128), "hidream": (4224, 20, 128),
          "sd3": (4429, 38, 64)}  # tokens, heads, head dim at 1024² / 832x480x81


def attend(q, k, v, contiguous):  # (batch, tokens, heads, dim) in and out, as diffusers' attention processors do
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if contiguous:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def timed(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    for case in sys.argv[1:] or ["flux", "wan13b"]:
        tokens, heads, dim = SHAPES[case]
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        iters = 10 if tokens < 10000 else 4
        want = None
        for backend in ("flash", "cudnn"):
            for mode in ("eager", "eager_contiguous", "compiled", "compiled_contiguous"):
                torch._dynamo.reset()
                fn = lambda a, b, c, m=mode: attend(a, b, c, "contiguous" in m)
                if mode.startswith("compiled"):
                    fn = torch.compile(fn)
                order = [SDPBackend.CUDNN_ATTENTION] * (backend == "cudnn") + [SDPBackend.FLASH_ATTENTION]
                try:
                    with sdpa_kernel(order, set_priority=True):
                        def both():
                            q.grad = k.grad = v.grad = None
                            fn(q, k, v).backward(grad)
                        fwd = timed(lambda: fn(q, k, v), iters)
                        total = timed(both, iters)
                        out = fn(q, k, v)
                        both()
                    got = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
                    if want is None:
                        want = got
                    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))
                    row = {"fwd_ms": round(fwd * 1e3, 3), "bwd_ms": round((total - fwd) * 1e3, 3), "rel_err_vs_flash": round(err, 5)}
                except Exception as e:  # a backend that refuses these shapes: say so and go on
                    row = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps({f"sdpa_{case}_{backend}_{mode}": row}), flush=True)


if __name__ == "__main__":
    main()
