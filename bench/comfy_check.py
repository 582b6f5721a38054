"""Do our saved LoRA-family files apply completely in ComfyUI? Runs ComfyUI's own loader on them.

For each architecture (flux, sdxl, kolors, sd3, chroma, hidream, wan21, wan21_i2v, wan21_vace) and adapter type (lora, dora, locon, loha, lokr, lokr_factored) this
trains a tiny run on CPU with our trainer, then applies the saved .safetensors the way ComfyUI's LoraLoader node
does, with ComfyUI's unmodified code: `comfy.sd.load_lora_for_models` (model_lora_keys_unet -> convert_lora ->
load_lora -> ModelPatcher.add_patches) and `ModelPatcher.patch_model` (comfy.lora.calculate_weight and the
weight_adapter classes). Its three silent failures are counted from its own log lines: file keys it does not
read ("lora key not loaded"), targets the model lacks ("NOT LOADED"), and shape errors at patch time
("ERROR lora"). The patched weights are then compared with the trainer's: the peft model of the run's last
step, merged by peft, converted to the original layout ComfyUI's models use (Flux: BFL names with fused qkv;
SD3: SAI MMDiT names with fused qkv; Chroma: lodestones' BFL-style names; HiDream: diffusers' own names, which
ComfyUI's HiDream uses; Wan 2.1: the Wan repo's names; SDXL / Kolors UNet: SGM `input_blocks...` names) by our
full-checkpoint converters.
With --layout the file is first converted as `trainer lora convert --to LAYOUT` converts it.

    max rel err = max over weights of |W_comfy - W_trainer| / |W_trainer - W_base|

A DoRA file cannot match exactly: ComfyUI's weight_decompose divides by the row norms of the *base* weight,
peft / LyCORIS by those of the adapted weight. For DoRA the table's last column also gives the error against
that base-norm formula computed from the trainer's own tensors, which should be ~0.

The model ComfyUI patches here: for Flux ComfyUI's real `comfy.model_base.Flux` built at the tiny model's
size (its detect_unet_config hard-codes full-size Flux widths, which are replaced by the tiny ones); for SD3
ComfyUI's `comfy.model_base.SD3` detected from the weights, on a tiny model of SAI's widths (64-wide heads, as many
as blocks, which ComfyUI's SD3 LoRA map assumes); for Chroma and HiDream ComfyUI's real `model_base.Chroma` /
`model_base.HiDream`, the class ComfyUI detects from the weights, built at the tiny model's widths (its detection
hard-codes the released ones); for Wan 2.1 T2V / I2V / VACE the same with `supported_models.WAN21_T2V` / `WAN21_I2V` /
`WAN21_Vace` (`model_base.WAN21`, its image-to-video form, `model_base.WAN21_Vace`; heads, frequency and text widths
from the tiny config; the tiny I2V's CLIP is 1280 wide, the width ComfyUI's image embedder is built with); for the
UNets a stand-in `comfy.model_base.SDXL` instance (ComfyUI's UNetModel hard-codes GroupNorm(32), which our
8-channel tiny UNet cannot build) whose `diffusion_model` holds exactly our SGM state dict, with ComfyUI's
`supported_models.SDXL` config from ComfyUI's `detect_unet_config`; its key set is checked against a real
ComfyUI UNetModel built on the meta device at 4x the width.

Not a CI test (CI has no ComfyUI). Needs a ComfyUI checkout; torchvision is stubbed if missing (only
comfy.model_base's imports want it). On CPU, about a minute per run:

    PYTHONPATH=src python bench/comfy_check.py --comfy /path/to/ComfyUI [--archs flux,sdxl] [--types lora,dora]
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml

# our side first: diffusers decides at import time whether torchvision exists, and must not see the stub below
import diffusers.loaders  # noqa: F401
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import load_lora_state
from eridiffusion.archs import get_arch_class
from eridiffusion.archs.chroma.formats import diffusers_to_bfl as chroma_to_bfl
from eridiffusion.archs.flux.formats import diffusers_to_bfl
from eridiffusion.archs.sd3.formats import diffusers_to_sai
from eridiffusion.archs.sdxl.formats import diffusers_to_sgm
from eridiffusion.archs.wan21.formats import diffusers_to_original as wan_to_original
from eridiffusion.config import parse_config
from eridiffusion.demo import DEMO_DATA_DIR
from eridiffusion.train.checkpoint import latest_state, load_state
from eridiffusion.train.loop import Run

VARIANTS = {"lora": {"type": "lora"}, "dora": {"type": "dora"}, "locon": {"type": "locon"}, "loha": {"type": "loha"},
            "lokr": {"type": "lokr"},
            "lokr_factored": {"type": "lokr", "lokr_full_rank": False, "linear": 2, "linear_alpha": 4, "lokr_factor": 4}}
ARCHS = ("flux", "sdxl", "kolors", "sd3", "chroma", "hidream", "wan21", "wan21_i2v", "wan21_vace")
TINY = {"sd3": {"attention_head_dim": 64, "num_attention_heads": 2},  # SAI's widths: 64 x depth
        "chroma": {"num_layers": 2, "num_single_layers": 2},  # more than one block of each kind in the key map
        "wan21_i2v": {"image_dim": 1280}}  # ComfyUI's Wan image embedder takes 1280 (ViT-H/14) whatever the weights say
# ComfyUI's supported model for each Wan arch (detected from the weights: head.modulation, img_emb, vace_blocks)
WAN = {"wan21": "WAN21_T2V", "wan21_i2v": "WAN21_I2V", "wan21_vace": "WAN21_Vace"}
SGM_UNET = "model.diffusion_model."


# ---- ComfyUI --------------------------------------------------------------------------------------
def import_comfy(path: Path):
    """ComfyUI's modules from a checkout, on CPU; torchvision stubbed only while they import, if it is missing."""
    sys.path.insert(0, str(path))
    stubbed = []
    try:
        import torchvision  # noqa: F401
    except ImportError:
        class Dummy:
            def __init__(self, *a, **k): pass
            def __call__(self, *a, **k): return Dummy()
            def __getattr__(self, n): return Dummy()

        class Stub(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return Dummy()

        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, p, target=None):
                return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] == "torchvision" else None
            def create_module(self, spec):
                m = Stub(spec.name)
                m.__path__ = []
                stubbed.append(spec.name)
                return m
            def exec_module(self, module): pass

        finder = Finder()
        sys.meta_path.append(finder)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before model_management reads it: our weights are on the CPU
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    if stubbed:
        sys.meta_path.remove(finder)
        for name in stubbed:
            sys.modules.pop(name, None)
    return comfy


def comfy_commit(path: Path) -> str:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        commit = path / "COMMIT"
        return commit.read_text().strip() if commit.exists() else "unknown"


def module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state_dict() is `state` (parameters at the dotted names)."""
    root = torch.nn.Module()
    for key, t in state.items():
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def comfy_model(comfy, arch: str, sd: dict[str, torch.Tensor], folder: Path):
    """A ComfyUI BaseModel holding `sd` (original layout, no prefix) as its diffusion_model."""
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if arch == "flux":
        c = json.loads((folder / "transformer" / "config.json").read_text())
        unet_config.update(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                           context_in_dim=c["joint_attention_dim"], vec_in_dim=c["pooled_projection_dim"],
                           axes_dim=c["axes_dims_rope"], out_channels=sd["final_layer.linear.weight"].shape[0] // 4)
        config = comfy.supported_models.Flux(unet_config)
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(sd, "")
        model.diffusion_model.load_state_dict(sd, strict=True)  # every name and shape is ComfyUI's own
        return model
    if arch == "chroma":  # detected as Chroma (distilled_guidance_layer.norms.0.scale), at full-size widths: tiny ones
        c = json.loads((folder / "transformer" / "config.json").read_text())
        hidden = c["num_attention_heads"] * c["attention_head_dim"]
        unet_config.update(hidden_size=hidden, num_heads=c["num_attention_heads"], context_in_dim=c["joint_attention_dim"],
                           axes_dim=c["axes_dims_rope"], in_channels=c["in_channels"], out_channels=c["in_channels"],
                           in_dim=c["approximator_num_channels"], hidden_dim=c["approximator_hidden_dim"],
                           out_dim=hidden, n_layers=c["approximator_layers"])
        return _detected_model(comfy, "Chroma", unet_config, sd)
    if arch == "hidream":  # detected as HiDream (caption_projection.0.linear.weight), at full-size widths: tiny ones
        c = json.loads((folder / "transformer" / "config.json").read_text())
        unet_config.update({k: c[k] for k in ("attention_head_dim", "num_attention_heads", "axes_dims_rope",
                                              "caption_channels", "max_resolution", "in_channels", "out_channels",
                                              "llama_layers", "num_routed_experts", "num_activated_experts",
                                              "num_layers", "num_single_layers", "patch_size", "text_emb_dim")})
        return _detected_model(comfy, "HiDream", unet_config, sd)
    if arch in WAN:  # detected as wan2.1 t2v / i2v / vace, at released widths ComfyUI hard-codes: the tiny ones
        c = json.loads((folder / "transformer" / "config.json").read_text())
        unet_config.update(num_heads=c["num_attention_heads"], freq_dim=c["freq_dim"], text_dim=c["text_dim"], eps=c["eps"])
        return _detected_model(comfy, WAN[arch], unet_config, sd)
    if arch == "sd3":
        config = comfy.supported_models.SD3(unet_config)
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(sd, "")
        model.diffusion_model.load_state_dict(sd, strict=True)
        return model
    config = comfy.supported_models.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    extra = {k for k in sd if k.startswith("encoder_hid_proj.")}  # Kolors: not in ComfyUI core's UNet
    # the stand-in's names must be those of ComfyUI's UNetModel: build that one at 4x the width on the meta device
    wide = dict(config.unet_config, model_channels=config.unet_config["model_channels"] * 4, num_head_channels=8,
                dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    real = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(**wide)
    if set(real.state_dict()) != set(sd) - extra:
        raise RuntimeError(f"SGM names differ from ComfyUI's UNetModel: {sorted(set(real.state_dict()) ^ (set(sd) - extra))[:6]}")
    model = object.__new__(comfy.model_base.SDXL)
    torch.nn.Module.__init__(model)
    model.model_config, model.device = config, torch.device("cpu")
    model.diffusion_model = module_tree({k: v for k, v in sd.items() if k not in extra})
    return model


def _detected_model(comfy, name: str, unet_config: dict, sd: dict[str, torch.Tensor]):
    """ComfyUI's supported model `name` (checked to be the one it detects from the weights) holding `sd`."""
    config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if type(config).__name__ != name:
        raise RuntimeError(f"ComfyUI detects {type(config).__name__} ({unet_config.get('image_model')}), not {name}, "
                           "from these weights")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.diffusion_model.load_state_dict(sd, strict=True)  # every name and shape is ComfyUI's own
    return model


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def apply_in_comfy(comfy, model, lora: dict[str, torch.Tensor]):
    """The LoraLoaderModelOnly node's steps at strength 1, then the weights ComfyUI samples with."""
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    log = Captured()
    logging.getLogger().addHandler(log)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        patched.patch_model(device_to=cpu)
        weights = {k[len("diffusion_model."):]: v.detach().clone() for k, v in model.state_dict().items()}
        patched.unpatch_model(cpu)
    finally:
        logging.getLogger().removeHandler(log)
    targets = {k[len("diffusion_model."):] for k in patched.patches}
    return weights, targets, log.lines


# ---- our side -------------------------------------------------------------------------------------
def train(arch: str, variant: str, model_dir: Path, work: Path, steps: int, all_layers: bool) -> tuple[dict, Path]:
    network = {"linear": 4, "linear_alpha": 8, **VARIANTS[variant], "transformer_only": not all_layers}
    if variant != "locon":  # conv layers too where the architecture has them (LoCon sets its own)
        network.update(conv=2, conv_alpha=1)
    data = work / "data"
    if not data.exists():
        shutil.copytree(DEMO_DATA_DIR, data)
    out = work / f"{arch}-{variant}"
    shutil.rmtree(out, ignore_errors=True)  # a run folder with a checkpoint would resume, not train
    dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "cache_latents_to_disk": True}
    if getattr(get_arch_class(arch), "takes_control", False):  # VACE: each image is its own control (same stem)
        dataset["control_path"] = str(data)
    proc = {"type": "sd_trainer", "training_folder": str(out), "device": "cpu", "trigger_word": "shp3s", "training_seed": 7,
            "network": network, "save": {"dtype": "float32", "save_every": steps, "max_step_saves_to_keep": 1},
            "datasets": [dataset],
            "train": {"batch_size": 4, "steps": steps, "lr": 1e-2, "optimizer": "adamw", "dtype": "fp32",
                      "cache_text_embeddings": True},
            "model": {"name_or_path": str(model_dir), "arch": arch}, "sample": None}
    cfg = {"job": "extension", "config": {"name": "check", "process": [proc]}, "meta": {"name": "[name]"}}
    path = work / f"{arch}-{variant}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if cli.main([str(path)]) != 0:
        raise RuntimeError(f"training {arch} {variant} failed")
    return cfg, out / "check"


def trainer_weights(cfg: dict, run_dir: Path) -> tuple[dict, dict, dict]:
    """(base, merged) denoiser weights in diffusers names from the run's last-step peft model, and its peft state."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    run = Run(parse_config(cfg).config.process[0], {})
    state = load_state(latest_state(run_dir))["lora"]
    component = next(iter(run.components))  # the denoiser's
    module = run.components[component].module
    load_lora_state(module, state[component])

    def plain():
        return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
                if not any(s in k for s in (".lora_", ".hada_", ".lokr_"))}

    base = plain()
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge(safe_merge=True)
    return base, plain(), state[component]


def original_layout(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if arch == "flux":
        return diffusers_to_bfl(state)
    if arch == "sd3":
        return diffusers_to_sai(state)
    if arch == "chroma":
        return chroma_to_bfl(state)
    if arch == "hidream":  # ComfyUI's HiDream names are diffusers'
        return dict(state)
    if arch in WAN:
        return wan_to_original(state)
    unet = dict(state)
    extra = {k: unet.pop(k) for k in list(unet) if k.startswith("encoder_hid_proj.")}
    return {**{k[len(SGM_UNET):]: v for k, v in diffusers_to_sgm({"unet": unet}).items()}, **extra}


class Refused(Exception):
    pass


def check(comfy, arch: str, variant: str, model_dir: Path, work: Path, steps: int, all_layers: bool,
          layout: str | None = None) -> dict:
    cfg, run_dir = train(arch, variant, model_dir, work, steps, all_layers)
    lora = load_file(run_dir / "check.safetensors")
    if layout:  # the file as `trainer lora convert --to <layout>` writes it
        try:
            lora = get_arch_class(arch).lora_to_layout(lora, layout)
        except ValueError as e:  # a conversion the tool refuses (LoHa/LoKr into fused weights)
            raise Refused(f"{arch} {variant} --to {layout}: refused: {e}") from e
    base_d, merged_d, peft_state = trainer_weights(cfg, run_dir)
    base, merged = original_layout(arch, base_d), original_layout(arch, merged_d)
    model = comfy_model(comfy, arch, base, model_dir)
    weights, targets, lines = apply_in_comfy(comfy, model, lora)
    unloaded = [l for l in lines if l.startswith("lora key not loaded")]
    dropped = [l for l in lines if l.startswith("NOT LOADED")]
    errors = [l for l in lines if l.startswith("ERROR")]
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    absent = changed - weights.keys()  # trained layers ComfyUI's model does not have (Kolors' encoder_hid_proj)
    changed -= absent
    rel = {k: ((weights[k] - merged[k]).norm() / (merged[k] - base[k]).norm().clamp_min(1e-30)).item() for k in changed}
    rel_w = {k: ((weights[k] - merged[k]).norm() / merged[k].norm()).item() for k in changed}
    untouched = {k for k in merged if k in weights and k not in changed and not torch.equal(weights[k], base[k])}
    unchanged = {k for k in changed if torch.equal(weights[k], base[k])}  # trained, yet left as it was by ComfyUI
    row = {"arch": arch, "type": variant, "layout": layout or "saved", "file_keys": len(lora), "loaded": len(lora) - len(unloaded),
           "unloaded": len(unloaded), "not_loaded_targets": len(dropped), "errors": len(errors),
           "patched": len(targets), "trainer_changed": len(changed), "missed": len((changed - targets) | unchanged | absent),
           "extra_patched": len(untouched), "max_rel_err": max(rel.values(), default=float("nan")),
           "max_rel_err_weight": max(rel_w.values(), default=float("nan")),
           "examples": (unloaded + dropped + errors)[:3]}
    if variant == "dora":
        ref = comfy_formula_dora(arch, base_d, merged_d, peft_state, cfg)
        row["vs_base_norm_dora"] = max(((weights[k] - ref[k]).norm() / (merged[k] - base[k]).norm()).item() for k in changed)
    return row


def comfy_formula_dora(arch, base_d, merged_d, peft_state, cfg) -> dict[str, torch.Tensor]:
    """The trainer's DoRA with ComfyUI's normalisation: (W + (alpha/r)·B@A) · m / |W rows| (W the base weight)."""
    net = cfg["config"]["process"][0]["network"]
    out = dict(merged_d)
    for key in [k for k in peft_state if k.endswith(".lora_magnitude_vector")]:
        name = key[: -len(".lora_magnitude_vector")]
        a, b, m = (peft_state[f"{name}.{s}"] for s in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
        w = base_d[f"{name}.weight"]
        alpha = net["conv_alpha"] if w.dim() == 4 else net["linear_alpha"]
        calc = w + (alpha / a.shape[0]) * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        out[f"{name}.weight"] = calc * m.reshape(-1, *[1] * (w.dim() - 1)) / norm
    return original_layout(arch, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfy", type=Path, required=True, help="a ComfyUI checkout (the folder holding comfy/)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--types", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--work", type=Path, help="where the tiny models and runs go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--layout", help="apply the saved file converted to this layout of the arch's lora_layouts "
                   "(trainer lora convert --to LAYOUT) instead of the file itself")
    p.add_argument("--all-layers", action="store_true", help="network.transformer_only: false (embedders, "
                   "modulation, time embedding, final layer ... too)")
    args = p.parse_args(argv)
    comfy = import_comfy(args.comfy.resolve())
    logging.getLogger("eridiffusion").setLevel(logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="comfy-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, refused = [], []
    for arch in args.archs.split(","):
        model_dir = work / "models" / arch
        if not model_dir.exists():
            get_arch_class(arch).build_tiny(model_dir, **TINY.get(arch, {}))
        for variant in args.types.split(","):
            try:
                rows.append(check(comfy, arch, variant, model_dir, work, args.steps, args.all_layers, args.layout))
            except Refused as e:
                refused.append(str(e))
                print(refused[-1], flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nComfyUI {comfy_commit(args.comfy)}\n")
    cols = ("arch", "type", "layout", "file_keys", "loaded", "unloaded", "not_loaded_targets", "errors", "patched",
            "trainer_changed", "missed", "max_rel_err", "max_rel_err_weight")
    print("| " + " | ".join(cols) + " | DoRA vs base-norm formula |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        extra = f"{r['vs_base_norm_dora']:.1e}" if "vs_base_norm_dora" in r else ""
        print("| " + " | ".join(f"{r[c]:.1e}" if c.startswith("max_rel_err") else str(r[c]) for c in cols) + f" | {extra} |")
    print("".join(f"\n{line}" for line in refused))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["unloaded"] or r["not_loaded_targets"] or r["errors"] or r["missed"] or r["extra_patched"]
           or not (r["max_rel_err"] < (1.0 if r["type"] == "dora" else 1e-4))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
