"""LoRA, DoRA, LoHa and LoKr on any torch module through peft: choose targets, inject, read and write the weights.
Architecture-agnostic: key layouts on disk are the architecture's business (`lora_to_file`)."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch
from peft import (LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model,
                  set_peft_model_state_dict)
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    kind: str = "lora"  # lora / locon (LoRA, conv layers included), dora, loha, lokr
    factor: int = -1  # LoKr's Kronecker factor (-1: the largest factor not above the square root)
    rank_dropout: float = 0.0  # LoHa / LoKr
    module_dropout: float = 0.0


KINDS = ("lora", "locon", "dora", "loha", "lokr")

# peft keeps DoRA's magnitude as `<module>.lora_magnitude_vector` of shape (out,); kohya, LyCORIS and ComfyUI's
# loader read `<module>.dora_scale` of shape (out, 1) (conv: (out, 1, 1, 1)) and ignore peft's name
MAGNITUDE, DORA_SCALE = ".lora_magnitude_vector", ".dora_scale"


def filter_names(names: list[str], *, only_if_contains: list[str] | None, ignore_if_contains: list[str] | None) -> list[str]:
    """Filter module names as ai-toolkit's network_kwargs do (ignore wins over only)."""
    if only_if_contains:
        names = [n for n in names if any(s in n for s in only_if_contains)]
    if ignore_if_contains:
        names = [n for n in names if not any(s in n for s in ignore_if_contains)]
    return names


def _peft_config(spec: LoraSpec, targets: list[str], conv_targets: list[str], conv_spec: LoraSpec | None):
    exact = {n: f"^{re.escape(n)}$" for n in conv_targets}
    common = dict(r=spec.rank, target_modules="|".join(re.escape(n) for n in [*targets, *conv_targets]),  # a str: full match
                  rank_pattern={exact[n]: conv_spec.rank for n in conv_targets} if conv_spec else {},
                  alpha_pattern={exact[n]: conv_spec.alpha for n in conv_targets} if conv_spec else {})
    if spec.kind in ("lora", "locon", "dora"):
        return LoraConfig(lora_alpha=spec.alpha, lora_dropout=spec.dropout or 0.0, use_dora=spec.kind == "dora",
                          init_lora_weights=True, **common)
    lycoris = dict(alpha=spec.alpha, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout, init_weights=True)
    if spec.kind == "loha":
        return LoHaConfig(**lycoris, **common)
    if spec.kind == "lokr":
        return LoKrConfig(decompose_factor=spec.factor, **lycoris, **common)
    raise ValueError(f"adapter type {spec.kind!r} is not supported (supported: {', '.join(KINDS)})")


def inject_lora(module: torch.nn.Module, targets: list[str], spec: LoraSpec, *, conv_targets: list[str] = (),
                conv_spec: LoraSpec | None = None, seed: int | None = None) -> list[torch.nn.Parameter]:
    """Add an adapter of `spec.kind` to each named Linear (and, with `conv_spec`, each named Conv2d at its own
    rank, as LoCon does); returns the new trainable parameters, kept in fp32 as trainers keep them."""
    if not targets and not conv_targets:
        raise ValueError("no layer matched the LoRA targets: check network.network_kwargs only_if_contains / ignore_if_contains")
    conv_targets = list(conv_targets) if conv_spec else []
    config = _peft_config(spec, list(targets), conv_targets, conv_spec)
    module.requires_grad_(False)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, warnings.catch_warnings():
        # peft warns that a LoRA on a torchao-quantized Linear cannot be merged into it; nothing here merges
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            # the caller runs the model under autocast, so the fp32 LoRA weights meet bf16/fp16
            # activations there; peft's own cast to fp32 would copy every activation once more
            layer.cast_input_dtype_enabled = False
    params = []
    for name, p in module.named_parameters():
        if p.requires_grad:  # only what peft just added: the module was frozen first
            p.data = p.data.float()
            params.append(p)
    return params


def _adapter_layers(module: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: layer for name, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and ADAPTER in getattr(layer, "scaling", {})}


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's names for every injected layer: `<module>.lora_A.weight` / `.lora_B.weight` (DoRA adds
    `.lora_magnitude_vector`), LoHa's `.hada_w1_a` ..., LoKr's `.lokr_w1` ...: the training state."""
    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def _lokr_unscaled(layer) -> bool:
    # LyCORIS and ComfyUI apply no alpha/rank to a LoKr whose two factors are both full matrices; peft does
    return isinstance(layer, LoKrLayer) and ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2


def lora_file_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lora_state in the conventions files use (kohya / LyCORIS / ComfyUI): DoRA magnitudes as `.dora_scale`
    shaped like the weight's rows; a LoKr with both factors full carries its alpha/rank inside `lokr_w2`."""
    state, layers = dict(lora_state(module)), _adapter_layers(module)
    for key in [k for k in state if k.endswith(MAGNITUDE)]:
        name = key[: -len(MAGNITUDE)]
        dims = layers[name].get_base_layer().weight.dim()
        state[name + DORA_SCALE] = state.pop(key).reshape(-1, *[1] * (dims - 1))  # peft: (out,), conv (1, out, 1, 1)
    for name, layer in layers.items():
        if _lokr_unscaled(layer):
            state[f"{name}.lokr_w2"] = state[f"{name}.lokr_w2"] * layer.scaling[ADAPTER]
    return state


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """peft-named adapter weights (lora_state's, e.g. from a training checkpoint) into the injected layers."""
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA file has {len(unexpected)} keys this model does not have, e.g. {unexpected[:3]}")


def load_lora_file_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of lora_file_state: a file's tensors into the injected layers. A LoRA whose file alpha/rank
    differs from the layer's scale (a file with alpha/rank folded into lora_B, or trained at another alpha) has
    its lora_B rescaled, so that the layer applies the update the file describes."""
    layers = _adapter_layers(module)
    alphas = {k[: -len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    for name, alpha in alphas.items():
        key, layer = f"{name}.lora_B.weight", layers.get(name)
        if key in state and isinstance(layer, LoraLayer):
            scale = alpha / state[f"{name}.lora_A.weight"].shape[0]
            if scale != layer.scaling[ADAPTER]:
                state[key] = (state[key].float() * (scale / layer.scaling[ADAPTER])).to(state[key].dtype)
    for key in [k for k in state if k.endswith(DORA_SCALE)]:
        t = state.pop(key)
        state[key[: -len(DORA_SCALE)] + MAGNITUDE] = t.reshape(1, -1, 1, 1) if t.dim() == 4 else t.reshape(-1)
    for name, layer in layers.items():
        if _lokr_unscaled(layer) and f"{name}.lokr_w2" in state:
            state[f"{name}.lokr_w2"] = state[f"{name}.lokr_w2"] / layer.scaling[ADAPTER]
    load_lora_state(module, state)


def lora_alphas(module: torch.nn.Module) -> dict[str, float]:
    """Module name -> alpha for every injected layer."""
    return {name: float((layer.lora_alpha if isinstance(layer, LoraLayer) else layer.alpha)[ADAPTER])
            for name, layer in _adapter_layers(module).items()}


@contextlib.contextmanager
def lora_scale(module: torch.nn.Module, multiplier: float):
    """Temporarily scale every adapter's contribution (sample.network_multiplier)."""
    layers = list(_adapter_layers(module).values())
    saved = [m.scaling[ADAPTER] for m in layers]
    for m in layers:
        m.scaling[ADAPTER] *= multiplier
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling[ADAPTER] = s
