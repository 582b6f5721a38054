"""A 17B transformer (HiDream-I1-Full's, diffusers' class, random weights) LoRA step inside a 24 GiB cap with
a float8 base and block swap, built and fed exactly as ../shared/bench/reference_step.py's hidream_bs1_ckpt
(whose own step needs 34.5 GiB). The architecture itself comes later; this measures the shared machinery.

  PYTHONPATH=src python3 bench/hidream_step.py REFERENCE_STEP_PY SWAP_BLOCKS [CAP_GIB]
"""
import importlib.util
import json
import os
import sys

import torch

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs.blockwise import FrozenBase, finish_loaded
from eridiffusion.quant import Quantizer
from eridiffusion.train.compile import compile_denoiser
from eridiffusion.train.offload import BlockSwap
from timing import time_steps  # bench/timing.py

BLOCKS = ("double_stream_blocks", "single_stream_blocks")


def main():
    spec = importlib.util.spec_from_file_location("reference_step", sys.argv[1])
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    swap, cap = int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else None
    dev = torch.device("cuda")
    m, targets = ref.build("hidream")  # bf16, on the GPU
    m.requires_grad_(False)
    base = FrozenBase(dev, torch.bfloat16, quantizer=Quantizer("float8", ["x_embedder*", "t_embedder*", "p_embedder*",
                                                                          "final_layer*", "caption_projection*"]),
                      swap_blocks=swap)
    finish_loaded(m, base, BLOCKS)
    torch.cuda.empty_cache()
    if cap:
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(dev).total_memory)
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    params = inject_lora(m, names, LoraSpec(rank=16, alpha=16), seed=0)
    for p in params:
        p.data = p.data.to(dev)
    m.enable_gradient_checkpointing()
    m.train()
    if swap:
        BlockSwap([b for n in BLOCKS for b in getattr(m, n)], swap, dev).attach()
    m._repeated_blocks = ["HiDreamBlock"]  # diffusers names none for this class; compile each block
    compile_denoiser(m)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    kw, shape = ref.inputs("hidream", 1)
    target = torch.randn(shape, device=dev, dtype=torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(**kw)[0]
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _, seconds = time_steps(step, 3, 5)
    key = f"hidream_bs1_ckpt_float8_swap{swap}" + (f"_cap{cap:g}" if cap else "")
    result = {key: {"step_s": round(seconds, 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "n_lora": sum(p.numel() for p in params), "swapped_of": sum(len(getattr(m, n)) for n in BLOCKS)}}
    print(json.dumps(result))
    if os.environ.get("OUT"):
        json.dump(result, open(os.path.join(os.environ["OUT"], f"ours_{key}.json"), "w"))


if __name__ == "__main__":
    main()
