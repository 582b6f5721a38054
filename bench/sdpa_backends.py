"""Which SDPA backends run FLUX.1's attention (1 x 24 heads x 4608 tokens x 128, bf16) forward and backward
on this GPU, and how fast: flash (FA2) is the fallback; cuDNN's backward failed here before."""
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    g = torch.Generator("cuda").manual_seed(0)
    # Flux lays q/k/v out as (batch, tokens, heads, dim) and transposes: non-contiguous views, as here
    q, k, v = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad = torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        for layout in ("views", "contiguous"):
            args = (q, k, v) if layout == "views" else tuple(t.detach().contiguous().requires_grad_() for t in (q, k, v))
            try:
                with sdpa_kernel(backend):
                    for _ in range(3):
                        torch.nn.functional.scaled_dot_product_attention(*args).backward(grad)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(10):
                        torch.nn.functional.scaled_dot_product_attention(*args)
                    torch.cuda.synchronize()
                    fwd = (time.perf_counter() - t) / 10
                    t = time.perf_counter()
                    for _ in range(10):
                        torch.nn.functional.scaled_dot_product_attention(*args).backward(grad)
                    torch.cuda.synchronize()
                    both = (time.perf_counter() - t) / 10
                out[f"{name}_{layout}"] = {"fwd_ms": round(fwd * 1e3, 3), "bwd_ms": round((both - fwd) * 1e3, 3)}
            except Exception as err:  # a backend that refuses these shapes: say so and go on
                out[f"{name}_{layout}"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps({f"{name}_{layout}": out[f"{name}_{layout}"]}), flush=True)


if __name__ == "__main__":
    main()
