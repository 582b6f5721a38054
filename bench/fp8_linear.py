"""One frozen Linear of FLUX.1's sizes, forward + input gradient, compiled: bf16, the float8 weight-only
path (dequantize, bf16 matmul), and fp8 tensor-core matmuls with activations scaled per row or per tensor.
Finds where the fp8 step's time goes without building the 12B model.

  PYTHONPATH=src python3 bench/fp8_linear.py
"""
import json
import time

import torch

from eridiffusion.quant import Float8Matmul, quantize_weight

E4M3 = torch.float8_e4m3fn


def tensorwise(t):
    scale = (t.abs().amax().float() / torch.finfo(E4M3).max).clamp_min(1e-12)
    return (t.float() / scale).to(E4M3), scale


class TensorwiseMatmul(torch.autograd.Function):
    """fp8 matmuls with one scale per activation/gradient tensor; W's per-row scales applied to the output
    (forward) or folded into the gradient (backward), so the matmul itself needs no per-row scale."""

    @staticmethod
    def forward(ctx, x, qdata, scale):
        xq, sx = tensorwise(x)
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(xq, qdata.t(), scale_a=sx, scale_b=one, out_dtype=torch.bfloat16)
        ctx.save_for_backward(qdata, scale)
        return y * scale.reshape(1, -1)

    @staticmethod
    def backward(ctx, grad):
        qdata, scale = ctx.saved_tensors
        gq, sg = tensorwise(grad.float() * scale.reshape(1, -1))
        one = torch.ones((), device=grad.device)
        return torch._scaled_mm(gq, qdata.t().contiguous().t(), scale_a=sg, scale_b=one, out_dtype=torch.bfloat16), None, None


def timed(fn, x, grad, n=50):
    for _ in range(3):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    dev = torch.device("cuda")
    results = {}
    for m, k, n in [(4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072), (4096, 3072, 3072)]:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q = quantize_weight(w, "float8")
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        variants = {
            "bf16": lambda x: torch.nn.functional.linear(x, w),
            "weight_only_f8": lambda x: torch.nn.functional.linear(x, q.dequantize().to(torch.bfloat16)),
            "rowwise_fp8mm": lambda x: Float8Matmul.apply(x, q.qdata, q.scale, None),
            "tensorwise_fp8mm": lambda x: TensorwiseMatmul.apply(x, q.qdata, q.scale),
        }
        row = {}
        exact_y = x.float() @ w.float().t()
        for name, fn in variants.items():
            c = torch.compile(fn)
            row[name + "_ms"] = round(timed(c, x, grad), 3)
            with torch.no_grad():
                y = c(x).float()
            row[name + "_err"] = round(float((y - exact_y).norm() / exact_y.norm()), 4)
        flops = 2 * 2 * m * k * n
        row["bf16_tflops"] = round(flops / row["bf16_ms"] / 1e9, 1)
        results[f"{m}x{k}x{n}"] = row
        print(json.dumps({f"{m}x{k}x{n}": row}), flush=True)


if __name__ == "__main__":
    main()
