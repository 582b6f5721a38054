"""LoRAs on the parts of a fused weight (q, k and v of one qkv Linear): one LoRA on the fused weight, and back.

A LoRA on each part is exactly one LoRA on the fused weight whose A is the parts' A stacked and whose B is their B
block-diagonal, each part's alpha/rank folded into its block (the fused alpha equals its rank: scale 1). Splitting
by rows of B goes back with the shared A. LoHa/LoKr factors do not stack this way: only LoRA and DoRA fuse.
Architecture-agnostic: the caller names the parts and their heights.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

LORA_PARTS = {"lora_A.weight", "lora_B.weight", "alpha", "dora_scale"}


def require_lora(m: Mapping[str, torch.Tensor], name: str) -> None:
    extra = set(m) - LORA_PARTS
    if extra:
        raise ValueError(f"{name}.{sorted(extra)[0]}: only LoRA and DoRA fuse into one weight (LoHa/LoKr factors do not)")


def fuse_lora(members: Sequence[Mapping[str, torch.Tensor] | None], rows: Sequence[int], name: str) -> dict[str, torch.Tensor]:
    """Each part's LoRA tensors by role (or None for a part without a LoRA) -> the fused weight's, `rows` the parts'
    heights in order. DoRA must cover every part or none."""
    present = [m for m in members if m is not None]
    for m in present:
        require_lora(m, name)
    downs = [m["lora_A.weight"] for m in present]
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(rows), rank, dtype=torch.float32)
    row = col = 0
    for m, height in zip(members, rows):
        if m is not None:
            r = m["lora_A.weight"].shape[0]
            scale = float(m["alpha"]) / r if "alpha" in m else 1.0
            up[row:row + height, col:col + r] = m["lora_B.weight"].float() * scale
            col += r
        row += height
    out = {"lora_A.weight": torch.cat(downs), "lora_B.weight": up.to(downs[0].dtype),
           "alpha": torch.tensor(float(rank), dtype=downs[0].dtype)}
    scales = [None if m is None else m.get("dora_scale") for m in members]
    if any(s is not None for s in scales):
        if any(s is None for s in scales):
            raise ValueError(f"{name}: DoRA on only some of its fused parts cannot be written as one weight (its "
                             "magnitudes would need the base weights); keep a layout with the parts' own names")
        out["dora_scale"] = torch.cat(scales)
    return out


def split_lora(m: Mapping[str, torch.Tensor], rows: Sequence[int], name: str = "") -> list[dict[str, torch.Tensor] | None]:
    """Inverse of fuse_lora: per part, its rows of B with the shared A (and alpha); None for a part the fused LoRA
    leaves at zero (and has no DoRA magnitude for)."""
    require_lora(m, name)
    ups = m["lora_B.weight"].split(list(rows))
    scales = m["dora_scale"].split(list(rows)) if "dora_scale" in m else [None] * len(rows)
    out = []
    for up, scale in zip(ups, scales):
        if not up.any() and scale is None:
            out.append(None)
            continue
        part = {"lora_A.weight": m["lora_A.weight"], "lora_B.weight": up.contiguous()}
        if "alpha" in m:
            part["alpha"] = m["alpha"]
        if scale is not None:
            part["dora_scale"] = scale.contiguous()
        out.append(part)
    return out
