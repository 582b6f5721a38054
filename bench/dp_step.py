"""Several GPUs (issue 10): our LoRA step on full-size FLUX.1 or SDXL (1024², bs 1 per GPU, rank 16, gradient
checkpointing, bf16, AdamW, regional compile) under DDP, or one FSDP2 full fine-tune step of FLUX.1 (`--full`),
through the same code a run uses (train/distributed.py, Stepper). Start it with torchrun, once per GPU count:

  PYTHONPATH=src torchrun --standalone --nproc-per-node N bench/dp_step.py {flux|sdxl} [--full] [--profile]

Prints (process 0) images/s over all GPUs, s/step and the peak memory of every GPU; scaling efficiency is
images/s on N GPUs / (N x images/s on 1). `--profile` adds, from torch.profiler over 2 steps, the profiled step
time and the GPU time per step in NCCL kernels and in all other kernels (compute). NCCL kernels also count the
time they wait for the slowest process, and the all-reduce overlaps the backward, so for DDP it also times the
same steps with no gradient all-reduce (DDP's no_sync): step_s - step_s_no_allreduce is what communication costs.
Without a GPU (`--small`: the same classes a few widths wide, gloo, eager) it tries the script on the CPU.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs import get_arch_class
from eridiffusion.archs.blockwise import FrozenBase
from eridiffusion.config import parse_config
from eridiffusion.quant import Quantizer
from eridiffusion.train import distributed
from eridiffusion.train.compile import compile_denoiser
from eridiffusion.train.loop import Stepper
from eridiffusion.train.memory import enable_checkpointing
from eridiffusion.train.optim import build_optimizer, build_scheduler
from timing import time_steps  # bench/timing.py

torch.backends.cuda.matmul.allow_tf32 = True
_spec = importlib.util.spec_from_file_location("lora_step", Path(__file__).with_name("lora_step.py"))
lora_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=["flux", "sdxl"])
    ap.add_argument("--full", action="store_true", help="FSDP2 full fine-tune of the blocks instead of LoRA")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny widths (a CPU try of the script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    processes, dev = distributed.start(torch.device("cuda" if cuda else "cpu"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = {"job": "extension", "config": {"name": "bench", "process": [{
        "type": "sd_trainer", "device": str(dev), "datasets": [{"folder_path": "unused"}],
        "model": {"name_or_path": "unused", "arch": args.arch},
        "train": {"batch_size": 1, "lr": 1e-4, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True}}]}}
    if not args.full:
        cfg["config"]["process"][0]["network"] = {"type": "lora", "linear": 16, "linear_alpha": 16}
    arch = get_arch_class(args.arch)(parse_config(cfg).config.process[0], dev, torch.bfloat16)
    arch.base = FrozenBase(dev, torch.bfloat16, quantizer=Quantizer(None))
    model, batch = lora_step.build(args.arch, arch, dev, 1, small=args.small)
    blocks = [b for n in arch.block_lists for b in getattr(model, n)]
    ddp = sharded = None
    if args.full:
        model.requires_grad_(False)
        for b in blocks:
            b.requires_grad_(True)
        enable_checkpointing(model)
        if processes.world > 1:
            distributed.shard(model, blocks, dev)
            sharded = model
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = []
        for t in arch.lora_components(transformer_only=True, train_text_encoder=False).values():
            params += inject_lora(t.module, t.linear, LoraSpec(rank=16, alpha=16), seed=0)
        for p in params:
            p.data = p.data.to(dev)
        enable_checkpointing(model)
    model.train()
    if cuda:
        compile_denoiser(model)
    if processes.world > 1 and not args.full:
        ddp = distributed.data_parallel(arch, {"denoiser": model}, dev)
    opt = build_optimizer("adamw", params, 1e-4, {})
    stepper = Stepper(arch, params, opt, build_scheduler("constant", opt, {}, 100), dtype=torch.bfloat16,
                      max_grad_norm=1.0, generator=torch.Generator(dev).manual_seed(processes.rank), ddp=ddp,
                      sharded=sharded, processes=processes)
    _, step_s = time_steps(lambda: stepper.step([batch]), 4, args.steps, sync=lambda: (sync(), processes.barrier()))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=dev)
    peaks = [torch.zeros_like(peak) for _ in range(processes.world)] if processes.world > 1 else [peak]
    if processes.world > 1:
        dist.all_gather(peaks, peak)
    key = f"{args.arch}_{'fsdp_full' if args.full else 'ddp_lora'}_{processes.world}gpu"
    result = {key: {"gpus": processes.world, "step_s": round(step_s, 4), "images_per_s": round(processes.world / step_s, 3),
                    "peak_gib_per_gpu": [round(float(p), 2) for p in peaks], "trained_params": sum(p.numel() for p in params)}}
    if args.profile:
        result[key].update(split(stepper, batch, sync))
        if ddp is not None:
            with ddp.no_sync():
                _, seconds = time_steps(lambda: stepper.step([batch]), 0, args.steps, sync=lambda: (sync(), processes.barrier()))
            result[key]["step_s_no_allreduce"] = round(seconds, 4)
    if processes.main:
        print(json.dumps(result), flush=True)
        if os.environ.get("OUT"):
            json.dump(result, open(os.path.join(os.environ["OUT"], f"{key}.json"), "w"))
    distributed.stop()


def split(stepper, batch, sync, steps=2):
    """GPU milliseconds per step in NCCL kernels and in the rest, from the profiler (every process profiles, so
    collectives are not held back waiting for one)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step([batch])
        sync()
    wall = (time.perf_counter() - t) / steps
    comm = compute = 0.0
    for e in prof.events():
        us = e.time_range.elapsed_us() if e.device_type == torch.autograd.DeviceType.CUDA else 0.0
        if "nccl" in e.name.lower():
            comm += us
        else:
            compute += us
    return {"profiled_step_s": round(wall, 4), "gpu_compute_ms_per_step": round(compute / 1e3 / steps, 1), "gpu_nccl_ms_per_step": round(comm / 1e3 / steps, 1)}


if __name__ == "__main__":
    sys.exit(main())
