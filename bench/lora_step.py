"""Our LoRA training step on full-size FLUX.1 or SDXL (random weights, 1024x1024, rank 16, gradient
checkpointing, bf16, AdamW, cached latents and text embeddings), timed as ../shared/bench/reference_step.py
times its step: 2 warm-up steps (4 when compiled), then the mean of 8, peak memory after the warm-up.
Run both in one device call and compare ratios.

  PYTHONPATH=src python3 bench/lora_step.py {flux|sdxl} [--bs N] [--eager] [--qtype float8|int8|nf4]
                                           [--swap K] [--cap GIB] [--error]

By default the step is what a run does with `model.compile` unset: on CUDA with Triton, regional
torch.compile of the repeated blocks. `--eager` measures `model.compile: false`. `--qtype` quantizes the
frozen base as `model.quantize` does, `--swap K` swaps the last K blocks (block swap), `--cap GIB` limits
the process to that much GPU memory (a 24 GB card: --cap 24), `--error` reports the relative output error
of the quantized base against bf16 on fixed inputs (no LoRA) before timing.
"""
import argparse
import json
import os
import sys

import torch

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs import get_arch_class
from eridiffusion.archs.blockwise import FrozenBase, finish_loaded
from eridiffusion.quant import Quantizer, relative_error
from eridiffusion.config import parse_config
from eridiffusion.data import Batch
from eridiffusion.train.attention import attention_kernels, choose_attention
from eridiffusion.train.compile import compile_denoiser, want_compile
from eridiffusion.train.graphs import StepGraphs
from eridiffusion.train.loop import Stepper
from eridiffusion.train.memory import enable_checkpointing
from eridiffusion.train.optim import build_optimizer, build_scheduler
from timing import time_steps  # bench/timing.py

torch.backends.cuda.matmul.allow_tf32 = True


def build(arch_name, arch, dev, bs, finish=True, small=False):
    """The full-size denoiser with random weights, its scheduler, and one batch of latents/text. `small`: the
    same classes a few widths wide, to try a script on the CPU before a device call."""
    g = torch.Generator(dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        if arch_name == "flux":
            from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

            size = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)) if small else dict(
                        num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
            model = FluxTransformer2DModel(guidance_embeds=True, **size)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
            side, tokens = (16, 8) if small else (128, 512)
            latents = r(bs, 16, side, side)
            text = {"prompt_embeds": r(bs, tokens, size["joint_attention_dim"]), "pooled_prompt_embeds": r(bs, size["pooled_projection_dim"])}
        else:
            from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

            size = dict(sample_size=16, block_out_channels=(32, 64, 64), cross_attention_dim=32, transformer_layers_per_block=(1, 1, 1),
                        attention_head_dim=(2, 4, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=64) if small else dict(
                        sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                        attention_head_dim=(5, 10, 20), addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            model = UNet2DConditionModel(
                in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), **size)
            scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            side, width = size["sample_size"], size["cross_attention_dim"]
            pooled = size["projection_class_embeddings_input_dim"] - 6 * size["addition_time_embed_dim"]
            latents, text = r(bs, 4, side, side), {"prompt_embeds": r(bs, 77, width), "pooled_prompt_embeds": r(bs, pooled)}
    torch.set_default_dtype(torch.float32)
    model._eri_finished = not finish  # --error quantizes it after a bf16 forward
    arch.attach(**{"transformer" if arch_name == "flux" else "unet": model}, scheduler=scheduler)
    batch = Batch(pixels=None, latents=latents, captions=[""] * bs, text=text, original_sizes=[(1024, 1024)] * bs,
                  crop_top_lefts=[(0, 0)] * bs, target_sizes=[(1024, 1024)] * bs, paths=[], loss_weights=torch.ones(bs))
    return model, batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=["flux", "sdxl"])
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--qtype", choices=["float8", "int8", "nf4"])
    ap.add_argument("--swap", type=int, default=0)
    ap.add_argument("--cap", type=float)
    ap.add_argument("--error", action="store_true")
    ap.add_argument("--fp8mm", action="store_true", help="model.float8_matmul (with --qtype float8)")
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of one step, most time first")
    ap.add_argument("--attention", default="native", help="train.attention_backend (native: cuDNN's kernel first on sm90+)")
    ap.add_argument("--keep", type=int, default=0, help="blocks left whole (not checkpointed), the first K")
    ap.add_argument("--no-ckpt", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--ac-budget", type=float, help="instead of checkpointing: each compiled block's partitioner keeps this "
                    "fraction of its activations and recomputes the cheapest of the rest (torch's activation_memory_budget)")
    ap.add_argument("--cuda-graph", action="store_true", help="train.cuda_graphs: the step replayed from CUDA graphs")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.cap:
        torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / torch.cuda.get_device_properties(dev).total_memory)
    cfg = {"job": "extension", "config": {"name": "bench", "process": [{
        "type": "sd_trainer", "device": "cuda:0", "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "datasets": [{"folder_path": "unused"}], "model": {"name_or_path": "unused", "arch": args.arch},
        "train": {"batch_size": args.bs, "lr": 1e-4, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True}}]}}
    proc = parse_config(cfg).config.process[0]
    arch = get_arch_class(args.arch)(proc, dev, torch.bfloat16)
    arch.base = FrozenBase(dev, torch.bfloat16, quantizer=Quantizer(args.qtype, list(arch.quantize_exclude)),
                           swap_blocks=args.swap, float8_matmul=args.fp8mm)
    error = None
    if args.error:  # the bf16 output first, then the same model quantized in place
        model, batch = build(args.arch, arch, dev, args.bs, finish=False)
        outputs = []
        hook = model.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().float()))
        for _ in range(2):  # the same noise and timestep both times: only the weights differ
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                arch.training_loss(batch.latents, batch.text, batch, torch.Generator(dev).manual_seed(1))
            if not outputs[1:]:
                model._eri_finished = False
                finish_loaded(model, arch.base, arch.block_lists)
        hook.remove()
        error = relative_error(outputs[1], outputs[0])
        del outputs
    else:
        model, batch = build(args.arch, arch, dev, args.bs)
    attention = choose_attention(args.attention, dev, getattr(arch, "attention_kernel", None))
    params = []
    for t in arch.lora_components(transformer_only=True, train_text_encoder=False).values():
        params += inject_lora(t.module, t.linear, LoraSpec(rank=16, alpha=16), seed=0)
    for p in params:
        p.data = p.data.to(dev)
    if args.ac_budget is not None:
        torch._functorch.config.activation_memory_budget = args.ac_budget
    if not (args.no_ckpt or args.ac_budget is not None):
        blocks = [b for n in arch.block_lists for b in getattr(model, n)]
        enable_checkpointing(model, blocks[:args.keep], preserve_rng=False)
    if args.swap:
        from eridiffusion.train.offload import BlockSwap

        BlockSwap([b for n in arch.block_lists for b in getattr(model, n)], args.swap, dev).attach()
    model.train()
    compiled = want_compile(False if args.eager else None, dev)
    if compiled:
        compile_denoiser(model, attention=attention)
    opt = build_optimizer("adamw", params, 1e-4, {})
    stepper = Stepper(arch, params, opt, build_scheduler("constant", opt, {}, 100), dtype=torch.bfloat16,
                      max_grad_norm=1.0, generator=torch.Generator(dev).manual_seed(0))
    def step():
        with attention_kernels(attention):
            return stepper.step([batch])

    if args.cuda_graph:  # train.cuda_graphs: captured on the third step, replayed from the fourth
        stepper.graphs = StepGraphs(params, opt, stepper.generator, room=True)
    _, seconds = time_steps(step, 4 if compiled else 2, 8)
    key = (f"{args.arch}_bs{args.bs}" + ("" if compiled else "_eager") + (f"_{args.qtype}" if args.qtype else "") + ("_fp8mm" if args.fp8mm else "")
           + (f"_swap{args.swap}" if args.swap else "") + (f"_keep{args.keep}" if args.keep else "") + f"_{attention}"
           + ("_nockpt" if args.no_ckpt else "") + ("_graph" if args.cuda_graph else "") + (f"_acb{args.ac_budget:g}" if args.ac_budget is not None else "") + (f"_cap{args.cap:g}" if args.cap else ""))
    result = {key: {"step_s": round(seconds, 4),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "n_lora": sum(p.numel() for p in params),
                    "output_error": None if error is None else round(error, 4)}}
    print(json.dumps(result))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    if os.environ.get("OUT"):
        json.dump(result, open(os.path.join(os.environ["OUT"], f"ours_{key}.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())
