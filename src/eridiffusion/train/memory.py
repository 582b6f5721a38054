"""How the frozen base is held: quantization, block swap and checkpointing as the config says, or, with
`train.memory: auto`, the fastest settings whose estimated peak fits the free GPU memory."""
from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..archs.blockwise import FrozenBase
from ..quant import BYTES_PER_WEIGHT, Quantizer, excluded, gib, storage_of, text_encoder_bits_qtype

# Activation estimate, in units of (tokens x hidden size x 2 bytes): what a checkpointed step keeps per block
# (its input) and what one block needs while it runs or recomputes. Calibrated on a 12B, 57-block transformer
# at 1024² on an H200 (bf16 step 25.6 GiB = 22.2 weights + 1.3 LoRA/AdamW + ~2 activations), with margin.
SAVED_PER_BLOCK, WORKING_SET, UNCHECKPOINTED_PER_BLOCK = 1.0, 24.0, 21.0
# A model without repeated-block lists (a UNet), in the same units over the whole model: checkpointed and not.
# Calibrated on a 2.6B UNet at 1024² (H200: 6.18 / 11.62 GiB peaks = 4.8 weights + 0.6 LoRA/AdamW + activations).
WHOLE_MODEL_CHECKPOINTED, WHOLE_MODEL_UNCHECKPOINTED = 70.0, 560.0
RESERVE = 1.5 * 2**30  # CUDA context, cuBLAS workspaces, allocator fragmentation
# (storage, checkpointing, may swap, offload activations), fastest first as measured on that model: exact weights
# without and with checkpointing, then float8 (compiled it is faster than bf16, output error 0.02), float8 with
# block swap (+5 %), float8 with the checkpointed blocks' inputs in host memory (long video clips, whose saved
# inputs alone outgrow the card), and nf4 (half float8's bytes, slower, error 0.05) last. int8 is never faster
# than float8.
CANDIDATES = ((None, False, False, False), (None, True, False, False), ("float8", False, False, False),
              ("float8", True, False, False), ("float8", True, True, False), ("float8", True, True, True),
              ("nf4", True, False, False), ("nf4", True, True, False), ("nf4", True, True, True))
FULL_CANDIDATES = CANDIDATES[:2]  # a full fine-tune trains the weights themselves: neither quantized nor swapped
OFFLOAD_IN_FLIGHT = 2  # offloaded block inputs on the GPU at a time: one being copied out or back, one in use
KEPT_ATTENTION_PER_BLOCK = 2.0  # attention outputs a checkpointed block keeps with keep_attention (self + cross)


@dataclass
class Plan:
    storage: str | None
    swap_blocks: int
    checkpointing: bool
    expected_peak: float  # bytes
    budget: float  # bytes
    weights: float
    activations: float
    whole_blocks: int = 0  # with checkpointing: the first blocks keep their activations (no recompute)
    offload_activations: bool = False  # the checkpointed blocks' inputs wait in host memory for backward
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        swap = f"{self.swap_blocks} blocks swapped" if self.swap_blocks else "no block swap"
        fits = "" if self.expected_peak <= self.budget else " (does NOT fit: expect out-of-memory)"
        whole = f" but for the first {self.whole_blocks} blocks" if self.whole_blocks else ""
        whole += " (block inputs in host memory)" if self.offload_activations else ""
        return (f"memory plan: base {self.storage or 'unquantized'}, {swap}, checkpointing "
                f"{'on' + whole if self.checkpointing else 'off'}; expected peak {gib(self.expected_peak)} of "
                f"{gib(self.budget)} usable{fits}" + "".join(f"; {n}" for n in self.notes))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


@dataclass
class ModelSize:
    """What the estimate needs of a denoiser, read off its meta-device skeleton."""

    unit_linear: dict[str, int]  # unit -> quantizable Linear weight count
    unit_other: dict[str, int]  # unit -> every other parameter/buffer element
    blocks: list[str]
    width: int  # the most common Linear input width of a block: the hidden size the activations have

    @classmethod
    def of(cls, model: torch.nn.Module, blocks: list[str], exclude: list[str]) -> ModelSize:
        from ..archs.blockwise import unit_of

        lists = tuple(sorted({b.rpartition(".")[0] for b in blocks}))
        lin, other = {}, {}
        linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and not excluded(n, exclude)}
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            unit = unit_of(name, lists)
            table = lin if name in linear_weights else other
            table[unit] = table.get(unit, 0) + t.numel()
        first = model.get_submodule(blocks[0]) if blocks else model
        widths = [m.in_features for m in first.modules() if isinstance(m, torch.nn.Linear)] or [1]
        return cls(lin, other, blocks, max(set(widths), key=widths.count))

    def unit_bytes(self, unit: str, storage: str | None) -> float:
        per = BYTES_PER_WEIGHT[storage] if storage else 2.0
        return self.unit_linear.get(unit, 0) * per + self.unit_other.get(unit, 0) * 2.0


def estimate(size: ModelSize, storage: str | None, swap: int, checkpointing: bool, *, budget: float, tokens: int,
             batch: int, lora_bytes: float, whole: int = 0, fp8_matmul: bool = False, offload: bool = False,
             keep_attention: bool = False) -> Plan:
    """The expected peak of one training step with these settings (`whole`: checkpointed but for the first
    `whole` blocks; `offload`: the checkpointed blocks' inputs kept in host memory; `keep_attention`: their
    attention outputs kept on the GPU)."""
    act_unit = tokens * batch * size.width * 2.0
    n = len(size.blocks)
    offload = offload and checkpointing and n > 0
    if not n:
        acts = act_unit * (WHOLE_MODEL_CHECKPOINTED if checkpointing else WHOLE_MODEL_UNCHECKPOINTED)
    elif checkpointing:
        saved = min(OFFLOAD_IN_FLIGHT, n - whole) if offload else n - whole
        kept = KEPT_ATTENTION_PER_BLOCK * (n - whole) if keep_attention else 0.0
        acts = act_unit * (SAVED_PER_BLOCK * saved + kept + UNCHECKPOINTED_PER_BLOCK * whole + WORKING_SET)
    else:
        acts = act_unit * (UNCHECKPOINTED_PER_BLOCK * n + WORKING_SET)
    units = set(size.unit_linear) | set(size.unit_other)
    resident = sum(size.unit_bytes(u, storage) for u in units)
    swapped = [size.unit_bytes(b, storage) for b in size.blocks[n - swap:]] if swap else []
    weights = resident - sum(swapped) + 2 * max(swapped, default=0.0)  # two swapped blocks on the GPU at a time
    if storage and not (fp8_matmul and storage == "float8") and checkpointing:
        # a block kept whole saves its dequantized weights for backward; fp8 matmuls save the stored ones
        acts += sum(size.unit_bytes(b, None) for b in size.blocks[:whole])
    return Plan(storage, swap, checkpointing, weights + lora_bytes + acts + RESERVE, budget, weights, acts, whole, offload)


def make_plan(size: ModelSize, *, budget: float, tokens: int, batch: int, lora_bytes: float,
              candidates=CANDIDATES, fp8_matmul: bool = False, keep_whole: bool = True, keep_attention: bool = False) -> Plan:
    """The first candidate whose estimated peak fits, with as few swapped blocks as fit; a checkpointed plan
    without swap then keeps as many blocks whole as still fit (each one less recompute: ~1 % of a 57-block step),
    unless `keep_whole` is false (an architecture whose unrecomputed blocks the estimate is not calibrated for)."""
    kw = dict(budget=budget, tokens=tokens, batch=batch, lora_bytes=lora_bytes, fp8_matmul=fp8_matmul,
              keep_attention=keep_attention)
    tried = []
    for storage, ckpt, may_swap, offload in candidates:
        for swap in range(1 if may_swap and not offload else 0, len(size.blocks) + 1 if may_swap else 1):
            plan = estimate(size, storage, swap, ckpt, offload=offload, **kw)
            if plan.expected_peak <= budget:
                while keep_whole and ckpt and not swap and plan.whole_blocks < len(size.blocks):
                    wider = estimate(size, storage, 0, True, whole=plan.whole_blocks + 1, offload=offload, **kw)
                    if wider.expected_peak > budget:
                        break
                    plan = wider
                return plan
            tried.append(plan)
    best = min(tried, key=lambda p: p.expected_peak)
    best.notes.append("nothing fits: lower the resolution or batch size")
    return best


def quantized_candidates(storage: str, candidates=CANDIDATES) -> tuple:
    """The candidates left when the config asks for a quantized base (`model.quantize: true`): quantized ones, at
    most as many bits per weight as `storage`. train.memory: auto then plans swap, checkpointing and the blocks kept
    whole around the quantization asked for, rather than widening the base where bf16 would fit."""
    bits = {"float8": 8, "int8": 8, "nf4": 4}
    return tuple(c for c in candidates if c[0] is not None and bits[c[0]] <= bits[storage])


def lora_state_bytes(size: ModelSize, rank: int, only_blocks: bool = True) -> float:
    """fp32 LoRA weights, gradients and two AdamW moments: 16 bytes per LoRA weight (an upper estimate:
    every Linear of the blocks, each side sqrt(n) wide as a square layer of its size would be)."""
    total = sum(v for u, v in size.unit_linear.items() if not (only_blocks and size.blocks) or u in size.blocks)
    layers_width = math.sqrt(max(total, 1) / max(len(size.blocks), 1) / 8)  # ~8 Linears per block
    return 16.0 * rank * 2 * layers_width * 8 * max(len(size.blocks), 1)


def frozen_base(proc, arch_cls, device: torch.device, dtype: torch.dtype, fuse=None) -> FrozenBase:
    """The FrozenBase the config asks for: model.quantize/qtype (+ the architecture's and the user's
    exclusions), quantize_te/qtype_te or text_encoder_bits, low_vram, layer_offloading / swap_blocks."""
    m = proc.model
    storage = storage_of(m.qtype) if m.quantize else None
    te_qtype = m.qtype_te if m.quantize_te else text_encoder_bits_qtype(m.text_encoder_bits)
    te_storage = storage_of(te_qtype, "model.qtype_te") if te_qtype else None
    exclude = [*getattr(arch_cls, "quantize_exclude", []), *m.quantize_kwargs.exclude]
    if m.float8_matmul:
        if storage != "float8":
            raise ValueError("model.float8_matmul needs model.quantize: true with a float8 qtype (qfloat8 or float8)")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"model.float8_matmul needs fp8 tensor cores (Ada or Hopper, sm89+); "
                             f"{torch.cuda.get_device_name(device)} has none: remove the key")
    return FrozenBase(device=device, dtype=dtype, quantizer=Quantizer(storage, exclude), te_quantizer=Quantizer(te_storage),
                      fuse=fuse, quantize_on_cpu=m.low_vram or device.type == "cpu", float8_matmul=m.float8_matmul)


def enable_checkpointing(model: torch.nn.Module, whole=(), offload: bool = False, keep_attention: bool = False,
                         preserve_rng: bool = True) -> None:
    """diffusers' gradient checkpointing of every block, but for the blocks in `whole`: those keep their
    activations (more memory, no recompute), as many as the memory plan finds room for. With `offload` the
    inputs a checkpointed block keeps for its recompute wait in pinned host memory until backward: torch's
    save_on_cpu packs exactly those, as checkpoint saves its inputs outside its own saved-tensor hooks. With
    `keep_attention` a checkpointed block keeps its attention outputs (torch's selective checkpointing), so its
    recompute skips the attention kernels: one activation more per attention call, for long sequences' costliest op.
    `preserve_rng: False` skips saving the RNG state for the recompute (reading it is not allowed inside a CUDA graph
    capture); only for blocks that draw no random numbers (no dropout)."""
    whole = {id(b) for b in whole}
    pinned = torch.cuda.is_available()
    kw = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_attention)} if keep_attention else {}

    def run(block, *args):
        if id(block) in whole:
            return block(*args)
        with torch.autograd.graph.save_on_cpu(pin_memory=pinned) if offload else contextlib.nullcontext():
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                     preserve_rng_state=preserve_rng, **kw)

    model.enable_gradient_checkpointing(run)


_ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(torch.ops.aten, name))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def swap_request(proc, n_blocks: int) -> int:
    """Blocks to swap as the config says: model.swap_blocks, else layer_offloading's percentage."""
    m = proc.model
    if m.swap_blocks is not None:
        if m.swap_blocks > n_blocks:
            raise ValueError(f"model.swap_blocks {m.swap_blocks}: this model has {n_blocks} repeated blocks")
        return m.swap_blocks
    if m.layer_offloading:
        from .offload import swap_count

        return swap_count(m.layer_offloading_transformer_percent, n_blocks)
    return 0


def usable_gpu_memory(device: torch.device) -> float:
    """Free memory on the device, within any per-process cap (set_per_process_memory_fraction)."""
    if device.index is None:  # `device: cuda`
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    cap = total * fraction - torch.cuda.memory_reserved(device)
    return float(min(free, cap))
