"""LoRA on any torch module through peft: choose targets, inject, read and write the weights.
Architecture-agnostic: key layouts on disk are the architecture's business (`lora_to_file`)."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    dora: bool = False  # weight-decomposed LoRA (DoRA): a trained magnitude per output row on top


# peft keeps DoRA's magnitude as `<module>.lora_magnitude_vector` of shape (out,); kohya, LyCORIS and ComfyUI's
# loader read `<module>.dora_scale` of shape (out, 1) (conv: (out, 1, 1, 1)) and ignore peft's name
MAGNITUDE, DORA_SCALE = ".lora_magnitude_vector", ".dora_scale"


def to_dora_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft state -> the same with each DoRA magnitude as `.dora_scale` shaped like its weight's rows."""
    out = {}
    for key, t in state.items():
        if key.endswith(MAGNITUDE):
            module = key[: -len(MAGNITUDE)]
            dims = state[f"{module}.lora_B.weight"].dim()
            out[module + DORA_SCALE] = t.reshape(-1, *[1] * (dims - 1))  # peft: (out,) Linear, (1, out, 1, 1) conv
        else:
            out[key] = t
    return out


def from_dora_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_dora_scale (a file's `.dora_scale` back to peft's magnitude vector)."""
    def peft_shape(t):
        return t.reshape(1, -1, 1, 1) if t.dim() == 4 else t.reshape(-1)

    return {(k[: -len(DORA_SCALE)] + MAGNITUDE if k.endswith(DORA_SCALE) else k): (peft_shape(t) if k.endswith(DORA_SCALE) else t)
            for k, t in state.items()}


def filter_names(names: list[str], *, only_if_contains: list[str] | None, ignore_if_contains: list[str] | None) -> list[str]:
    """Filter module names as ai-toolkit's network_kwargs do (ignore wins over only)."""
    if only_if_contains:
        names = [n for n in names if any(s in n for s in only_if_contains)]
    if ignore_if_contains:
        names = [n for n in names if not any(s in n for s in ignore_if_contains)]
    return names


def inject_lora(module: torch.nn.Module, targets: list[str], spec: LoraSpec, *, conv_targets: list[str] = (),
                conv_spec: LoraSpec | None = None, seed: int | None = None) -> list[torch.nn.Parameter]:
    """Add a LoRA to each named Linear (and, with `conv_spec`, each named Conv2d at its own rank, as LoCon
    does); returns the new trainable parameters, kept in fp32 as trainers keep them."""
    if not targets and not conv_targets:
        raise ValueError("no layer matched the LoRA targets: check network.network_kwargs only_if_contains / ignore_if_contains")
    conv_targets = list(conv_targets) if conv_spec else []
    exact = {n: f"^{re.escape(n)}$" for n in conv_targets}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout or 0.0, use_dora=spec.dora,
                        target_modules="|".join(re.escape(n) for n in [*targets, *conv_targets]),  # a str: full match
                        rank_pattern={exact[n]: conv_spec.rank for n in conv_targets} if conv_spec else {},
                        alpha_pattern={exact[n]: conv_spec.alpha for n in conv_targets} if conv_spec else {},
                        init_lora_weights=True)
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
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `<module>.lora_B.weight` (and DoRA's `<module>.lora_magnitude_vector`) for every
    injected layer."""
    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """peft-named LoRA weights (a file's `.dora_scale` accepted too) into the injected layers."""
    result = set_peft_model_state_dict(module, from_dora_scale(state), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA file has {len(unexpected)} keys this model does not have, e.g. {unexpected[:3]}")


def lora_alphas(module: torch.nn.Module) -> dict[str, float]:
    """Module name -> alpha for every injected layer."""
    return {name: layer.lora_alpha[ADAPTER] for name, layer in module.named_modules()
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A}


@contextlib.contextmanager
def lora_scale(module: torch.nn.Module, multiplier: float):
    """Temporarily scale every LoRA's contribution (sample.network_multiplier)."""
    layers = [m for m in module.modules() if isinstance(m, LoraLayer) and ADAPTER in m.scaling]
    saved = [m.scaling[ADAPTER] for m in layers]
    for m in layers:
        m.scaling[ADAPTER] *= multiplier
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling[ADAPTER] = s
