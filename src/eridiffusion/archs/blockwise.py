"""Load a frozen denoiser block by block: build it on the meta device, read one block's tensors from disk,
place them, then fuse/quantize/move that block before the next is read, so host RAM holds the finished
model plus one block in flight rather than a whole bf16 copy. Architecture-agnostic: an architecture hands
over its model skeleton, the names of its repeated block lists and chunks of its own state dict."""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..quant import Quantizer, excluded, float8_from_file, use_float8_matmuls

# safetensors dtype names -> torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class SafetensorsReader:
    """One tensor at a time from a .safetensors file with plain reads. Written here because safetensors'
    own reader memory-maps the file, and every mapped page it touches counts as this process's RAM until the
    file is closed: reading a 24 GB model through it peaks at twice that."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self.entries[key]["dtype"]]

    def meta(self, key: str) -> torch.Tensor:
        """A size-only stand-in, for code that inspects shapes (config inference)."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if end > begin:
            buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < end - begin:  # pread may return less than asked on large reads
                    got = os.preadv(fd, [memoryview(buf)[done:]], self.start + begin + done)
                    if got <= 0:
                        raise OSError(f"{self.path}: file ends early (truncated?) while reading '{key}'")
                    done += got
            finally:
                os.close(fd)
        return out


class DictReader:
    """The same interface over tensors already in memory (pickled .ckpt/.pt files)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return self.tensors[key].dtype

    def meta(self, key):
        return self.tensors[key].to("meta")

    def read(self, key):
        return self.tensors.pop(key)


def split_rows(t: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """A fused weight's rows split into pieces, each with its own storage (safetensors will not save views);
    float8, which has few CPU kernels, is split as bytes."""
    raw = t.view(torch.uint8) if t.dtype in FLOAT8 else t
    return [p.clone().view(t.dtype) for p in raw.split(widths)]


def folder_readers(folder: Path) -> dict[str, SafetensorsReader]:
    """key -> reader over every .safetensors file of a diffusers component folder (sharded or not)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {folder}")
    by_key = {}
    for f in files:
        reader = SafetensorsReader(f)
        by_key.update(dict.fromkeys(reader.keys(), reader))
    return by_key


def unit_of(name: str, block_lists: tuple[str, ...]) -> str:
    """The loading unit a parameter belongs to: 'transformer_blocks.3' for a block, else its top-level child."""
    head, _, rest = name.partition(".")
    if head in block_lists:
        return f"{head}.{rest.partition('.')[0]}"
    return head


@dataclass
class FrozenBase:
    """What happens to each part of the frozen denoiser as it loads: an assistant LoRA fused in, Linear
    weights quantized, then the part moved to the training device, or kept in host memory for block swap."""

    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    quantizer: Quantizer = field(default_factory=lambda: Quantizer(None))
    te_quantizer: Quantizer = field(default_factory=lambda: Quantizer(None))
    fuse: Callable[[torch.nn.Module, str], int] | None = None  # fuse(module, its name in the model)
    swap_blocks: int = 0  # how many of the last repeated blocks block swap keeps in host memory
    quantize_on_cpu: bool = False  # model.low_vram: quantize before anything reaches the GPU
    float8_matmul: bool = False  # model.float8_matmul: float8 layers multiply on fp8 tensor cores
    # called with the meta-device model and its block names before any weight is read (the memory plan)
    plan: Callable[[torch.nn.Module, list[str]], None] | None = None
    host_units: frozenset[str] = frozenset()

    def set_units(self, blocks: list[str], model: torch.nn.Module | None = None) -> None:
        if self.plan is not None and model is not None:
            self.plan(model, blocks)
        self.host_units = frozenset(blocks[len(blocks) - self.swap_blocks:] if self.swap_blocks else ())

    def finish(self, unit: str, module: torch.nn.Module) -> None:
        if self.fuse is not None:
            self.fuse(module, unit)
        home = torch.device("cpu") if unit in self.host_units else self.device
        if not self.quantize_on_cpu:
            module.to(home)  # quantizing on the GPU is much faster than on the CPU
        self.quantizer(module, unit)
        if self.float8_matmul:
            use_float8_matmuls(module)
        module.to(home)



def materialize(model: torch.nn.Module, chunks: Iterable[dict[str, torch.Tensor]], base: FrozenBase,
                block_lists: tuple[str, ...], source: str, exact: frozenset[str] = frozenset()) -> torch.nn.Module:
    """Fill a meta-device `model` from state-dict `chunks` (each covering whole units), finishing each unit
    as soon as all its tensors are in. float8 weights (with an optional `<name>.scale_weight`) become
    quantized float8 weights directly when the base is stored in float8, else are widened one at a time.
    `exact`: keys placed in their own dtype (computed tables a model keeps in float32/64, e.g. rotary ones)."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    pending: dict[str, set[str]] = {}
    for name in expected:
        pending.setdefault(unit_of(name, block_lists), set()).add(name)
    modules = dict(model.named_modules())
    base.set_units(block_units(model, block_lists), model)
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    for chunk in chunks:
        scales = {k.removesuffix(".scale_weight"): chunk.pop(k) for k in [k for k in chunk if k.endswith(".scale_weight")]}
        for key, tensor in chunk.items():
            if key not in expected:
                raise ValueError(f"{source}: unexpected tensor '{key}' for {type(model).__name__}")
            owner = key.rpartition(".")[0]
            if tensor.dtype in FLOAT8:
                scale = scales.get(owner, 1.0)
                quantizable = (base.quantizer.storage == "float8" and owner in linears and key.endswith(".weight")
                               and not excluded(owner, base.quantizer.exclude))
                if quantizable:
                    value = float8_from_file(tensor, scale, base.dtype)
                else:  # one tensor widened at a time, never the whole file
                    value = (tensor.to(torch.float32) * torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
                             if tensor.dim() == 2 else tensor.to(torch.float32) * float(torch.as_tensor(scale).flatten()[0])
                             ).to(base.dtype)
            else:
                target = expected[key]
                cast = target.is_floating_point() and tensor.is_floating_point() and key not in exact
                value = tensor.to(base.dtype) if cast else tensor
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"{source}: '{key}' has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(expected[key].shape)}")
            _assign(modules[owner] if owner else model, key.rpartition(".")[2], value)
            unit = unit_of(key, block_lists)
            pending[unit].discard(key)
            if not pending[unit]:
                if unit in modules:
                    base.finish(unit, modules[unit])
                else:  # a parameter of the model itself (an output scale_shift_table): moved, never quantized
                    _assign(model, unit, getattr(model, unit).to(base.device))
                del pending[unit]
    missing = sorted(n for names in pending.values() for n in names)
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors of {type(model).__name__} are missing, e.g. {missing[:5]}")
    model._eri_finished = True
    return model.eval()


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def read_units(readers: dict[str, SafetensorsReader], block_lists: tuple[str, ...],
               rename: Callable[[str], str] = lambda k: k) -> Iterator[dict[str, torch.Tensor]]:
    """State-dict chunks of a diffusers-layout model, one unit (block or top-level child) at a time."""
    units: dict[str, list[str]] = {}
    for key in readers:
        units.setdefault(unit_of(rename(key), block_lists), []).append(key)
    for keys in units.values():
        yield {rename(k): readers[k].read(k) for k in keys}


def block_units(model: torch.nn.Module, block_lists: tuple[str, ...]) -> list[str]:
    """The repeated blocks' unit names in execution order ('transformer_blocks.0', ...)."""
    return [f"{name}.{i}" for name in block_lists for i in range(len(getattr(model, name)))]


def finish_loaded(model: torch.nn.Module, base: FrozenBase, block_lists: tuple[str, ...]) -> None:
    """Finish a denoiser that was loaded whole (diffusers' from_pretrained, or built in memory by a
    benchmark) as `materialize` finishes one loaded block by block; a no-op for one it already finished."""
    if getattr(model, "_eri_finished", False):
        return
    model.requires_grad_(False)
    base.set_units(block_units(model, block_lists), model)
    for name, child in model.named_children():
        if name in block_lists:
            for i, block in enumerate(child):
                base.finish(f"{name}.{i}", block)
        else:
            base.finish(name, child)
    for t in [*model._parameters.values(), *model._buffers.values()]:
        if t is not None:
            t.data = t.data.to(base.device)
    model._eri_finished = True
