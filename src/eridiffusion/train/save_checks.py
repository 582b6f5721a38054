"""What every save checks of the adapter file it writes: users' top complaint about trainers is a LoRA that
trains but is NaN, all zero, or does nothing. NaN/inf stops the save before anything is written (the previous
checkpoint stays); a file that reads back differently, keys that fit no module, and adapters that change
nothing are loud warnings naming the modules."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..adapters.merge import adapter_modules
from ..quant import dequantized

log = logging.getLogger(__name__)
ADAPTER = "default"
NOTHING = 1e-7  # a relative output change below this is no change at all


def require_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise FloatingPointError(f"the adapter has NaN/inf weights at step {step} in {len(bad)} tensors, e.g. {bad[:3]}; "
                                 "nothing was saved and the previous checkpoint is kept. Lower train.lr or train in bf16/fp32")


def check_written(path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The file read back from disk equals what was meant to be written."""
    from safetensors.torch import load_file

    back = load_file(path)
    problems = [f"{k}: missing in the file" for k in tensors if k not in back]
    problems += [f"{k}: differs after reading back" for k, v in tensors.items()
                 if k in back and not torch.equal(back[k], v.detach().cpu().contiguous())]
    return problems


def check_modules(states: dict[str, dict[str, torch.Tensor]], modules: dict[str, torch.nn.Module]) -> list[str]:
    """Every module a file's keys name (as the architecture reads its own layout back) exists in the model."""
    problems = []
    for component, state in states.items():
        names = {n for n, _ in modules[component].named_modules()} if component in modules else set()
        wanted = set(adapter_modules(state))
        problems += [f"{component}: no module {m!r} for the file's keys" for m in sorted(wanted - names)]
    return problems


@torch.no_grad()
def output_changes(module: torch.nn.Module, probe_rows: int = 4) -> dict[str, float]:
    """Per adapted layer: ‖ΔW·x‖ / ‖W·x‖ on a fixed random probe x, i.e. how much the adapter moves that
    layer's output (peft's get_delta_weight for every adapter type)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    g = torch.Generator().manual_seed(0)
    changes = {}
    for name, layer in module.named_modules():
        if not (isinstance(layer, BaseTunerLayer) and hasattr(layer, "get_delta_weight") and ADAPTER in layer.scaling):
            continue
        weight = dequantized(layer.get_base_layer().weight)
        delta = layer.get_delta_weight(ADAPTER).float().flatten(1)
        base = weight.detach().float().flatten(1).to(delta.device)
        x = torch.randn(base.shape[1], probe_rows, generator=g).to(delta.device)
        changes[name] = float((delta @ x).norm() / (base @ x).norm().clamp_min(1e-12))
    return changes


def report(path: Path, problems: list[str], changes: dict[str, dict[str, float]], step: int) -> None:
    if problems:
        log.warning(f"{path.name}: {len(problems)} problems in the saved file: {'; '.join(problems[:5])}")
    if step == 0:
        return  # nothing has trained yet: a zero adapter is expected
    for component, per_layer in changes.items():
        idle = sorted(n for n, c in per_layer.items() if c < NOTHING)
        if per_layer and len(idle) == len(per_layer):
            log.warning(f"{path.name}: the {component} adapter changes nothing measurable after {step} steps (every layer "
                        f"below {NOTHING:g} relative output change): check train.lr and the targets")
        elif idle:
            log.warning(f"{path.name}: {len(idle)} of {len(per_layer)} {component} adapter layers change nothing after {step} "
                        f"steps, e.g. {idle[:3]}")
