"""kohya / LoCon LoRA keys <-> our peft LoRA state, for any module tree.

kohya names a LoRA `<prefix>_<module path with . -> _>` with tensors `.lora_down.weight` (= peft
lora_A), `.lora_up.weight` (= lora_B) and a scalar `.alpha`; loaders scale by alpha / rank. A conv
LoRA keeps peft's 4-D layout (down `(r, in, kh, kw)`, up `(out, r, 1, 1)`), which is LoCon's.
The prefix (`lora_unet`, `lora_te1`, ...) is the caller's: this file knows no architecture. A
wrapper path that the standard names have but the in-memory model lacks belongs in the prefix
(transformers 5's CLIPTextModel has no `text_model.`, kohya's CLIP-L names do: `lora_te1_text_model`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                  # DoRA, LoHa and LoKr tensors keep LyCORIS's names, which peft took over
                  **{n: n for n in ("dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
_KOHYA_TO_PEFT = {v: k for k, v in _PEFT_TO_KOHYA.items()}


def to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, float], prefix: str) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `.lora_B.weight` + alphas per module -> kohya keys under `prefix`."""
    modules = _complete_modules(state, prefix)
    missing = sorted(modules - alphas.keys())
    if missing:  # without .alpha every loader uses scale 1.0, i.e. the wrong strength unless alpha == rank
        raise ValueError(f"no alpha for {len(missing)} LoRA modules, e.g. {missing[:3]}")
    out = {}
    for key, tensor in state.items():
        module, suffix = _split_peft(key)
        out[f"{_kohya_name(prefix, module)}.{_PEFT_TO_KOHYA[suffix]}"] = tensor
    for module in modules:  # kohya saves alpha in the weights' dtype
        dtype = next(v.dtype for k, v in state.items() if k.startswith(module + "."))
        out[f"{_kohya_name(prefix, module)}.alpha"] = torch.tensor(float(alphas[module]), dtype=dtype)
    return out


def from_kohya(tensors: dict[str, torch.Tensor], module_names: Iterable[str],
               prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya keys under `prefix` -> (peft state, module -> alpha); keys of other prefixes are ignored.

    `module_names` are the model's module paths (`named_modules()`); they resolve which `_` in a
    kohya name was a `.`. A module without `.alpha` gets alpha = rank (scale 1), as kohya and
    ComfyUI read such files.
    """
    lookup: dict[str, str] = {}
    clashes: set[str] = set()  # flat names two modules share (`a_b.c` and `a.b_c`)
    for name in module_names:
        flat = name.replace(".", "_")
        if lookup.setdefault(flat, name) != name:
            clashes.add(flat)
    head = prefix + "_"
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown: set[str] = set()
    for key, tensor in tensors.items():
        if not key.startswith(head):
            continue
        flat, _, suffix = key[len(head):].partition(".")
        if suffix not in _KOHYA_TO_PEFT and suffix != "alpha":
            raise ValueError(f"{key}: not a LoRA, DoRA, LoHa or LoKr tensor name this reads "
                             f"({', '.join(sorted(_KOHYA_TO_PEFT))}, alpha)")
        if flat not in lookup:
            unknown.add(head + flat)
            continue
        if flat in clashes:
            raise ValueError(f"{key}: more than one module of the model is named {flat!r} once '.' becomes '_'")
        module = lookup[flat]
        if suffix == "alpha":
            alphas[module] = float(tensor.item())
        else:
            state[f"{module}.{_KOHYA_TO_PEFT[suffix]}"] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} {prefix} LoRA modules are not in this model, e.g. {sorted(unknown)[:3]}")
    orphans = sorted(alphas.keys() - _complete_modules(state, prefix))
    if orphans:
        raise ValueError(f"{_kohya_name(prefix, orphans[0])}: has an .alpha but no .lora_down / .lora_up weights")
    for module in _complete_modules(state, prefix):  # no alpha: loaders use scale 1, i.e. alpha = rank
        rank = next((state[f"{module}.{k}"].shape[0] for k in ("lora_A.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b")
                     if f"{module}.{k}" in state), None)
        if rank is not None:
            alphas.setdefault(module, float(rank))
    return state, alphas


def _kohya_name(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


# what one module of each adapter type must have: alternatives of required tensor sets
_COMPLETE = ((("lora_A.weight", "lora_B.weight"),),
             (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
             (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")))
_LOKR_W2 = (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))


def _complete_modules(state: dict[str, torch.Tensor], prefix: str) -> set[str]:
    modules = {_split_peft(k)[0] for k in state}  # a .dora_scale without its LoRA weights fails below
    for module in sorted(modules):
        has = lambda names: all(f"{module}.{n}" in state for n in names)
        lokr = any(has(n) for n in _COMPLETE[2]) and any(has(n) for n in _LOKR_W2)
        if not (has(_COMPLETE[0][0]) or has(_COMPLETE[1][0]) or lokr):
            if any(k.startswith(f"{module}.lora_") for k in state):
                raise ValueError(f"{_kohya_name(prefix, module)}: needs both lora_down (lora_A) and lora_up (lora_B)")
            raise ValueError(f"{_kohya_name(prefix, module)}: an incomplete LoHa/LoKr/DoRA module (tensors: "
                             f"{sorted(k.rsplit('.', 1)[-1] for k in state if k.startswith(module + '.'))})")
    return modules


def _split_peft(key: str) -> tuple[str, str]:
    for suffix in sorted(_PEFT_TO_KOHYA, key=len, reverse=True):  # lokr_w1_a before lokr_w1
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"{key}: not a peft adapter weight (<module>.lora_A.weight / .lora_B.weight / .dora_scale / "
                     ".hada_* / .lokr_*)")
