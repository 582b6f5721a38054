"""Block swap (layer offloading) for the frozen denoiser: the frozen weights of the last `n_swapped` repeated
blocks live in pinned host memory and are copied to the device just before each block runs, one block ahead,
on a side CUDA stream, in forward and again in the backward recompute of gradient checkpointing.

Written here rather than taken from accelerate, whose cpu_offload hooks copy each module's weights on the
compute stream with blocking copies (set_module_tensor_to_device, non_blocking=False) and prefetch nothing,
or from diffusers' group offloading, whose stream prefetch follows the order of the first forward only (the
backward recompute runs blocks in reverse) and whose offload puts back host copies of every parameter,
which would drop the LoRA updates.

The host copy is the master: nothing is ever copied back, and trainable (LoRA) parameters never move.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def swap_count(percent: float, n_blocks: int) -> int:
    """ai-toolkit's layer_offloading_transformer_percent (0..1) as a number of swapped blocks, rounded half up."""
    if not 0 <= percent <= 1:
        raise ValueError(f"layer offloading percent must be between 0 and 1, got {percent}")
    return math.floor(percent * n_blocks + 0.5)


def _frozen(block: torch.nn.Module):
    """(module, store, name, tensor) for every frozen parameter and buffer of `block`."""
    for module in block.modules():
        for store in ("_parameters", "_buffers"):
            for name, t in getattr(module, store).items():
                if t is not None and not (store == "_parameters" and t.requires_grad):
                    yield module, store, name, t


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data (a torchao subclass keeps several: qdata, scale, ...)."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    return [x for name in t.__tensor_flatten__()[0] for x in _inner(getattr(t, name))]


def _frozen_bytes(blocks) -> int:
    tensors = {id(t): t for block in blocks for *_, t in _frozen(block)}
    return sum(x.numel() * x.element_size() for t in tensors.values() for x in _inner(t))


def _keeps_weights(block: torch.nn.Module, args, kwargs) -> bool:
    """Whether autograd would keep this forward's weights for backward: no memory saved, and device copies
    outliving their block. Non-reentrant checkpointing packs saved tensors with its hooks, reentrant runs
    forward without grad."""
    if not torch.is_grad_enabled() or torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        return False
    return any(t.requires_grad for t in [*block.parameters(), *tree_leaves((args, kwargs))] if isinstance(t, torch.Tensor))


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device != device:
        return t.to(device, non_blocking=True)
    # Same device (CPU runs): still a real copy, so the swapped path is what tests check. Through the inner
    # tensors because `.to` would return `t` itself and NF4Tensor.clone() re-quantizes.
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        return type(t).__tensor_unflatten__({n: _copy(getattr(t, n), device) for n in names}, ctx, t.size(), t.stride())
    return t.clone()


def _like(host: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # A new Parameter rather than assigning `.data`, which fails across tensor subclasses
    return torch.nn.Parameter(t, requires_grad=False) if isinstance(host, torch.nn.Parameter) else t


class BlockSwap:
    """Swap the frozen weights of the last `n_swapped` of `blocks` (in execution order) between host and
    `device`; the other blocks are moved to `device` once. Needs gradient checkpointing when training, so
    autograd never holds on to a block's device weights from forward to backward."""

    def __init__(self, blocks: list[torch.nn.Module], n_swapped: int, device: torch.device):
        if not 0 <= n_swapped <= len(blocks):
            raise ValueError(f"n_swapped must be between 0 and {len(blocks)}, got {n_swapped}")
        self.blocks, self.n_swapped, self.device = list(blocks), n_swapped, torch.device(device)
        self.max_resident = 0  # most swapped blocks with device copies at once, for tests and memory plans
        self.copies = 0  # block copies started: 2 * n_swapped - 1 a training step when every prefetch is used
        self._hooks = []
        self._slots: list[list[tuple[torch.nn.Module, str, str, int]]] = []  # per swapped block: where each tensor goes
        self._host: list[list[torch.Tensor]] = []  # per swapped block: the master copies
        self._copies: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}  # on the device now
        self._stream = self._started = None  # the side stream; an event marking where the last block began

    @property
    def swapped(self) -> list[torch.nn.Module]:
        return self.blocks[len(self.blocks) - self.n_swapped:]

    @property
    def resident_bytes(self) -> int:
        """Bytes of frozen weights kept on the device for good (the blocks not swapped)."""
        return _frozen_bytes(self.blocks[:len(self.blocks) - self.n_swapped])

    @property
    def host_bytes(self) -> int:
        """Bytes of frozen weights kept on the host; about two swapped blocks' worth is on the device at a time."""
        return _frozen_bytes(self.swapped)

    def attach(self) -> None:
        if self._hooks:
            raise RuntimeError("BlockSwap is already attached")
        for block in self.blocks[:len(self.blocks) - self.n_swapped]:
            block.to(self.device)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        for i, block in enumerate(self.swapped):
            slots, host, seen = [], [], {}
            for module, store, name, t in _frozen(block):
                if id(t) not in seen:  # a tensor shared within the block gets one master and one device copy
                    seen[id(t)] = len(host)
                    h = t.to("cpu")
                    host.append(_like(t, h.pin_memory() if cuda else h))  # pinned: async copies, no staging
                slots.append((module, store, name, seen[id(t)]))
            for p in block.parameters():
                if p.requires_grad and p.device != self.device:  # in place, so an optimizer's references hold
                    p.data = p.data.to(self.device)
            self._slots.append(slots)
            self._host.append(host)
            self._install(i, host)
            self._hooks += [block.register_forward_pre_hook(self._hook_before(i), with_kwargs=True),
                            block.register_forward_hook(self._hook_after(i), always_call=True)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._copies, self._started = [], {}, None
        for i, host in enumerate(self._host):
            self._install(i, host)
        for block in self.swapped:
            block.to(self.device)
        self._slots, self._host = [], []

    # ---- the swap ------------------------------------------------------------------------------
    def _install(self, i: int, tensors: list[torch.Tensor]) -> None:
        for module, store, name, k in self._slots[i]:
            getattr(module, store)[name] = tensors[k]

    def _load(self, i: int) -> None:
        """Start copying swapped block i to the device, on the side stream, unless it is there already."""
        if i in self._copies or not 0 <= i < len(self._host):
            return
        event = None
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            copies = [_like(h, _copy(h, self.device)) for h in self._host[i]]
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        self._copies[i] = copies, event
        self.copies += 1
        self.max_resident = max(self.max_resident, len(self._copies))

    def _hook_before(self, i: int):
        # Disabled for dynamo: the per-block compiled graph sees only the swapped-in tensors, as inputs
        @torch._dynamo.disable
        def before(block, args, kwargs):
            backward = torch._C._current_graph_task_id() != -1  # checkpoint's recompute runs in the autograd engine
            if not backward and _keeps_weights(block, args, kwargs):
                raise ValueError("block swap (layer offloading) needs train.gradient_checkpointing: true")
            following = i - 1 if backward else i + 1  # the recompute runs the blocks in reverse
            for k in [k for k in self._copies if k not in (i, following)]:  # prefetched for an order that did not come
                del self._copies[k]
            if self._stream is not None:
                compute = torch.cuda.current_stream(self.device)
                previous, self._started = self._started, compute.record_event()
                if previous is not None:  # keep the CPU at most a block ahead of the GPU, so that the copies it
                    previous.synchronize()  # freed are reusable and at most three blocks take device memory
            self._load(i)
            self._load(following)
            copies, event = self._copies[i]
            if event is not None:
                compute.wait_event(event)
                for t in copies:  # allocated on the side stream: keep the allocator from reusing it under compute
                    for x in _inner(t):
                        x.record_stream(compute)
            self._install(i, copies)

        return before

    def _hook_after(self, i: int):
        @torch._dynamo.disable
        def after(block, args, output):  # also on an exception, e.g. checkpoint's early stop of the recompute
            self._install(i, self._host[i])
            backward = torch._C._current_graph_task_id() != -1
            if backward or i != len(self._host) - 1 or not torch.is_grad_enabled():
                self._copies.pop(i, None)  # else kept: the backward recompute starts with this last block

        return after
