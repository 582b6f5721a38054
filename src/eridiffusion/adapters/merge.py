"""Merge adapter files into a model's own weights (`trainer lora merge`), for LoRA, DoRA, LoHa and LoKr.

The update formulas are LyCORIS's (and ComfyUI's): a few lines each, written here because peft merges only
into layers it has injected with a config per layer, which a downloaded file does not carry.
"""
from __future__ import annotations

import torch

_SUFFIXES = ("lora_A.weight", "lora_B.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
             "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


_KOHYA = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def adapter_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {tensor role: tensor} of an adapter state (peft's or kohya's LoRA names alike, DoRA, LoHa,
    LoKr); an unknown tensor name is an error naming it."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        suffix = next((s for s in sorted([*_SUFFIXES, *_KOHYA], key=len, reverse=True) if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{key}: not a LoRA, DoRA, LoHa or LoKr tensor (Tucker/OFT/GLoRA files are not supported)")
        modules.setdefault(key[: -len(suffix) - 1], {})[_KOHYA.get(suffix, suffix)] = t
    return modules


def update(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """One module's weight update ΔW (flattened to [out, in·k·k]), alpha/rank applied as LyCORIS applies it."""
    t = {k: v.float() for k, v in t.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_A.weight" in t:
        down, up = t["lora_A.weight"].flatten(1), t["lora_B.weight"].flatten(1)
        return (alpha / down.shape[0] if alpha is not None else 1.0) * (up @ down)
    if "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    dim, w1, w2 = None, t.get("lokr_w1"), t.get("lokr_w2")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0  # two full factors: no alpha
    return scale * torch.kron(w1, w2.flatten(1))


@torch.no_grad()
def merge_into(model: torch.nn.Module | dict, state: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """Add each module's update × strength to the weights of `model` (a module, or a state dict with
    `<module>.weight` keys) (DoRA: the adapted rows rescaled to their magnitude, then blended by strength, as
    LyCORIS does). `state` uses the model's module names. Returns how many layers changed; a module the model
    lacks or a shape that does not fit is an error naming it."""
    modules = adapter_modules(state)
    for name, t in sorted(modules.items()):
        try:
            weight = model[f"{name}.weight"] if isinstance(model, dict) else model.get_submodule(name).weight
        except (AttributeError, KeyError):
            raise ValueError(f"the adapter names '{name}', which this model does not have") from None
        delta = update(t)
        if delta.numel() != weight.numel():
            raise ValueError(f"{name}: the adapter's update has {tuple(delta.shape)} values for a weight of shape "
                             f"{tuple(weight.shape)}")
        w = weight.float()
        new = w + delta.reshape(w.shape)
        if "dora_scale" in t:
            norm = new.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
            new = new * t["dora_scale"].float().reshape(-1, *[1] * (w.dim() - 1)) / norm
        weight.copy_((w + strength * (new - w)).to(weight.dtype))
    return len(modules)


def fold_alphas(state: dict[str, torch.Tensor], with_dora: bool = False) -> dict[str, torch.Tensor]:
    """An adapter state with each plain LoRA's (and with `with_dora`, each DoRA's) alpha/rank folded into its lora_B
    and its `.alpha` dropped: the same update for loaders that read no alpha (scale 1.0: diffusers, and ComfyUI for
    a file without `.alpha`). LoHa and LoKr modules keep their tensors and alpha."""
    out = dict(state)
    for name, t in adapter_modules(state).items():
        if set(t) - {"dora_scale"} == {"lora_A.weight", "lora_B.weight", "alpha"} and (with_dora or "dora_scale" not in t):
            scale = float(t["alpha"]) / t["lora_A.weight"].shape[0]
            up = t["lora_B.weight"]
            out[f"{name}.lora_B.weight"] = up if scale == 1.0 else (up.float() * scale).to(up.dtype)
            del out[f"{name}.alpha"]
    return out


def rank_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter state with `.alpha` = rank (scale 1, as loaders read a LoRA without alpha) for every LoRA module
    that has none, so that code reading alphas sees the file's real scale."""
    out = dict(state)
    for name, t in adapter_modules(state).items():
        if "lora_A.weight" in t and "alpha" not in t:
            out[f"{name}.alpha"] = torch.tensor(float(t["lora_A.weight"].shape[0]))
    return out
