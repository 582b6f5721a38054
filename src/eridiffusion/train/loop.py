"""The training run: set up from a validated process config, then one readable loop."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..adapters import (LoraSpec, filter_names, inject_lora, load_lora_file_state, load_lora_state, lora_alphas,
                        lora_file_state, lora_scale, lora_state)
from ..archs import ARCHS, get_arch_class
from ..data import DataPipeline
from ..sample import Previewer
from . import checkpoint as ckpt
from . import save_checks
from .attention import attention_kernels, choose_attention, through_sdpa
from .compile import compile_denoiser, want_compile
from . import distributed
from .distributed import Processes, data_parallel, no_sync
from .dtypes import DTYPES, SAVE_DTYPES
from .memory import (CANDIDATES, FULL_CANDIDATES, ModelSize, enable_checkpointing, estimate, frozen_base, lora_state_bytes,
                     make_plan, quantized_candidates, swap_request, usable_gpu_memory)
from .optim import PerParameterOptimizer, build_optimizer, build_scheduler
from ..quant import gib


log = logging.getLogger(__name__)
MAX_NAN_IN_A_ROW = 10  # skipped NaN/inf steps in a row before a run stops


def is_out_of_memory(error: Exception) -> bool:
    # cuBLAS/cuDNN report a full GPU as RuntimeErrors of their own when they cannot create a handle or workspace
    return isinstance(error, torch.OutOfMemoryError) or any(
        s in str(error) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line cut short by a crash counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}': CUDA is not available on this machine (set `device: cpu` to train on the CPU)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise RuntimeError(f"device '{name}' is not supported yet (use cpu or cuda:N)")
    return device


def run_folder(proc) -> Path:
    name = proc.name
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"config.name '{name}' cannot be used as a folder name inside training_folder")
    return Path(proc.training_folder).expanduser() / name


def rng_state(generator: torch.Generator) -> dict:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Stepper:
    """One optimizer step over one or more (accumulated) batches; shared by the run and the benchmarks."""

    def __init__(self, arch, params, optimizer, scheduler, *, dtype, max_grad_norm, generator, ema=None, ddp=None,
                 sharded=None, processes: Processes = Processes()):
        self.arch, self.params, self.optimizer, self.scheduler = arch, params, optimizer, scheduler
        self.dtype, self.max_grad_norm, self.generator, self.ema = dtype, max_grad_norm, generator, ema
        self.loss = ddp or arch.training_loss  # several processes: DDP's forward, which averages the gradients
        self.synced, self.processes = ddp or sharded, processes  # what accumulation keeps from syncing
        self.device_type = generator.device.type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)
        # fused Adam/AdamW skip a non-finite step on the device; a per-parameter optimizer (fused backward) has
        # already stepped each parameter inside backward, skipping those whose gradient was not finite
        self.skips_on_device = (bool(optimizer.defaults.get("fused")) and not self.scaler.is_enabled()) or \
            isinstance(optimizer, PerParameterOptimizer)
        self.nan_steps = self.nan_in_a_row = 0
        self.graphs = None  # train.cuda_graphs: a graphs.StepGraphs

    def count(self, losses: list[float]) -> None:
        """Count NaN/inf steps among losses read back from the device."""
        for loss in losses:
            finite = math.isfinite(loss)
            self.nan_steps += not finite
            self.nan_in_a_row = 0 if finite else self.nan_in_a_row + 1

    def autocast(self, cache: bool = True):
        # frozen weights are stored in the compute dtype, LoRA weights in fp32: autocast meets them halfway. A CUDA
        # graph's capture needs its cast cache off (the cached casts would be freed inside the graph)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=cache)

    def step(self, batches) -> torch.Tensor:
        """One optimizer step; returns the summed loss as a device tensor (read back only when logged). With
        `graphs` (train.cuda_graphs) the forward/backward of each micro-batch and the update replay CUDA graphs."""
        total = None
        for i, batch in enumerate(batches):
            if batch.noise_seed is not None:
                self.generator.manual_seed(batch.noise_seed)
            with no_sync(self.synced, last=i == len(batches) - 1):
                run = functools.partial(self._forward_backward, share=len(batches))
                loss = self.graphs.forward_backward(batch, run) if self.graphs else run(batch)
            total = loss if total is None else total + loss
        total = self.processes.mean(total)  # every process skips a NaN step together: the gradients are shared
        if not self.skips_on_device and not math.isfinite(total.item()):  # never apply a NaN/inf update
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return total
        if self.graphs:
            self.graphs.update(total, self._update)
        else:
            self._update(total)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        return total

    def _forward_backward(self, batch, share: int) -> torch.Tensor:
        latents = batch.latents if batch.latents is not None else self.arch.encode_images(
            *([batch.pixels] if batch.control is None else [batch.pixels, batch.control]))
        with self.autocast(cache=self.graphs is None):  # text encoders may carry trained LoRA layers too
            text = batch.text if batch.text is not None else self.arch.encode_prompts(batch.captions)
            per_sample = self.loss(latents, text, batch, self.generator)
        loss = (per_sample * batch.loss_weights.to(per_sample.device)).mean() / share
        self.scaler.scale(loss).backward()
        return loss.detach().float()

    def _update(self, total: torch.Tensor) -> None:
        if isinstance(self.optimizer, PerParameterOptimizer):
            pass  # stepped inside backward
        elif self.skips_on_device:
            # fused Adam/AdamW skip a step whose found_inf is set inside their kernel: no NaN/inf update is
            # applied and no host sync is needed to know it
            self.optimizer.found_inf = (~torch.isfinite(total)).float()
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # graphs keep the gradients where they are (every graph accumulates into them)
        self.optimizer.zero_grad(set_to_none=self.graphs is None)


def network_args(net) -> dict:
    """kohya's `ss_network_args` as LyCORIS writes them (algo, conv_dim/alpha, dora_wd, factor, full_matrix)."""
    conv = {"conv_dim": net.conv, "conv_alpha": net.conv_alpha} if net.conv else {}
    if net.type == "lora":
        return conv
    args = {"algo": {"dora": "lora", "locon": "locon"}.get(net.type, net.type), **conv}
    if net.type == "dora":
        args["dora_wd"] = True
    if net.type == "lokr":
        args.update(factor=net.lokr_factor, full_matrix=net.lokr_full_rank)
    return args


class LossLog:
    """Per-step losses kept on the device until read back together (one host sync per read), then written
    to log.jsonl and folded into the smoothed loss shown by the progress bar."""

    def __init__(self, file, stepper: Stepper):
        self.file, self.stepper = file, stepper
        self.pending, self.window, self.smooth = [], [], None

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, lr, round(time.time(), 3)))

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([loss for _, loss, _, _ in self.pending]).tolist()
        for (step, _, lr, when), loss in zip(self.pending, values):
            self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "time": when}) + "\n")
            if math.isfinite(loss):
                self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
                self.window.append(loss)
        self.file.flush()
        self.stepper.count(values)
        self.pending = []

    def take_window(self) -> list[float]:
        window, self.window = self.window, []
        return window

    def close(self) -> None:
        self.flush()
        self.file.close()


class Run:
    """Everything one training run holds; `train()` is the loop."""

    def __init__(self, proc, meta: dict):
        self.proc, self.meta = proc, meta
        tc, net = proc.train, proc.network
        self.full = net is None  # no `network` section: the denoiser's own weights train
        if self.full:  # checked before any model is loaded
            m = proc.model
            for key, on in (("model.quantize", m.quantize), ("model.layer_offloading / swap_blocks", m.layer_offloading or m.swap_blocks),
                            ("train.train_text_encoder", tc.train_text_encoder), ("model.float8_matmul", m.float8_matmul)):
                if on:
                    raise ValueError(f"{key} is not supported with a full fine-tune (no network section) yet")
        kw = net.network_kwargs if net else None
        if net is not None and net.type not in ("loha", "lokr") and (kw.rank_dropout or kw.module_dropout):
            raise ValueError(f"network.network_kwargs rank_dropout / module_dropout: not supported for network.type "
                             f"{net.type} (peft has them for loha and lokr); use network.dropout")
        if net is not None and net.type in ("loha", "lokr") and net.dropout:
            raise ValueError(f"network.dropout: not supported for {net.type}; use network_kwargs.rank_dropout / module_dropout")
        if not tc.train_unet:
            raise ValueError("train.train_unet: false (training only text encoders) is not supported yet")
        if tc.train_text_encoder and any(d.cache_text_embeddings for d in proc.datasets):
            raise ValueError("train.train_text_encoder cannot be combined with cache_text_embeddings: "
                             "trained text encoders must encode every caption anew")
        m = proc.model
        if m.layer_offloading and m.layer_offloading_text_encoder_percent > 0 and not proc.datasets[0].cache_text_embeddings:
            # with cached embeddings the text encoders are freed after caching, which is what offloading them is for
            raise ValueError("model.layer_offloading_text_encoder_percent > 0: text encoders are not block-swapped yet; "
                             "set train.cache_text_embeddings: true (they are then freed after caching) or "
                             "layer_offloading_text_encoder_percent: 0")
        if tc.attention_backend.endswith("_hub"):
            raise ValueError(f"train.attention_backend '{tc.attention_backend}' downloads kernels; use a local one")
        self.run_dir = run_folder(proc)
        self.processes, self.device = distributed.start(resolve_device(proc.device))
        if self.processes.world > 1 and (tc.fused_backward or tc.optimizer_state_device == "cpu"):
            raise ValueError("train.fused_backward and optimizer_state_device: cpu take each gradient as it completes, "
                             "before the processes have averaged it: they cannot run on several processes; remove them")
        self.dtype = DTYPES[tc.dtype]
        state_path = ckpt.latest_state(self.run_dir)
        self.resume_state = ckpt.load_state(state_path) if state_path else None
        self.resume_path = state_path
        if self.resume_state is not None:  # the data order and noise continue from the seed the run started with
            self.seed = self.resume_state["seed"]
        else:
            self.seed = proc.training_seed if proc.training_seed is not None else random.SystemRandom().randrange(2**31)
            self.seed = self.processes.broadcast(self.seed)  # one data order and noise for the whole run
        random.seed(self.seed), np.random.seed(self.seed % 2**32), torch.manual_seed(self.seed)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)

        arch_cls = get_arch_class(proc.model.arch_name)
        unknown = set(proc.model.model_kwargs) - set(arch_cls.model_kwargs)
        if unknown:  # a free-form section: keys no architecture reads must not pass silently
            raise ValueError(f"model.model_kwargs: {sorted(unknown)} not supported yet for {proc.model.arch_name} "
                             f"(known: {sorted(arch_cls.model_kwargs) or 'none'})")
        for key in ("gradient_checkpointing_cpu_offload", "gradient_checkpointing_keep_attention"):
            if getattr(tc, key) and not tc.gradient_checkpointing:
                raise ValueError(f"train.{key} changes what checkpointed blocks keep: it needs train.gradient_checkpointing: true")
        for i, ds in enumerate(proc.datasets):
            if ds.do_i2v and not getattr(arch_cls, "first_frame_conditioned", False):
                i2v = [name for name in ARCHS if getattr(get_arch_class(name), "first_frame_conditioned", False)]
                raise ValueError(f"datasets[{i}].do_i2v: {proc.model.arch_name} does not condition on a clip's first "
                                 f"frame (model.arch {' / '.join(i2v)} does); remove the key or change model.arch")
        self.arch = arch_cls(proc, self.device, self.dtype)
        fused = {key: self._fused_lora(key) for key in ("lora_path", "assistant_lora_path") if getattr(proc.model, key)}
        self.assistant = fused.get("assistant_lora_path")
        self.base = frozen_base(proc, arch_cls, self.device, self.dtype,
                                fuse=(lambda module, unit: [f.fuse_into(module, unit) for f in fused.values()]) if fused else None)
        self.base.plan = self._plan_memory
        self.memory_plan = None
        # an architecture whose text encoders and denoiser need not share the GPU loads the denoiser once the text
        # embeddings are cached and the encoders freed (an 8 B text encoder beside a 17 B denoiser)
        defer = hasattr(self.arch, "load_denoiser") and all(ds.cache_text_embeddings for ds in proc.datasets)
        self.arch.load(self.base, **({"defer_denoiser": True} if defer else {}))

        def denoiser_loaded():
            for key, lora in fused.items():
                if lora.unfused():
                    raise ValueError(f"model.{key}: {len(lora.unfused())} of its layers match no layer of "
                                     f"{proc.model.arch_name}, e.g. {lora.unfused()[:3]}")
            if self.base.quantizer.storage or self.base.te_quantizer.storage:
                print(f"Quantized base: denoiser {self.base.quantizer.describe()}; text encoders {self.base.te_quantizer.describe()}")
        if not defer:
            denoiser_loaded()
        div = self.arch.bucket_divisibility
        for i, ds in enumerate(proc.datasets):
            for res in ds.resolution:
                if res % div:
                    log.warning(f"datasets[{i}].resolution {res} is not a multiple of {div}, which {proc.model.arch_name} "
                                f"needs: its buckets round down to at most {res // div * div} px a side")
        self.data = DataPipeline(proc.datasets, process_trigger=proc.trigger_word,
                                 divisibility=self.arch.bucket_divisibility, batch_size=tc.batch_size, seed=self.seed,
                                 frame_rule=getattr(self.arch, "frame_rule", None),  # absent: an image model
                                 ignore_captions=tc.unload_text_encoder,
                                 takes_control=getattr(self.arch, "takes_control", False))
        self._prepare_caches()
        sampling = proc.sample is not None and not tc.disable_sampling and proc.sample.samples
        self.previewer = Previewer(proc.sample, self.arch, self.run_dir, proc.trigger_word) if sampling else None
        if self.data.text_cache is not None:
            self.arch.drop_text_encoders()
        if self.data.latent_cache is not None:
            self.arch.drop_vae_encoder()
        if defer:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the freed encoders' memory, for the memory plan made as the denoiser loads
            self.arch.load_denoiser()
            denoiser_loaded()

        self.attention = choose_attention(tc.attention_backend, self.device, getattr(self.arch, "attention_kernel", None))
        if self.attention != "default":
            print(f"Attention: SDPA's {self.attention} kernel first (train.attention_backend: {tc.attention_backend})")
        elif not through_sdpa(tc.attention_backend):
            self.arch.denoiser.set_attention_backend(tc.attention_backend)  # a kernel outside SDPA, through diffusers
        self.sharded = None
        blocks = [b for name in self.arch.block_lists for b in getattr(self.arch.denoiser, name)]
        if self.full:
            self.components = {}
            self.params, groups = self._full_params()
            if self.processes.world > 1:
                if tc.ema_config.use_ema or proc.save.save_format == "diffusers":
                    raise ValueError("a full fine-tune on several processes (sharded) does not support "
                                     "train.ema_config.use_ema or save.save_format: diffusers yet; remove them")
                distributed.shard(self.arch.denoiser, blocks, self.device)
                self.sharded = self.arch.denoiser
                self.params = [p for p in self.arch.denoiser.parameters() if p.requires_grad]  # now shards
                groups = [{"params": self.params, "lr": tc.unet_lr}]
        else:
            self.components = self.arch.lora_components(net.transformer_only, tc.train_text_encoder)
            if proc.save.diffusers_lora and not hasattr(self.arch, "save_diffusers_lora"):
                raise ValueError(f"save.diffusers_lora is not supported yet for {proc.model.arch_name}")
            self.params, groups = self._inject_lora()
            if proc.network.pretrained_lora_path:
                self._start_from_pretrained()
        for p in self.params:  # LoRA of blocks kept in host memory (block swap) still trains on the device
            p.data = p.data.to(self.device)
        checkpointing = self.memory_plan.checkpointing if self.memory_plan else tc.gradient_checkpointing
        kw = net.network_kwargs if net else None
        self.dropout = bool(net and (net.dropout or kw.rank_dropout or kw.module_dropout))
        self.offload = False
        if checkpointing:
            plan = self.memory_plan
            self.offload = plan.offload_activations if plan else tc.gradient_checkpointing_cpu_offload
            # the recompute draws the same random numbers only if the RNG state is saved: needed for LoRA dropout alone
            enable_checkpointing(self.arch.denoiser, whole=blocks[:plan.whole_blocks if plan else 0], offload=self.offload,
                                 keep_attention=tc.gradient_checkpointing_keep_attention, preserve_rng=self.dropout)
        self.block_swap, self.compiled = None, False
        if self.base.swap_blocks:
            from .offload import BlockSwap

            self.block_swap = BlockSwap(blocks, self.base.swap_blocks, self.device)
            self.block_swap.attach()
        if want_compile(proc.model.compile, self.device):
            if checkpointing and tc.gradient_checkpointing_keep_attention:
                # a compiled block's recompute does not replay the ops selective checkpointing cached (torch 2.13 raises)
                if proc.model.compile:
                    raise ValueError("train.gradient_checkpointing_keep_attention runs the blocks uncompiled: set "
                                     "model.compile: false (or leave it unset), or remove the key")
                print("train.gradient_checkpointing_keep_attention: the blocks run uncompiled")
            else:
                compile_denoiser(self.arch.denoiser, blocks, attention=self.attention)
                self.compiled = True
        self.train_mode(True)
        # optimizer_state_device: cpu moves the state off the GPU; a CPU run keeps it in host memory anyway
        self.state_on_host = tc.optimizer_state_device == "cpu" and self.device.type == "cuda"
        if tc.fused_backward:
            if tc.gradient_accumulation > 1 or self.dtype == torch.float16 or len(groups) > 1:
                raise ValueError("train.fused_backward needs gradient_accumulation: 1, bf16 or fp32, and one learning rate")
            if tc.max_grad_norm and not self.state_on_host:
                print("train.fused_backward: gradients are applied as they complete, so max_grad_norm clipping is off")
        if self.state_on_host:  # it clips the host copies of the gradients, which its CPU step reads, itself
            from .cpu_state import CPUStateOptimizer

            self.optimizer = CPUStateOptimizer(tc.optimizer, groups, tc.unet_lr, tc.optimizer_params, device=self.device,
                                               max_grad_norm=tc.max_grad_norm, free_device_grads=tc.fused_backward)
        elif tc.fused_backward:
            self.optimizer = PerParameterOptimizer(tc.optimizer, self.params, tc.unet_lr, tc.optimizer_params)
        else:
            self.optimizer = build_optimizer(tc.optimizer, groups, tc.unet_lr, tc.optimizer_params)
        self.scheduler = build_scheduler(tc.lr_scheduler, self.optimizer, tc.lr_scheduler_params, tc.steps)
        self.ema = None
        if tc.ema_config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=tc.ema_config.ema_decay, foreach=True)
        ddp = None
        if self.processes.world > 1 and not self.full:
            trained = {name: t.module for name, t in self.components.items()}
            ddp = data_parallel(self.arch, trained, self.device, some_unused=bool(net.network_kwargs.module_dropout))
        self.stepper = Stepper(self.arch, self.params, self.optimizer, self.scheduler, dtype=self.dtype,
                               max_grad_norm=0 if tc.fused_backward or self.state_on_host else tc.max_grad_norm,
                               generator=self.generator, ema=self.ema, ddp=ddp, sharded=self.sharded,
                               processes=self.processes)
        self.step = tc.start_step or 0
        for _ in range(self.step):  # a forced start step starts the LR schedule there too
            self.scheduler.step()

    def _full_params(self):
        """Full fine-tune: the denoiser's parameters, filtered as ai-toolkit does by model.only_if_contains /
        ignore_if_contains on `<component>.<parameter>` names (e.g. "transformer.transformer_blocks.")."""
        m, denoiser = self.proc.model, self.arch.denoiser
        component = self.arch.full_component
        names = [n for n, _ in denoiser.named_parameters()]
        keep = set(filter_names([f"{component}.{n}" for n in names], only_if_contains=m.only_if_contains,
                                ignore_if_contains=m.ignore_if_contains))
        params = []
        for name, p in denoiser.named_parameters():
            p.requires_grad_(f"{component}.{name}" in keep)
            if p.requires_grad:
                params.append(p)
        if not params:
            raise ValueError("model.only_if_contains / ignore_if_contains leave no parameter of the "
                             f"{component} to train (names look like '{component}.{names[0]}')")
        print(f"Full fine-tune: {sum(p.numel() for p in params) / 1e6:.1f}M parameters of the {component} train")
        return params, [{"params": params, "lr": self.proc.train.unet_lr}]

    def _fused_lora(self, key: str):
        """model.lora_path / assistant_lora_path: a LoRA file of the denoiser, fused into the base as it loads."""
        from ..adapters.assistant import AssistantLora

        path, states = self._adapter_file(f"model.{key}", getattr(self.proc.model, key))
        if len(states) != 1:
            raise ValueError(f"model.{key}: {path} adapts {sorted(states)}; only a denoiser LoRA is supported")
        return AssistantLora.from_component_state(next(iter(states.values())), path)

    def _adapter_file(self, key: str, value: str):
        """(path, the architecture's per-component state) of an adapter file named by a config key."""
        from safetensors.torch import load_file

        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} is not a file (a local adapter .safetensors; nothing is downloaded)")
        try:
            return path, self.arch.lora_from_file(load_file(path))
        except ValueError as e:
            raise ValueError(f"{key}: {path} is not an adapter file in {self.proc.model.arch_name}'s layout: {e}") from e

    def _start_from_pretrained(self) -> None:
        """network.pretrained_lora_path: the adapter starts from that file's weights (same type and ranks)."""
        key = "network.pretrained_lora_path"
        path, states = self._adapter_file(key, self.proc.network.pretrained_lora_path)
        extra = sorted(set(states) - set(self.components))
        if extra:
            raise ValueError(f"{key}: {path} adapts {extra}, which this config does not train")
        for name, state in states.items():
            try:
                load_lora_file_state(self.components[name].module, state)
            except (RuntimeError, ValueError) as e:  # shapes: another rank, type or target set
                raise ValueError(f"{key}: {path} does not fit this network (type {self.proc.network.type}, rank "
                                 f"{self.proc.network.linear}): {str(e).splitlines()[0][:300]}") from e
        print(f"Starting from {path}")

    def _plan_memory(self, model: torch.nn.Module, blocks: list[str]) -> None:
        """Called with the meta-device denoiser before its weights are read: swap count from the config, or
        with train.memory: auto, quantization/swap/checkpointing from the free GPU memory."""
        proc, base = self.proc, self.base
        swap = swap_request(proc, len(blocks))
        if swap and not blocks:
            raise ValueError(f"model.layer_offloading / swap_blocks: {proc.model.arch_name} has no repeated blocks to swap")
        auto = proc.train.memory == "auto"
        if swap and not proc.train.gradient_checkpointing:
            raise ValueError("block swap needs train.gradient_checkpointing: true")
        if self.device.type != "cuda":
            if auto:
                print("train.memory: auto plans for a CUDA device; on the CPU the config's settings are used as they are")
            base.swap_blocks = swap
            return
        size = ModelSize.of(model, blocks, base.quantizer.exclude)
        budget = usable_gpu_memory(self.device)
        step, first = getattr(self.arch, "frame_rule", (1, 1))  # a video model's clips: latent frames x patches
        frames = max(1 + max(0, ds.num_frames - first) // step for ds in proc.datasets)
        tokens = max(r for ds in proc.datasets for r in ds.resolution) ** 2 // 256 * frames + 512  # latent patches + text
        kw = dict(budget=budget, tokens=tokens, batch=proc.train.batch_size,
                  keep_attention=proc.train.gradient_checkpointing_keep_attention,
                  # a full fine-tune holds weights, gradients and AdamW moments of every parameter (~12 bytes each;
                  # ~4 with the moments in host memory)
                  lora_bytes=lora_state_bytes(size, proc.network.linear) if proc.network else
                  (4.0 if proc.train.optimizer_state_device == "cpu" else 12.0) *
                  sum([*size.unit_linear.values(), *size.unit_other.values()]))
        if auto:
            # a float8 base multiplies on fp8 tensor cores where the GPU has them (Ada, Hopper): measured 0.62x the
            # weight-only float8 step of a 14B video transformer, 0.76-0.81x of a 17B MoE one, output error 0.023 on a 12B one
            fp8 = base.float8_matmul or (torch.cuda.get_device_capability(self.device) >= (8, 9) and not self.full)
            asked = base.quantizer.storage  # model.quantize: true stays quantized; the plan does the rest
            candidates = FULL_CANDIDATES if self.full else quantized_candidates(asked) if asked else CANDIDATES
            plan = make_plan(size, **kw, fp8_matmul=fp8, keep_whole=getattr(self.arch, "plan_whole_blocks", True),
                             candidates=candidates)
            if fp8 and plan.storage == "float8" and not base.float8_matmul:
                base.float8_matmul = True
                plan.notes.append("fp8 matmuls on the float8 base (model.float8_matmul)")
        else:
            plan = estimate(size, base.quantizer.storage, swap, proc.train.gradient_checkpointing,
                            offload=proc.train.gradient_checkpointing_cpu_offload, **kw)
        base.quantizer.storage, base.swap_blocks = plan.storage, plan.swap_blocks
        self.memory_plan, self.model_size, self.plan_inputs = plan, size, kw
        props = torch.cuda.get_device_properties(self.device)
        print(f"Device: {props.name}, {gib(props.total_memory)}, {gib(budget)} usable now")
        print(("Auto " if auto else "") + plan.line())

    def _inject_lora(self):
        """LoRA layers into every component; returns all parameters and the optimizer's groups
        (the denoiser at unet_lr, text encoders at text_encoder_lr)."""
        net, tc = self.proc.network, self.proc.train
        kw = net.network_kwargs
        extra = dict(kind=net.type, factor=net.lokr_factor, rank_dropout=kw.rank_dropout or 0.0,
                     module_dropout=kw.module_dropout or 0.0)
        spec = LoraSpec(rank=net.linear, alpha=net.linear_alpha, dropout=net.dropout or 0.0, **extra)
        conv_spec = LoraSpec(rank=net.conv, alpha=net.conv_alpha, **extra) if net.conv else None
        params, groups = [], []
        for name, t in self.components.items():
            pick = lambda names: filter_names(names, only_if_contains=kw.only_if_contains, ignore_if_contains=kw.ignore_if_contains)
            new = inject_lora(t.module, pick(t.linear), spec, conv_targets=pick(t.conv), conv_spec=conv_spec, seed=self.seed)
            params += new
            groups.append({"params": new, "lr": tc.unet_lr if t.module is self.arch.denoiser else tc.text_encoder_lr})
        return params, groups

    def train_mode(self, on: bool) -> None:
        for module in [t.module for t in self.components.values()] or [self.arch.denoiser]:
            module.train(on)

    def _prepare_caches(self) -> None:
        """Latents and text embeddings cached when the datasets ask for it (the data side decides); with several
        processes each encodes a share and all wait for the rest."""
        p = self.processes
        share = dict(rank=p.rank, world=p.world, exchange=p.exchange if p.world > 1 else None, progress=p.main)
        self.data.attach_latent_cache(self.arch.encode_images, self.arch.latent_fingerprint,
                                      device=self.device, dtype=self.dtype, **share)
        self.data.attach_text_cache(self.arch.encode_prompts, self.arch.text_fingerprint, **share)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        with attention_kernels(self.attention):  # for eager attention (samples, uncompiled blocks) and compiling
            return self._train()

    def _train(self) -> Path:
        tc, save_cfg, sample_cfg = self.proc.train, self.proc.save, self.proc.sample
        main, processes = self.processes.main, self.processes
        if main:  # one process writes the run folder
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_files(self.run_dir)
            if self.memory_plan is not None:
                (self.run_dir / "memory_plan.json").write_text(self.memory_plan.to_json())
        resumed = self.resume()
        self._use_graphs()  # after resume: its optimizer state replaces the param groups' settings
        log_path = self.run_dir / "log.jsonl"
        if main and log_path.exists():  # keep the lines of steps up to the checkpoint: later ones are done again
            log_path.write_text("".join(line + "\n" for line in log_path.read_text().splitlines()
                                        if logged_step(line) <= self.step))
        self.losses = LossLog(open(log_path if main else os.devnull, "a"), self.stepper)
        if self.previewer and main and (tc.force_first_sample or (not resumed and not tc.skip_first_sample)):
            self.sample()
        bar = tqdm(total=tc.steps, initial=self.step, desc=self.proc.name, dynamic_ncols=True, disable=not main)
        # losses stay on the device and are read back together: on CUDA every 10 steps (or when logged)
        read_every = min(10, self.proc.logging.log_every) if self.device.type == "cuda" else 1

        def stopping(stop) -> bool:  # all processes stop at the same step; asked when losses are read anyway
            if processes.world == 1:
                return stop.is_set()
            return self.step % read_every == 0 and processes.any(stop.is_set())

        with self.clean_stop() as stop:
            while self.step < tc.steps and not stopping(stop):
                lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                try:
                    loss = self.stepper.step([self.data.next_batch(processes.rank, processes.world)
                                              for _ in range(tc.gradient_accumulation)])
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_out_of_memory(e):
                        raise
                    self.out_of_memory(e)
                self.step += 1
                self.losses.add(self.step, loss, lr)
                last = self.step == tc.steps
                saving = last or self.step % save_cfg.save_every == 0
                sampling = self.previewer and main and (last or (self.step % sample_cfg.sample_every == 0
                                                        and self.step >= sample_cfg.sample_start_step))
                if saving or sampling or self.step % read_every == 0 or self.step % self.proc.logging.log_every == 0:
                    self.losses.flush()
                    shown = {"loss": f"{self.losses.smooth:.4f}" if self.losses.smooth is not None else "nan", "lr": f"{lr:.2e}"}
                    if self.device.type == "cuda":  # a CUDA graph's pool is reserved, not counted as allocated
                        peak = torch.cuda.max_memory_reserved if self.stepper.graphs else torch.cuda.max_memory_allocated
                        shown["mem"] = f"{peak(self.device) / 2**30:.1f}G"
                    bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if self.step % self.proc.logging.log_every == 0 and self.losses.window:
                    window = self.losses.take_window()
                    bar.write(f"step {self.step}: mean loss {sum(window) / len(window):.4f} over {len(window)} steps, lr {lr:.2e}")
                if self.stepper.nan_in_a_row >= MAX_NAN_IN_A_ROW:
                    self.save(final=False)  # NaN steps changed no weight: this is the last good state
                    raise FloatingPointError(
                        f"the loss was NaN/inf for {self.stepper.nan_in_a_row} steps in a row (up to step {self.step}); "
                        "the checkpoint is saved. Lower train.lr, train in bf16 or fp32 rather than fp16, or check the data")
                if saving:
                    self.save(final=last)
                if sampling:
                    self.sample()
            if stopping(stop) and self.step < tc.steps:
                self.save(final=False)
                bar.close()
                print(f"\nStopped at step {self.step}; the checkpoint is saved. Run the same config again to resume.",
                      file=sys.stderr)
                raise KeyboardInterrupt
        bar.close()
        self.losses.close()
        return self.run_dir / f"{self.proc.name}.safetensors"

    def _use_graphs(self) -> None:
        """train.cuda_graphs: the step replayed from CUDA graphs where nothing in the run prevents it."""
        tc = self.proc.train
        if tc.cuda_graphs == "off":
            return
        from .graphs import StepGraphs, graph_blockers

        blockers = graph_blockers(arch=self.arch, device=self.device, compiled=self.compiled, world=self.processes.world,
                                  optimizer=self.optimizer, dtype=self.dtype, block_swap=bool(self.base.swap_blocks),
                                  offload=self.offload, train_text_encoder=tc.train_text_encoder, dropout=self.dropout)
        if blockers:
            if tc.cuda_graphs == "on":
                raise ValueError(f"train.cuda_graphs: on, but {'; '.join(blockers)} (set train.cuda_graphs: auto or off)")
            if self.device.type == "cuda":
                print(f"CUDA graphs: off ({blockers[0]})")
            return
        plan = self.memory_plan
        # without room for an eager step beside the graphs' pool, a new batch shape (or a sample) frees the pool first
        room = plan is None or plan.expected_peak + plan.activations <= plan.budget
        self.stepper.graphs = StepGraphs(self.params, self.optimizer, self.generator, room=room)
        print("CUDA graphs: on (each batch shape captured after its first steps" +
              ("" if room else "; freed for a new shape or a sample, as memory is short") + ")")

    def out_of_memory(self, error: Exception):
        """Save the last complete step (the failed one changed nothing), then say what uses less memory."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        self.save(final=False)
        raise MemoryError(
            f"out of GPU memory at step {self.step + 1} ({str(error).splitlines()[0]}); the checkpoint of step {self.step} "
            f"is saved. {self.plan_that_fits()}Other ways to use less memory: lower train.batch_size or "
            "datasets[].resolution, set cache_latents_to_disk and train.cache_text_embeddings: true, "
            "use train.optimizer: adamw8bit, lower network.linear; then run the same config again to resume") from error

    def plan_that_fits(self) -> str:
        """The settings the memory plan would pick with 15% more margin than it estimated, as config keys."""
        if self.memory_plan is None:
            return ""
        kw = dict(self.plan_inputs, budget=self.plan_inputs["budget"] * 0.85)
        plan = make_plan(self.model_size, **kw)
        keys = [f"model.quantize: {bool(plan.storage)}"] + ([f"model.qtype: {plan.storage}"] if plan.storage else [])
        keys += [f"model.swap_blocks: {plan.swap_blocks}", f"train.gradient_checkpointing: {str(plan.checkpointing).lower()}"]
        keys += ["train.gradient_checkpointing_cpu_offload: true"] if plan.offload_activations else []
        return f"A plan that should fit: {', '.join(keys)} (or set train.memory: auto). "

    @contextlib.contextmanager
    def clean_stop(self):
        """SIGINT/SIGTERM finish the current step and save; a second SIGINT stops at once (a save in
        progress is abandoned without touching the last complete checkpoint)."""
        stop = threading.Event()
        if threading.current_thread() is not threading.main_thread():
            yield stop
            return

        def request(signum, frame):
            if stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop.set()
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl-C again to stop at once)",
                  file=sys.stderr)

        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield stop
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ---- samples, saves, resume ----------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Samples and saved files use the EMA weights when EMA is on."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def sample(self) -> None:
        if self.stepper.graphs and not self.stepper.graphs.room:
            self.stepper.graphs.drop()
        self.train_mode(False)
        without_assistant = self.assistant.removed(self.arch.denoiser) if self.assistant else contextlib.nullcontext()
        with self.ema_weights(), self.stepper.autocast(), without_assistant:
            self.previewer.render(self.step, self.lora_strength)
        self.train_mode(True)

    @contextlib.contextmanager
    def lora_strength(self, multiplier: float):
        with contextlib.ExitStack() as stack:
            for t in self.components.values():
                stack.enter_context(lora_scale(t.module, multiplier))
            yield

    def lora_file_tensors(self) -> dict[str, torch.Tensor]:
        dtype = SAVE_DTYPES[self.proc.save.dtype]
        states = {}
        for name, t in self.components.items():
            state = {k: v.to(dtype) for k, v in lora_file_state(t.module).items()}
            for module, alpha in lora_alphas(t.module).items():
                state[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            states[name] = state
        return self.arch.lora_to_file(states)

    def metadata(self) -> dict[str, str]:
        net, proc = self.proc.network, self.proc
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}
        meta.update({
            "format": "pt",
            "training_info": json.dumps({"step": self.step, "epoch": self.data.epoch}),
            "ss_base_model_version": self.arch.base_model_version,
            "ss_output_name": proc.name,
            "ss_network_module": "networks.lora" if net.type == "lora" else "lycoris.kohya",
            "ss_network_args": json.dumps(network_args(net)),
            "ss_network_dim": str(net.linear), "ss_network_alpha": str(net.linear_alpha),
            "ss_sd_model_name": Path(proc.model.name_or_path).name,
            "eri_arch": proc.model.arch_name, "eri_network_type": net.type,
            "software": json.dumps({"name": "eridiffusion", "version": __version__}),
        })
        if proc.trigger_word:
            meta["trigger_word"] = proc.trigger_word
            meta["ss_tag_frequency"] = json.dumps({f"1_{proc.trigger_word}": {proc.trigger_word: 1}})
        return meta

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumable."""
        net = self.proc.network
        # the optimizer state's layout: torchao's per-parameter list, or one torch optimizer's
        host = {"optimizer_state_device": "cpu"} if self.state_on_host else {}
        if self.full:
            return {"arch": self.proc.model.arch_name, "network": "full", "n_params": len(self.params), **host}
        return {"arch": self.proc.model.arch_name, "network": net.type, "rank": net.linear, "alpha": float(net.linear_alpha),
                "conv": net.conv, "components": sorted(self.components), "n_params": len(self.params),
                **({"lokr_factor": net.lokr_factor} if net.type == "lokr" else {}), **host}

    def save(self, final: bool) -> None:
        # sharded weights first come together on process 0; otherwise every process holds the same weights
        # (a full fine-tune's state by parameter name also when unsharded: it resumes on any process count)
        by_name = self.full and not isinstance(self.optimizer, PerParameterOptimizer) and not self.state_on_host
        gathered = distributed.full_state(self.arch.denoiser, self.optimizer) if by_name else None
        if not self.processes.main:  # one process writes
            return
        try:
            self._save(final, gathered)
        except OSError as e:  # full disk, permissions: the previous complete checkpoint is untouched
            last = ckpt.latest_state(self.run_dir)
            raise OSError(f"could not save step {self.step} in {self.run_dir}: {e}. The last complete checkpoint is "
                          f"{last or 'none'}; free space or fix the folder, then run the same config again to resume") from e

    def _save(self, final: bool, gathered=None) -> None:
        if getattr(self, "losses", None) is not None:
            self.losses.flush()  # the log holds every step up to the checkpoint
        name = self.proc.name
        path = self.run_dir / f"{name}.safetensors" if final else ckpt.step_file(self.run_dir, name, self.step)
        if self.full:
            self._save_full(path, final, gathered)
            return
        with self.ema_weights():
            tensors = self.lora_file_tensors()
            save_checks.require_finite(tensors, self.step)  # before anything is written: the last checkpoint stays
            ckpt.save_safetensors(path, tensors, self.metadata())
            problems = save_checks.check_written(path, tensors)
            try:
                problems += save_checks.check_modules(self.arch.lora_from_file(tensors),
                                                      {key: t.module for key, t in self.components.items()})
            except ValueError as e:
                problems.append(str(e))
            changes = {key: save_checks.output_changes(t.module) for key, t in self.components.items()}
            save_checks.report(path, problems, changes, self.step)
            if self.proc.save.diffusers_lora:
                dtype = SAVE_DTYPES[self.proc.save.dtype]
                ckpt.atomic_write(ckpt.diffusers_copy(path), lambda tmp: self.arch.save_diffusers_lora(
                    tmp, {key: t.module for key, t in self.components.items()}, dtype))
        ckpt.save_state(self.run_dir, self.step, {
            "identity": self.identity(), "step": self.step, "seed": self.seed,
            "lora": {name: {k: v.detach().cpu() for k, v in lora_state(t.module).items()} for name, t in self.components.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.stepper.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(self.generator), "data": self.data.state_dict(), "nan_steps": self.stepper.nan_steps,
        })
        ckpt.prune(self.run_dir, name, self.proc.save.max_step_saves_to_keep)

    def _save_full(self, path: Path, final: bool, gathered=None) -> None:
        """Full fine-tune: the model as one file in its original single-file layout (ComfyUI's diffusion_models/ or
        checkpoints/), and with save.save_format: diffusers also a diffusers folder at the end; then the state.
        `gathered`: a sharded model's (weights, optimizer state), whole."""
        dtype = SAVE_DTYPES[self.proc.save.dtype]
        weights, optimizer = gathered or (None, None)
        with self.ema_weights():
            tensors = {k: v.to(dtype) for k, v in self.arch.full_to_file(weights).items()}
            save_checks.require_finite(tensors, self.step)
            ckpt.save_safetensors(path, tensors, {"format": "pt", "eri_arch": self.proc.model.arch_name,
                                                  "training_info": json.dumps({"step": self.step, "epoch": self.data.epoch}),
                                                  "software": json.dumps({"name": "eridiffusion", "version": __version__})})
            problems = save_checks.check_written(path, tensors)
            if problems:
                log.warning(f"{path.name}: {'; '.join(problems[:5])}")
            if final and self.proc.save.save_format == "diffusers":
                self.arch.save_full_diffusers(self.run_dir / self.proc.name, dtype)
        ckpt.save_state(self.run_dir, self.step, {
            "identity": self.identity(), "step": self.step, "seed": self.seed,
            "weights": {n: (weights[n] if weights else p.detach()).cpu() for n, p in self.arch.denoiser.named_parameters()
                        if p.requires_grad},
            # a sharded run's optimizer state by parameter name (resumable on any process count)
            "optimizer": optimizer or self.optimizer.state_dict(), "optimizer_by_name": optimizer is not None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.stepper.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(self.generator), "data": self.data.state_dict(), "nan_steps": self.stepper.nan_steps,
        })
        ckpt.prune(self.run_dir, self.proc.name, self.proc.save.max_step_saves_to_keep)

    def resume(self) -> bool:
        state, path = self.resume_state, self.resume_path
        if state is None:
            return False
        if state["identity"] != self.identity():
            raise RuntimeError(f"{path} was written by a run with {state['identity']}, but this config gives "
                               f"{self.identity()}: use another config.name or training_folder, or delete {self.run_dir}")
        if self.sharded is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.sharded, state["weights"], options=StateDictOptions(full_state_dict=True, strict=False))
        elif self.full:
            params = dict(self.arch.denoiser.named_parameters())
            with torch.no_grad():
                for n, w in state["weights"].items():
                    params[n].copy_(w)
        for name, t in self.components.items():
            load_lora_state(t.module, state["lora"][name])
        if state.get("optimizer_by_name"):
            distributed.load_optimizer_state(self.arch.denoiser, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stepper.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)  # the checkpoint is read onto the CPU
        set_rng_state(state["rng"], self.generator)
        self.data.load_state_dict(state["data"])
        self.step, self.stepper.nan_steps = state["step"], state["nan_steps"]
        self.resume_state = None  # free the memory
        print(f"Resuming {self.proc.name} from step {self.step} ({path})")
        return True
