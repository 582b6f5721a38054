"""Quantized frozen bases through torchao: the Linear weights of a frozen model stored in 8 or 4 bits,
block by block as the model loads, while the LoRA layers on top train in full precision.

torchao was picked over optimum-quanto (ai-toolkit's library) and bitsandbytes: its weight tensors are
plain tensor subclasses that F.linear, autograd, peft (`TorchaoLoraLinear`), `.to()`/pinning and
torch.compile all handle, on the CPU as on CUDA; quanto's qfloat8 layer refuses autocast's fp32 inputs and
cannot be compiled, and bitsandbytes has no fp8 storage and no CPU path for its 4-bit matmul.

Architecture-agnostic: shared code quantizes every Linear of what it is given; an architecture only names
the layers it keeps in full precision (`quantize_exclude`), the user adds `quantize_kwargs.exclude`.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# config qtype -> storage. ai-toolkit's default `qfloat8` (optimum-quanto) and `float8` (torchao) both mean
# e4m3 weights with one scale per output row: the same storage here.
QTYPES = {"qfloat8": "float8", "float8": "float8", "float8_e4m3fn": "float8", "fp8": "float8",
          "qint8": "int8", "int8": "int8", "uint8": "int8", "nf4": "nf4", "qint4": "nf4", "uint4": "nf4", "int4": "nf4"}
BYTES_PER_WEIGHT = {"float8": 1.0 + 4 / 4096, "int8": 1.0 + 4 / 4096, "nf4": 0.5 + 1 / 64 + 1 / 256}
NF4_BLOCK = 64  # weights per NF4 scale, as QLoRA
_WARNED: set[str] = set()


def storage_of(qtype: str, key: str = "model.qtype") -> str:
    """The storage a config qtype means ('float8', 'int8', 'nf4'); a clear error for the rest."""
    name = qtype.lower().partition("|")[0]
    if "|" in qtype:
        raise ValueError(f"{key} '{qtype}': accuracy recovery adapters ('<qtype>|<file>') are not supported yet")
    if name not in QTYPES:
        raise ValueError(f"{key} '{qtype}' is not supported yet (supported: qfloat8 (default), float8, int8/qint8, "
                         "nf4/uint4 (4-bit NormalFloat))")
    return QTYPES[name]


def text_encoder_bits_qtype(bits: int) -> str | None:
    """ai-toolkit's `model.text_encoder_bits` (16, 8 or 4) as a qtype for the text encoders."""
    if bits not in (4, 8, 16):
        raise ValueError(f"model.text_encoder_bits {bits}: use 16, 8 or 4")
    return {16: None, 8: "int8", 4: "nf4"}[bits]


def excluded(name: str, patterns: list[str]) -> bool:
    """ai-toolkit's quantize_kwargs.exclude: shell-style patterns ('*time_text_embed*') over module names;
    a bare name also excludes everything under it."""
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _nf4_scaler_block(n_blocks: int) -> int | None:
    # torchao double-quantises the per-64 scales in groups that must divide their count; 256 where possible
    for size in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if n_blocks % size == 0:
            return size
    return None


def quantize_weight(weight: torch.Tensor, storage: str) -> torch.Tensor | None:
    """A frozen Linear weight as a torchao quantized tensor (None: this shape cannot be stored so)."""
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if storage == "float8":  # what torchao's Float8WeightOnlyConfig stores
        return Float8Tensor.from_hp(weight, float8_dtype=torch.float8_e4m3fn, granularity=_per_row())
    if storage == "int8":
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        return Int8Tensor.from_hp(weight, granularity=_per_row())
    if storage == "nf4":
        if weight.numel() % NF4_BLOCK:
            return None
        return to_nf4(weight, NF4_BLOCK, _nf4_scaler_block(weight.numel() // NF4_BLOCK))
    raise ValueError(storage)


def _per_row():
    from torchao.quantization import PerRow

    return PerRow()


def float8_from_file(data: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """A weight that a file already stores as float8 (ComfyUI `*_fp8_e4m3fn`, scaled fp8) used as it is:
    the fp8 bytes are kept, with the file's scale (a scalar or one per row) per output row."""
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1).expand(data.shape[0], 1).contiguous()
    return Float8Tensor(data, scale, block_size=[1, data.shape[1]], dtype=dtype)


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """A quantized weight back in its floating-point dtype (a plain weight as it is)."""
    if not is_quantized(t):
        return t
    return t.get_original_weight() if hasattr(t, "get_original_weight") else t.dequantize()  # NF4 names it so


@dataclass
class Quantizer:
    """How the Linear weights of a frozen module are stored: `storage` None keeps them as they are."""

    storage: str | None
    exclude: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"quantized": 0, "kept": 0})

    def __call__(self, module: torch.nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        """Quantize every Linear under `module` (named `prefix` in the whole model) whose full name is not
        excluded and does not start with one of `skip` (parts quantized on their own)."""
        if self.storage is None:
            return
        for name, layer in module.named_modules():
            full = f"{prefix}.{name}".strip(".") if prefix else name
            if not isinstance(layer, torch.nn.Linear) or (skip and full.startswith(skip)):
                continue
            weight = layer.weight
            if excluded(full, self.exclude) or weight.requires_grad or is_quantized(weight) or weight.is_meta:
                self.counts["kept" if not is_quantized(weight) else "quantized"] += 1
                continue
            q = quantize_weight(weight.detach(), self.storage)
            if q is None:
                self.counts["kept"] += 1
                if full not in _WARNED:
                    _WARNED.add(full)
                    log.info(f"{full}: shape {tuple(weight.shape)} cannot be stored as {self.storage}; kept as is")
                continue
            layer.weight = torch.nn.Parameter(q, requires_grad=False)
            self.counts["quantized"] += 1

    def describe(self) -> str:
        return f"{self.storage or 'unquantized'}: {self.counts['quantized']} Linear layers quantized, {self.counts['kept']} kept"


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers take where they are stored (quantized ones at their size)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += tensor_bytes(t)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    if not is_quantized(t):
        return t.numel() * t.element_size()
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32: how far a quantized model's output is from the full-precision one."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if math.isfinite(n) else "?"


def _rows_to_float8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (2-D) as e4m3 with one fp32 scale per row."""
    scale = (t.abs().amax(dim=1, keepdim=True).float() / torch.finfo(torch.float8_e4m3fn).max).clamp_min(1e-12)
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


class Float8Matmul(torch.autograd.Function):
    """y = x·Wᵀ and its input gradient both on fp8 tensor cores (torch._scaled_mm), W's stored e4m3 rows used
    as they are. Forward: x quantized per row. Backward: dx = g·W contracts over W's rows, so W's per-row
    scales are folded into g's columns before g is quantized per row; the e4m3 W is only transposed, never
    dequantized. Written here because torchao's float8 inference tensors have no fp8 backward, and its float8
    training keeps a full-precision copy of every weight."""

    @staticmethod
    def forward(ctx, x, qdata, scale, bias):
        shape = x.shape
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        xq, x_scale = _rows_to_float8(x.reshape(-1, shape[-1]))
        y = torch._scaled_mm(xq, qdata.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1).float(), out_dtype=dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(qdata, scale)
        ctx.x_dtype, ctx.x_shape = x.dtype, shape
        return y.reshape(*shape[:-1], qdata.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        qdata, scale = ctx.saved_tensors
        g = grad.reshape(-1, qdata.shape[0]).float() * scale.reshape(1, -1).float()
        gq, g_scale = _rows_to_float8(g)
        # _scaled_mm takes its second operand column-major: W's transpose, made contiguous, viewed back
        w_cols = qdata.t().contiguous().t()
        ones = torch.ones(1, qdata.shape[1], device=qdata.device, dtype=torch.float32)
        dtype = ctx.x_dtype if ctx.x_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        dx = torch._scaled_mm(gq, w_cols, scale_a=g_scale, scale_b=ones, out_dtype=dtype)
        return dx.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None


def float8_matmul_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    with torch.autocast(x.device.type, enabled=False):
        return Float8Matmul.apply(x, w.qdata, w.scale, layer.bias)


def use_float8_matmuls(module: torch.nn.Module) -> int:
    """Run every float8-stored Linear under `module` through Float8Matmul (fp8 tensor cores: sm89+ GPUs, or the
    CPU's reference kernel); widths that _scaled_mm cannot take (not multiples of 16) keep the dequantizing path.
    Returns how many layers switched."""
    import types

    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    n = 0
    for layer in module.modules():
        w = getattr(layer, "weight", None)
        if isinstance(layer, torch.nn.Linear) and isinstance(w, Float8Tensor) and w.scale.numel() == w.shape[0]:
            if w.shape[0] % 16 or w.shape[1] % 16:
                continue
            layer.forward = types.MethodType(float8_matmul_forward, layer)
            n += 1
    return n
