"""`trainer lora inspect FILE`: what an adapter file is, read from its keys, shapes and metadata alone
(architecture, adapter type, rank/alpha, key layout, modules touched). Knows the key suffixes every
common trainer writes (kohya/LyCORIS, diffusers/peft, ComfyUI), not any one architecture's code."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# tensor-name suffix -> (adapter family, role); longest suffixes first so `.lora_A.default.weight` wins
_SUFFIXES = sorted({
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora_A.default.weight": ("lora", "down"), ".lora_B.default.weight": ("lora", "up"),
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"), ".lora_mid.weight": ("lora", "mid"),
    "_lora.down.weight": ("lora", "down"), "_lora.up.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"), ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1_a"), ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"), ".lokr_t2": ("lokr", "t2"),
    ".dora_scale": ("dora", "magnitude"), ".lora_magnitude_vector": ("dora", "magnitude"),
    ".diff": ("full", "diff"), ".diff_b": ("full", "diff_b"), ".alpha": ("", "alpha"),
}.items(), key=lambda kv: -len(kv[0]))

# module-name prefixes -> the layout that writes them
_LAYOUTS = (("lora_unet_", "kohya"), ("lora_te", "kohya"), ("lora_transformer_", "kohya (OneTrainer)"),
            ("lycoris_", "LyCORIS"), ("diffusion_model.", "ComfyUI"), ("transformer.", "diffusers"),
            ("unet.", "diffusers"), ("text_encoder", "diffusers"), ("base_model.model.", "peft"))

# (architecture, patterns that must all occur in some module name), first match wins
_ARCH_HINTS = (
    ("flux", ("single_transformer_blocks",)), ("flux", ("single_blocks", "double_blocks")),
    ("flux", ("single_blocks_", "double_blocks_")),
    ("hidream", ("double_stream_blocks",)), ("sd3", ("joint_blocks",)), ("sd3", ("context_pre_only",)),
    ("kolors", ("encoder_hid_proj",)),  # SDXL's UNet names plus the projection of ChatGLM's states
    ("sdxl", ("input_blocks", "lora_te2")), ("sdxl", ("down_blocks", "lora_te2")),
    ("sdxl", ("input_blocks_4_1_transformer_blocks",)), ("sdxl", ("down_blocks", "attentions")),
    ("wan21_vace", ("vace_blocks",)), ("wan21", ("blocks", "self_attn")), ("hunyuan_video", ("img_attn_qkv",)),
)


@dataclass
class Report:
    file: str
    keys: int
    modules: int
    adapter: str
    layout: str
    architecture: str
    ranks: dict[str, int] = field(default_factory=dict)  # rank -> module count
    alphas: dict[str, int] = field(default_factory=dict)  # alpha -> module count
    per_module: dict[str, dict] = field(default_factory=dict)  # filled when ranks or alphas vary
    groups: dict[str, int] = field(default_factory=dict)  # module group -> modules touched
    conv_modules: int = 0
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"file:          {self.file}",
                 f"architecture:  {self.architecture}",
                 f"adapter:       {self.adapter}" + (f" ({self.conv_modules} conv modules: LoCon)" if self.conv_modules else ""),
                 f"layout:        {self.layout}",
                 f"keys:          {self.keys} tensors over {self.modules} modules",
                 f"rank:          {_counts(self.ranks)}",
                 f"alpha:         {_counts(self.alphas) if self.alphas else 'none stored (loaders use scale 1.0)'}"]
        if self.per_module:  # one line per (rank, alpha) with examples; --json lists every module
            combos: dict[tuple, list[str]] = {}
            for m, v in sorted(self.per_module.items()):
                combos.setdefault((v["rank"], v["alpha"]), []).append(m)
            lines.append("rank / alpha by module:")
            lines += [f"  rank {r}, alpha {a}: {len(ms)} modules, e.g. {', '.join(ms[:3])}" for (r, a), ms in combos.items()]
        lines.append("modules touched:")
        lines += [f"  {g}: {n}" for g, n in sorted(self.groups.items())]
        if self.unknown_keys:
            lines.append(f"unrecognised keys ({len(self.unknown_keys)}): {', '.join(self.unknown_keys[:5])}")
        if self.metadata:
            lines.append("metadata:")
            lines += [f"  {k}: {_short(v)}" for k, v in sorted(self.metadata.items())]
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _counts(c: dict) -> str:
    return ", ".join(f"{k} ({n} modules)" for k, n in sorted(c.items(), key=lambda kv: -kv[1])) or "-"


def _short(v: str, n: int = 120) -> str:
    return v if len(v) <= n else v[:n] + f"... ({len(v)} chars)"


def split_key(key: str) -> tuple[str, str, str] | None:
    """'transformer.x.lora_A.weight' -> ('transformer.x', 'lora', 'down'); None for an unknown suffix."""
    for suffix, (family, role) in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], family, role
    return None


def inspect_file(path: str | Path) -> Report:
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"{path}: lora inspect reads .safetensors files")
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        alphas = {k: float(f.get_tensor(k).float().reshape(-1)[0]) for k in keys if k.endswith(".alpha")}
    modules: dict[str, dict] = {}
    unknown = []
    for key in keys:
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        module, family, role = parts
        entry = modules.setdefault(module, {"families": set(), "roles": {}})
        entry["families"].add(family)
        entry["roles"][role] = shapes[key]
    families = Counter()
    ranks, alpha_counts, per_module, conv = Counter(), Counter(), {}, 0
    for module, entry in modules.items():
        fam = entry["families"] - {""}
        kind = "dora" if "dora" in fam else ("lokr" if "lokr" in fam else "loha" if "loha" in fam else
                                               "full" if "full" in fam else "lora" if "lora" in fam else "?")
        families[kind] += 1
        roles = entry["roles"]
        rank = _rank(roles)
        if rank is not None:
            ranks[str(rank)] += 1
        alpha = alphas.get(f"{module}.alpha")
        if alpha is not None:
            alpha_counts[f"{alpha:g}"] += 1
        per_module[module] = {"rank": rank, "alpha": alpha}
        conv += any(len(s) == 4 for r, s in roles.items() if r in ("down", "up"))
    varied = len(ranks) > 1 or len(alpha_counts) > 1
    names = list(modules)
    return Report(file=str(path), keys=len(keys), modules=len(modules),
                  adapter=" + ".join(f"{k} ({n})" if len(families) > 1 else k for k, n in families.most_common()) or "none",
                  layout=_layout(names), architecture=_architecture(names, metadata), ranks=dict(ranks),
                  alphas=dict(alpha_counts), per_module=per_module if varied else {}, groups=_groups(names),
                  conv_modules=conv, unknown_keys=unknown, metadata=metadata)


def _rank(roles: dict[str, tuple]) -> int | None:
    for role in ("down", "w1_b", "w2_b"):  # LoRA down rows; LoHa/LoKr factors' inner width
        if role in roles:
            return roles[role][0]
    if "w1_a" in roles:
        return roles["w1_a"][1]
    return None


def _layout(names: list[str]) -> str:
    found = Counter()
    for name in names:
        found[next((layout for prefix, layout in _LAYOUTS if name.startswith(prefix)), "bare module names")] += 1
    return " + ".join(f"{k} ({n})" if len(found) > 1 else k for k, n in found.most_common()) or "-"


def _architecture(names: list[str], metadata: dict[str, str]) -> str:
    for key in ("eri_arch", "modelspec.architecture", "ss_base_model_version"):
        if metadata.get(key):
            return f"{metadata[key]} (from metadata {key})"
    text = "\n".join(names)
    for arch, patterns in _ARCH_HINTS:
        if all(p in text for p in patterns):
            return f"{arch} (from module names)"
    return "unknown"


def _groups(names: list[str]) -> dict[str, int]:
    """Modules per group: the name up to its first block index, indices folded ('transformer_blocks.*')."""
    groups = Counter()
    for name in names:
        m = re.match(r"(.*?[._]\d+)[._]", name)
        head = re.sub(r"\d+$", "*", m.group(1)) if m else name.rsplit(".", 1)[0] if "." in name else name
        groups[head] += 1
    return dict(groups)
