"""`train.cuda_graphs`: the training step replayed from CUDA graphs, so that no kernel waits on the Python that
launches it. A 12B transformer's step, compiled and checkpointed, spends ~18% of its time with the GPU idle
between kernels (on an H200, bench/RESULTS.md); replayed from a graph it took 0.42 s against 0.55 s.

Two kinds of graph share one memory pool: each micro-batch's forward and backward (one graph per batch shape:
aspect buckets), and the update (clipping, the optimizer, zeroing the gradients). The gradients and the
optimizer's state live outside the pool, so any graph may run after any other, as the data orders the shapes.
Each shape is first run eagerly (compiling, autotuning, the optimizer's state), then captured on the next batch
of that shape and replayed from then on. What changes from step to step enters through tensors the graphs read:
the batch (copied into the graph's own), the noise seed (the generator's state, registered with each graph),
the learning rate (one device tensor per parameter group, filled before each update).

Written here because torch.compile's own graphs (mode="reduce-overhead") take one compiled function at a time,
while a step is many compiled blocks, checkpointing's recompute inside backward, and the optimizer."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections import Counter

import torch


def graph_blockers(*, arch, device, compiled: bool, world: int, optimizer, dtype, block_swap: bool, offload: bool,
                   train_text_encoder: bool, dropout: bool) -> list[str]:
    """Why this run's step cannot be replayed from CUDA graphs (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append("the device is not CUDA")
    if not getattr(arch, "cuda_graphs", False):
        reasons.append(f"{type(arch).__name__}'s step is not checked for CUDA graphs yet (host work inside it)")
    if not compiled:
        reasons.append("the denoiser is not compiled (model.compile)")
    if world > 1:
        reasons.append("several processes")
    if not (type(optimizer) in (torch.optim.AdamW, torch.optim.Adam) and optimizer.defaults.get("fused")):
        reasons.append("the optimizer is not torch's fused Adam/AdamW (train.optimizer: adamw or adam)")
    if dtype == torch.float16:
        reasons.append("fp16's loss scaler reads its overflow check on the host (use bf16)")
    if block_swap or offload:
        reasons.append("block swap / checkpointed inputs in host memory copy on side streams")
    if train_text_encoder:
        reasons.append("the text encoders train (prompts are tokenized on the host each step)")
    if dropout:
        reasons.append("LoRA dropout (the recompute of a checkpointed block must draw the same numbers)")
    return reasons


def _batch_parts(batch) -> dict:
    """What a graphed step reads of a batch: the cached latents, the cached text tensors, the loss weights."""
    return {"latents": batch.latents, "loss_weights": batch.loss_weights, **{f"text.{k}": v for k, v in batch.text.items()}}


def graphable(batch) -> bool:
    return (batch.latents is not None and batch.text is not None and batch.pixels is None and batch.control is None
            and all(isinstance(v, torch.Tensor) for v in batch.text.values()))


def shape_key(batch) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in _batch_parts(batch).items())


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: object  # the static batch (micro-batch graphs) or the static loss total (the update's graph)
    output: torch.Tensor | None


class StepGraphs:
    """The graphs of one run. `room`: the memory plan has room for an eager step's activations beside the graphs'
    pool; without it every graph is dropped before a new shape's eager step, and captured again when next met."""

    def __init__(self, params, optimizer, generator, *, room: bool, warmup: int = 2):
        self.optimizer, self.generator, self.room = optimizer, generator, room
        self.warmup = warmup  # eager runs of a shape before its capture (the first shape; later ones: 1)
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: Counter = Counter()
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None
        self.captures = 0
        for group in optimizer.param_groups:
            group["capturable"] = True  # the step count on the device
        self.lrs = [torch.tensor(float(g["lr"]), device=generator.device) for g in optimizer.param_groups]
        for p in params:  # the gradients outside the pool: every graph accumulates into the same tensors
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    # ---- the two kinds of graph -------------------------------------------------------------------
    def forward_backward(self, batch, run) -> torch.Tensor:
        """`run(batch)` (one micro-batch's forward and backward, returning its loss) eagerly or from its graph."""
        if self.failed or not graphable(batch):
            return run(batch)
        key = ("micro", shape_key(batch))
        entry = self.graphs.get(key) or self._maybe_capture(key, run, lambda: _static_batch(batch, self.generator.device))
        if entry is None:
            return run(batch)
        static = _batch_parts(entry.inputs)
        for name, value in _batch_parts(batch).items():
            static[name].copy_(value, non_blocking=True)
        entry.graph.replay()
        return entry.output.clone()

    def update(self, total: torch.Tensor, run) -> None:
        """`run(total)` (clipping, the optimizer's step, zeroed gradients) eagerly or from its graph."""
        if self.failed:
            return run(total)
        key = ("update",)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._maybe_capture(key, run, total.clone, around=self._lr_tensors)
            if entry is None:
                return run(total)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        entry.inputs.copy_(total)
        entry.graph.replay()

    # ---- capture ----------------------------------------------------------------------------------
    def _maybe_capture(self, key, fn, make_inputs, around=contextlib.nullcontext) -> _Graph | None:
        """None while the shape is still warming up (run it eagerly), else its new graph: `fn` captured on the
        static inputs `make_inputs()` gives, inside the context `around()`."""
        self.seen[key] += 1
        if self.seen[key] == 1 and self.graphs and not self.room and key[0] == "micro":
            self.drop()  # this shape's eager step needs the memory the pool holds
        if self.seen[key] <= (self.warmup if not self.captures else 1):
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # eager steps' cached blocks back to the device, for the pool
        static, graph = make_inputs(), torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(self.generator)
            with around(), torch.cuda.graph(graph, pool=self.pool):
                output = fn(static)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any capture failure: the run goes on eagerly, as before
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            print(f"warning: capturing the step as a CUDA graph failed ({self.failed}); continuing without CUDA graphs "
                  "(set train.cuda_graphs: off to skip them)", file=sys.stderr)
            self.drop()  # a capture runs no kernel: the gradients still hold what the eager steps put there
            return None
        self.captures += 1
        self.graphs[key] = entry = _Graph(graph, static, output)
        return entry

    @contextlib.contextmanager
    def _lr_tensors(self):
        # fused Adam reads a tensor learning rate on the device: the graph holds its address, not its value
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
            group["lr"] = lr
        try:
            yield
        finally:
            for value, group in zip(floats, self.optimizer.param_groups):
                group["lr"] = value

    def drop(self) -> None:
        """Every graph released (its memory back to the device); each is captured again when next needed."""
        if not self.graphs:
            return
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _static_batch(batch, device):
    """The batch with its step's tensors in fresh device memory, which the graph reads and each replay refills."""
    copy = lambda t: t.to(device, copy=True)
    return dataclasses.replace(batch, latents=copy(batch.latents), loss_weights=copy(batch.loss_weights),
                               text={k: copy(v) for k, v in batch.text.items()}, noise_seed=None)
