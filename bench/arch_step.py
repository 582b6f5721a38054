"""Issues 11 and 12: our LoRA step on full-size SD 3.5 Large, Chroma, HiDream-I1 (random weights, 1024²,
bs 1, rank 16, cached latents and text embeddings) with the memory plan a 24 GB card would get (`train.memory:
auto`'s make_plan over the model's size and a 24 GiB budget), inside that cap, through the run's own code (the
architecture's training_loss, FrozenBase, BlockSwap, checkpointing, regional compile, Stepper). LoRA on the same
Linear names as ../shared/bench/reference_step.py (its sd35l_bs1_ckpt and hidream_bs1_ckpt; Chroma, which it
lacks, on flux_bs1_ckpt's names, to set beside that case): run both in one device call and compare ratios.

  PYTHONPATH=src python3 bench/arch_step.py {sd3|chroma|hidream} [--cap GIB] [--storage float8|none] [--swap K]
  PYTHONPATH=src python3 bench/arch_step.py {wan13b|wan14b} [--video 832x480x81] [--offload on|off] [--attention _native_flash]
  PYTHONPATH=src python3 bench/arch_step.py hidream --small    # the same classes a few widths wide, on the CPU

`--storage` / `--swap` override the plan's choice. Prints one JSON line: s/step (mean of 8 after 4 warm-up steps),
peak GiB, the plan.
"""
import argparse
import json
import os
import sys

import torch

from eridiffusion.adapters import LoraSpec, inject_lora
from eridiffusion.archs import get_arch_class
from eridiffusion.archs.blockwise import FrozenBase, block_units, finish_loaded
from eridiffusion.config import parse_config
from eridiffusion.data import Batch
from eridiffusion.objectives.flow import FlowShift
from eridiffusion.quant import Quantizer
from eridiffusion.train.attention import attention_kernels, choose_attention
from eridiffusion.train.compile import compile_denoiser
from eridiffusion.train.graphs import StepGraphs
from eridiffusion.train.loop import Stepper
from eridiffusion.train.memory import (CANDIDATES, ModelSize, enable_checkpointing, lora_state_bytes, make_plan, quantized_candidates,
                                       usable_gpu_memory)
from eridiffusion.train.optim import build_optimizer, build_scheduler
from timing import time_steps  # bench/timing.py

torch.backends.cuda.matmul.allow_tf32 = True

# reference_step.py's LoRA targets per case (Chroma: its flux case's)
TARGETS = {
    "sd3": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
            "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "chroma": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
               "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"],
    "hidream": ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"],
    "wan13b": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],  # attn1, attn2, ffn
    "wan14b": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
}
ARCH = {"wan13b": "wan21", "wan14b": "wan21"}  # bench case -> model.arch


def model_and_text(arch: str, small: bool, dev, r):
    """The denoiser's class and config (reference_step.py's full-size ones; Chroma1-HD's is diffusers' default),
    and one prompt's cached embeddings in the architecture's own format."""
    from diffusers import ChromaTransformer2DModel, HiDreamImageTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    if arch == "sd3":
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                   num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
                   pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=())
        if small:
            cfg.update(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                       caption_projection_dim=16, pooled_projection_dim=16)
        text = lambda: {"prompt_embeds": r(1, 8 if small else 77 + 256, cfg["joint_attention_dim"]),
                        "pooled_prompt_embeds": r(1, cfg["pooled_projection_dim"])}
        return SD3Transformer2DModel, cfg, text
    if arch == "chroma":
        cfg = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
                   approximator_layers=2) if small else {}
        tokens = 8 if small else 512
        text = lambda: {"prompt_embeds": r(1, tokens, cfg.get("joint_attention_dim", 4096)),
                        "attention_mask": torch.ones(1, tokens, dtype=torch.bool)}  # on the host, as the cache loads it
        return ChromaTransformer2DModel, cfg, text
    if arch.startswith("wan"):  # reference_step.py's WAN14B / WAN13B (the Wan2.1-T2V repos' configs)
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6)
        if arch == "wan13b":
            cfg.update(num_attention_heads=12, ffn_dim=8960, num_layers=30)
        if small:
            cfg.update(num_attention_heads=2, attention_head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2)
        text = lambda: {"prompt_embeds": r(1, 8 if small else 512, cfg["text_dim"])}
        return WanTransformer3DModel, cfg, text
    cfg = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
               num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
               num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
               llama_layers=list(range(32)) + [31] * 16)
    if small:
        cfg.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, caption_channels=[32, 32],
                   text_emb_dim=16, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16), llama_layers=[0, 1, 1])
    tokens, layers = (8, 2) if small else (128, 32)
    text = lambda: {"prompt_embeds_t5": r(1, tokens, cfg["caption_channels"][0]),
                    "prompt_embeds_llama3": r(1, layers, tokens, cfg["caption_channels"][1]),
                    "pooled_prompt_embeds": r(1, cfg["text_emb_dim"])}
    return HiDreamImageTransformer2DModel, cfg, text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=sorted(TARGETS))
    ap.add_argument("--cap", type=float, default=24.0, help="GiB the process may use (a 24 GB card: 24)")
    ap.add_argument("--storage", choices=["float8", "nf4", "none"], help="override the plan's base storage")
    ap.add_argument("--swap", type=int, help="override the plan's swapped block count")
    ap.add_argument("--offload", choices=["on", "off"], help="override the plan's checkpointed-input offloading")
    ap.add_argument("--video", default="832x480x81", help="video cases: WIDTHxHEIGHTxFRAMES")
    ap.add_argument("--attention", default="native", help="train.attention_backend (native: cuDNN's kernel first on sm90+)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 4 warm-up steps; 2 for video)")
    ap.add_argument("--whole", type=int, help="override how many blocks run unchecked (the plan's whole_blocks)")
    ap.add_argument("--keep-attention", action="store_true",
                    help="train.gradient_checkpointing_keep_attention (the blocks then run uncompiled)")
    ap.add_argument("--eager", action="store_true", help="no regional compile")
    ap.add_argument("--fp8mm", action="store_true", help="float8 base with fp8 matmuls (model.float8_matmul)")
    ap.add_argument("--capture-dynamic", action="store_true",
                    help="trace data-dependent shapes (HiDream's MoE masks) into the compiled graphs instead of breaking them")
    ap.add_argument("--ac-budget", type=float, help="instead of checkpointing (no swap): each compiled block's partitioner "
                    "keeps this fraction of its activations, recomputing the cheapest rest (torch's activation_memory_budget)")
    ap.add_argument("--diffusers-moe", action="store_true", help="HiDream's experts through diffusers' loop, not the trainer's "
                    "grouped matmuls (archs/hidream/moe.py)")
    ap.add_argument("--quantize", action="store_true", help="the plan for model.quantize: true (ai-toolkit's 24 GB examples)")
    ap.add_argument("--cuda-graph", action="store_true", help="train.cuda_graphs: the step replayed from CUDA graphs (no swap)")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    video = args.arch.startswith("wan")
    if video:
        w, h, f = (int(v) for v in args.video.split("x"))
        latent = (1 + (f - 1) // 4, h // 8, w // 8) if not args.small else (3, 8, 8)
        tokens = latent[0] * latent[1] * latent[2] // 4 + 512  # 1x2x2 patches + the text
    else:
        side = 16 if args.small else 128
        tokens = 1024**2 // 256 + 512
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
    cls_, cfg, text = model_and_text(args.arch, args.small, dev, r)
    config = {"job": "extension", "config": {"name": "bench", "process": [{
        "type": "sd_trainer", "device": str(dev), "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "datasets": [{"folder_path": "unused"}], "model": {"name_or_path": "unused", "arch": ARCH.get(args.arch, args.arch)},
        "train": {"batch_size": 1, "lr": 1e-4, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True}}]}}
    arch = get_arch_class(ARCH.get(args.arch, args.arch))(parse_config(config).config.process[0], dev, torch.bfloat16)
    exclude = list(arch.quantize_exclude)

    # the plan, as train.memory: auto makes it from the meta-device skeleton and the usable memory under the cap
    with torch.device("meta"):
        skeleton = cls_(**cfg)
    blocks = block_units(skeleton, arch.block_lists)
    size = ModelSize.of(skeleton, blocks, exclude)
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / total)
        budget = usable_gpu_memory(dev)
        torch.cuda.set_per_process_memory_fraction(1.0)  # built in bf16 first, then quantized in place
    else:
        budget = args.cap * 2**30
    plan = make_plan(size, budget=budget, tokens=tokens, batch=1, lora_bytes=lora_state_bytes(size, 16),
                     keep_whole=getattr(arch, "plan_whole_blocks", True), fp8_matmul=args.fp8mm,
                     candidates=quantized_candidates("float8") if args.quantize else CANDIDATES)
    storage = plan.storage if args.storage is None else (None if args.storage == "none" else args.storage)
    swap = plan.swap_blocks if args.swap is None else args.swap
    offload = plan.offload_activations if args.offload is None else args.offload == "on"
    whole = args.whole if args.whole is not None else plan.whole_blocks if swap == plan.swap_blocks else 0
    print(plan.line(), flush=True)
    base = FrozenBase(dev, torch.bfloat16, quantizer=Quantizer(storage, exclude), swap_blocks=swap,
                      float8_matmul=args.fp8mm and storage == "float8")

    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = cls_(**cfg)
    torch.set_default_dtype(torch.float32)
    finish_loaded(model, base, arch.block_lists)  # quantized in place, swapped blocks to host memory
    arch.base = base
    if args.arch == "hidream" and not args.diffusers_moe:  # as HiDream.load_denoiser does
        from eridiffusion.archs.hidream.moe import use_grouped_experts

        print(f"grouped experts in {use_grouped_experts(model)} MoE layers", flush=True)
    if args.arch == "hidream" or video:  # (their load() builds the pipeline; these are what training reads)
        arch.transformer = arch.denoiser = model
        arch.shift, arch.vae_scale_factor = FlowShift(shift=3.0), 8
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        arch.attach(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / total)

    names = [n for n in arch.lora_components(transformer_only=True, train_text_encoder=False)["transformer"].linear
             if any(n == t or n.endswith("." + t) for t in TARGETS[args.arch])]
    params = inject_lora(model, names, LoraSpec(rank=16, alpha=16), seed=0)
    for p in params:
        p.data = p.data.to(dev)
    block_modules = [b for n in arch.block_lists for b in getattr(model, n)]
    attention = choose_attention(args.attention, dev, getattr(arch, "attention_kernel", None))
    if args.ac_budget is not None:
        if swap or offload:
            raise SystemExit("--ac-budget replaces checkpointing: not with block swap or offloaded inputs (--swap 0 --offload off)")
        torch._functorch.config.activation_memory_budget = args.ac_budget
    elif plan.checkpointing or swap or offload:  # block swap and offloading need checkpointing
        enable_checkpointing(model, block_modules[:whole], offload=offload, keep_attention=args.keep_attention,
                             preserve_rng=False)
    if swap:
        from eridiffusion.train.offload import BlockSwap

        BlockSwap(block_modules, swap, dev).attach()
    model.train()
    if args.capture_dynamic:  # one graph per block, the masks' sizes symbolic: no resume frames, the same graph recomputed
        torch._dynamo.config.capture_dynamic_output_shape_ops = torch._dynamo.config.capture_scalar_outputs = True
    if cuda and not (args.eager or args.keep_attention):  # as the trainer: kept attention runs uncompiled
        compile_denoiser(model, block_modules, attention=attention)
    opt = build_optimizer("adamw", params, 1e-4, {})
    stepper = Stepper(arch, params, opt, build_scheduler("constant", opt, {}, 100), dtype=torch.bfloat16,
                      max_grad_norm=1.0, generator=torch.Generator(dev).manual_seed(0))
    batch = Batch(pixels=None, latents=r(1, 16, *latent) if video else r(1, 16, side, side), captions=[""], text=text(), original_sizes=[(1024, 1024)],
                  crop_top_lefts=[(0, 0)], target_sizes=[(1024, 1024)], paths=[], loss_weights=torch.ones(1))
    oom = None
    try:
        def step():
            with attention_kernels(attention):
                return stepper.step([batch])
        if args.cuda_graph:  # train.cuda_graphs: captured on the third step, replayed from the fourth
            if swap or offload:
                raise SystemExit("--cuda-graph: not with block swap or offloaded inputs (--swap 0 --offload off)")
            stepper.graphs = StepGraphs(params, opt, stepper.generator, room=True)
        losses, seconds = time_steps(step, 4 if args.cuda_graph or not video else 2, args.steps)
        losses = [float(x) for x in losses]
    except torch.cuda.OutOfMemoryError as e:  # the plan's estimate was short: say so, with the peak reached
        oom = str(e).splitlines()[0][:160]
        losses, seconds = [], float("nan")
    key = f"{args.arch}_{args.video if video else 'bs1'}_cap{args.cap:g}" + (f"_{args.storage}" if args.storage else "") + \
        (f"_swap{args.swap}" if args.swap is not None else "") + (f"_offload{args.offload}" if args.offload else "") + (f"_whole{args.whole}" if args.whole is not None else "") + \
        f"_{attention}" + ("_fp8mm" if args.fp8mm else "") + \
        ("_keepattn" if args.keep_attention else "") + ("_quantize" if args.quantize else "") + ("_capture" if args.capture_dynamic else "") + ("_diffusersmoe" if args.diffusers_moe else "") + (f"_acb{args.ac_budget:g}" if args.ac_budget is not None else "") + ("_eager" if args.eager else "") + ("_graph" if args.cuda_graph else "")
    result = {key: {"step_s": round(seconds, 4), "oom": oom, "offload": offload, "whole": whole, "tokens": tokens,
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                    "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                    "n_lora": sum(p.numel() for p in params), "lora_layers": len(names), "warmup_losses": [round(x, 4) for x in losses],
                    "plan": plan.line(), "storage": storage, "swap": swap, "blocks": len(blocks)}}
    print(json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        json.dump(result, open(os.path.join(os.environ["OUT"], f"ours_{key}.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())
