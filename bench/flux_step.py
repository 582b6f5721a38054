"""Our LoRA training step on full-size FLUX.1 (random weights, 1024x1024, bs 1, rank 16, gradient
checkpointing), timed as ../shared/bench/reference_step.py times its step: 2 warm-up steps, then the
mean of 8, peak memory after the warm-up. Run both in one device call and compare ratios.

  PYTHONPATH=src python3 bench/flux_step.py [--eager]

By default the step is what a run does with `model.compile` unset: on CUDA with Triton, regional
torch.compile of the repeated blocks. `--eager` measures `model.compile: false`.
"""
import json
import os
import sys
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs.flux import Flux
from eridiffusion.config import load_config
from eridiffusion.data import Batch
from eridiffusion.train.compile import compile_denoiser, want_compile
from eridiffusion.train.loop import Stepper
from eridiffusion.train.optim import build_optimizer, build_scheduler

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward fails on Flux shapes (torch 2.11 + CUDA 13)


def main():
    dev = torch.device("cuda")
    proc = load_config(os.path.join(os.path.dirname(__file__), "flux_step.yaml")).config.process[0]
    arch = Flux(proc, dev, torch.bfloat16)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                             num_attention_heads=24, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    torch.set_default_dtype(torch.float32)
    arch.attach(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    spec = LoraSpec(rank=proc.network.linear, alpha=proc.network.linear_alpha)
    params = inject_lora(transformer, arch.lora_components(True, False)["transformer"].linear, spec, seed=0)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    compiled = want_compile(False if "--eager" in sys.argv else None, dev)
    if compiled:
        compile_denoiser(transformer)
    opt = build_optimizer("adamw", params, 1e-4, {})
    sched = build_scheduler("constant", opt, {}, 100)
    gen = torch.Generator(dev).manual_seed(0)
    stepper = Stepper(arch, params, opt, sched, dtype=torch.bfloat16, max_grad_norm=1.0, generator=gen)
    g = torch.Generator(dev).manual_seed(0)
    batch = Batch(  # cached latents and text embeddings, as a run with caching on sees them
        pixels=None, latents=torch.randn(1, 16, 128, 128, device=dev, dtype=torch.bfloat16, generator=g),
        captions=[""], text={"prompt_embeds": torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g),
                             "pooled_prompt_embeds": torch.randn(1, 768, device=dev, dtype=torch.bfloat16, generator=g)},
        original_sizes=[(1024, 1024)], crop_top_lefts=[(0, 0)], target_sizes=[(1024, 1024)], paths=[],
        loss_weights=torch.ones(1))
    for _ in range(4 if compiled else 2):
        stepper.step([batch])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(8):
        stepper.step([batch])
    torch.cuda.synchronize()
    result = {"flux_bs1_ckpt" + ("" if compiled else "_eager"): {"step_s": round((time.perf_counter() - t) / 8, 4),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                "n_lora": sum(p.numel() for p in params)}}
    print(json.dumps(result))
    out = os.environ.get("OUT")
    if out:
        json.dump(result, open(os.path.join(out, f"ours_flux{'' if compiled else '_eager'}.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())
