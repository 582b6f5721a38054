"""An assistant LoRA (ai-toolkit's `model.assistant_lora_path`, e.g. a schnell training adapter).

It is fused into the frozen base before training, so training sees base + adapter, and taken back
out for previews, which show base + the user's LoRA. Fusing happens per block on the plain float
weights, before any quantization. Taking it out cannot un-fuse a quantized weight exactly, so
`removed` instead adds `multiplier` x the adapter's output at run time, through forward hooks.
Architecture-agnostic: module names are relative to one component's root.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_SUFFIXES = ("lora_A.weight", "lora_B.weight", "alpha")


@dataclass
class AssistantLora:
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A [r, in], B [out, r], alpha / r)
    source: str = ""  # the file, for error messages
    fused: set[str] = field(default_factory=set, init=False, repr=False)  # names fuse_into has done

    @classmethod
    def from_component_state(cls, state: dict[str, torch.Tensor], path) -> AssistantLora:
        """Peft-named LoRA tensors of one component (`<module>.lora_A.weight`, `.lora_B.weight`,
        optional `.alpha`; without alpha the scale is 1.0, as loaders read such files)."""
        parts: dict[str, list] = {}
        for key, tensor in state.items():
            suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(f"assistant LoRA {path}: unsupported key '{key}' "
                                 "(expected <module>.lora_A.weight, .lora_B.weight, .alpha)")
            module = key[:-len(suffix) - 1]
            slot = parts.setdefault(module, [None, None, None])
            if suffix == "alpha":
                if tensor.numel() != 1:
                    raise ValueError(f"assistant LoRA {path}: '{key}' is not a scalar")
                slot[2] = float(tensor)
            else:
                slot[_SUFFIXES.index(suffix)] = tensor
        deltas = {}
        for module, (a, b, alpha) in parts.items():
            for t, name in ((a, "lora_A"), (b, "lora_B")):
                if t is None:
                    raise ValueError(f"assistant LoRA {path}: '{module}' has no {name}.weight")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"assistant LoRA {path}: '{module}' lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)} are not a Linear LoRA pair")
            deltas[module] = (a, b, 1.0 if alpha is None else alpha / a.shape[0])
        if not deltas:
            raise ValueError(f"assistant LoRA {path}: no LoRA tensors for this model")
        return cls(deltas, str(path))

    def fuse_into(self, module: torch.nn.Module, prefix: str = "") -> int:
        """Add scale * B @ A to the weight of each named Linear under `module`, whose name within the
        component is `prefix`; returns how many. Call it block by block while a model loads."""
        count = 0
        for name, layer in module.named_modules():
            full = ".".join(p for p in (prefix, name) if p)
            if full not in self.deltas or not isinstance(layer, torch.nn.Linear):
                continue
            if full in self.fused:
                raise ValueError(f"assistant LoRA {self.source}: '{full}' is already fused")
            w = layer.weight
            if type(w.data) is not torch.Tensor or w.is_meta:  # a quantized subclass, or not loaded yet
                raise ValueError(f"assistant LoRA {self.source}: '{full}' must be fused into a loaded, "
                                 f"unquantized weight, got {type(w.data).__name__} on {w.device}")
            a, b, scale = self.deltas[full]
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise ValueError(f"assistant LoRA {self.source}: '{full}' is {b.shape[0]}x{a.shape[1]}, "
                                 f"the layer's weight {tuple(w.shape)}")
            with torch.no_grad():
                delta = scale * (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32))
                w.copy_((w.float() + delta).to(w.dtype))
            self.fused.add(full)
            count += 1
        return count

    def unfused(self) -> list[str]:
        """Module names no `fuse_into` call has matched to a Linear."""
        return sorted(self.deltas.keys() - self.fused)

    @contextlib.contextmanager
    def removed(self, module: torch.nn.Module, multiplier: float = -1.0):
        """Within the block, each affected Linear under the component root `module` also outputs
        multiplier * scale * B A x: with -1, the fused adapter is taken out (approximately, where the
        fused weight was quantized). A peft-wrapped Linear is hooked on its `base_layer`."""
        modules = dict(module.named_modules())
        handles = []
        try:
            for name, (a, b, scale) in self.deltas.items():
                layer = modules.get(f"{name}.base_layer", modules.get(name))
                if not isinstance(layer, torch.nn.Linear):
                    raise ValueError(f"assistant LoRA {self.source}: '{name}' is not a Linear of this model")
                handles.append(layer.register_forward_hook(_adding_hook(a, b.float() * (multiplier * scale))))
            yield
        finally:
            for h in handles:
                h.remove()


def _adding_hook(a: torch.Tensor, b: torch.Tensor):
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(_layer, inputs, output):
        key = (output.device, output.dtype)
        if key not in cache:  # cast once per device/dtype, not on every call
            cache[key] = (a.to(*key), b.to(*key))
        ca, cb = cache[key]
        return output + F.linear(F.linear(inputs[0].to(output.dtype), ca), cb)

    return hook
