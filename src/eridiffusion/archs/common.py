"""Small helpers that several architecture modules share (local diffusers folders, fingerprints)."""
from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cache
from pathlib import Path


def require_diffusers_folder(path: str, subfolders: list[str], configs_only: tuple[str, ...] = ()) -> Path:
    """Check a local diffusers folder has what we will load, naming the first missing file. `configs_only`:
    subfolders whose weights come from elsewhere (a single file, model.model_paths), so need only their config."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model.name_or_path: '{root}' does not exist (EriDiffusion loads local files only, nothing is downloaded)")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: '{root}' is not a diffusers folder: {root / 'model_index.json'} is missing")
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"model.name_or_path: missing component folder {folder}")
        if sub.startswith("tokenizer"):
            continue
        config = next((folder / n for n in ("config.json", "scheduler_config.json") if (folder / n).is_file()), None)
        if config is None:
            raise FileNotFoundError(f"model.name_or_path: missing {folder / 'config.json'}")
        if sub != "scheduler" and sub not in configs_only and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise FileNotFoundError(f"model.name_or_path: no weights (*.safetensors) in {folder}")
    return root


# what ai-toolkit's noise_scheduler / sampler keys may say for a flow-matching model (ddpm: its default for both)
FLOW_NAMES = ("flowmatch", "flow_match", "euler", "ddpm")


def check_flow_model_keys(proc, arch: str, text_parts: tuple[str, ...], not_applicable: tuple[str, ...] = ()) -> None:
    """Config keys a flow-matching model reads or refuses: model_paths names only its text parts, timestep_type is
    a flow one, noise_scheduler/sampler may only say flow matching, and the DDPM-only keys (and the model's own
    `not_applicable` train keys) are unset."""
    from ..objectives import flow

    tc, sampler = proc.train, proc.sample.sampler if proc.sample else "flowmatch"
    unknown = set(proc.model.model_paths) - set(text_parts)
    if unknown:
        raise ValueError(f"model.model_paths: {sorted(unknown)} not supported for {arch} (use {', '.join(text_parts)}; "
                         "the transformer is name_or_path, the VAE vae_path)")
    if tc.timestep_type not in flow.TIMESTEP_TYPES:
        raise ValueError(f"train.timestep_type '{tc.timestep_type}' is not supported yet for {arch} "
                         f"(supported: {', '.join(flow.TIMESTEP_TYPES)})")
    for key, value in (("train.noise_scheduler", tc.noise_scheduler), ("sample.sampler", sampler)):
        if value not in FLOW_NAMES:
            raise ValueError(f"{key} '{value}': {arch} trains and samples with flow matching; use 'flowmatch'")
    for key, value in (("model.is_v_pred", proc.model.is_v_pred), ("train.snr_gamma", tc.snr_gamma),
                       ("train.min_snr_gamma", tc.min_snr_gamma)):
        if value:
            raise ValueError(f"{key} applies to noise-prediction (DDPM) models, not to {arch}; remove it")
    for key in not_applicable:
        if getattr(tc, key):
            raise ValueError(f"train.{key} does not apply to {arch}; remove it")


def resolve_roots(model_cfg, components: list[str], main: str, configs_only: tuple[str, ...] = ()
                  ) -> tuple[Path | None, Path | None, Path]:
    """Where each part comes from: (single file of the `main` component or None, its diffusers folder or
    None, the diffusers folder of the other components). `name_or_path` may be a diffusers folder, a repo id
    in the local HF cache, or one file of the main component; `extras_name_or_path` supplies the rest (of the
    `configs_only` components, whose weights come from elsewhere, only their configs)."""
    from .sources import resolve_model_source

    src = resolve_model_source(model_cfg.name_or_path)
    extras = model_cfg.extras_name_or_path
    if src.kind == "single_file" and not extras:
        raise FileNotFoundError(f"model.name_or_path is a single file ({src.path}); set model.extras_name_or_path to a "
                                f"diffusers folder (or a repo id in the local HF cache) for the {', '.join(c for c in components if c != main)}")
    rest = resolve_model_source(extras, key="model.extras_name_or_path") if extras else src
    if rest.kind == "single_file":
        raise ValueError(f"model.extras_name_or_path must be a diffusers folder or repo id, not a single file ({rest.path})")
    others = [c for c in components if c != main]
    if src.kind == "single_file":
        return src.path, None, require_diffusers_folder(str(rest.path), others, configs_only)
    main_root = require_diffusers_folder(str(src.path), [main])
    return None, main_root, require_diffusers_folder(str(rest.path if extras else src.path), others, configs_only)


def load_vae(vae_path: str | None, root: Path, dtype, cls=None):
    """The VAE (an AutoencoderKL unless `cls` says otherwise) from `model.vae_path` (a VAE folder, a diffusers folder
    with vae/, or a single file read with diffusers' converter and the main folder's VAE config), else from
    `root/vae`. Returns (vae, its path)."""
    from diffusers import AutoencoderKL

    vae_cls = cls or AutoencoderKL
    if not vae_path:
        return vae_cls.from_pretrained(root, subfolder="vae", local_files_only=True, torch_dtype=dtype), root / "vae"
    path = Path(vae_path).expanduser()
    if (path / "config.json").is_file():
        return vae_cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype), path
    if (path / "vae" / "config.json").is_file():
        return vae_cls.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype), path / "vae"
    if path.is_file():
        vae = vae_cls.from_single_file(str(path), config=str(root), subfolder="vae", local_files_only=True,
                                             torch_dtype=dtype)
        return vae, path
    raise FileNotFoundError(f"model.vae_path: {path} is neither a VAE folder (config.json), a diffusers folder with vae/, "
                            "nor a weights file")


def load_text_encoder(cls, path: str | Path, config_root: Path, subfolder: str, dtype, state: dict | None = None):
    """A transformers text encoder from its own folder, or from one weights file (ComfyUI's
    text_encoders/clip_l.safetensors, t5xxl_fp16.safetensors, ...), or from `state` (its tensors, already read
    from the file `path`, e.g. the part of an all-in-one checkpoint), with the architecture of
    `config_root/subfolder`. Key layouts that differ only by a leading `text_model.` are accepted, and so are
    the position ids older files keep (a buffer, not a weight) and ComfyUI's scaled fp8 (weights times `.scale_weight`)."""
    from .sources import load_state_dict_file

    path = Path(path).expanduser()
    if state is None and path.is_dir():
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    if state is None:
        state = load_state_dict_file(path, dtype=dtype)
    for key in [k for k in state if k.endswith(".scale_weight")]:  # ComfyUI's scaled fp8 (umt5_xxl_fp8_e4m3fn_scaled)
        scale, weight = state.pop(key).float(), key[: -len("scale_weight")] + "weight"
        w = state[weight]
        state[weight] = (w.float() * (scale.reshape(-1, *[1] * (w.dim() - 1)) if scale.numel() > 1 else scale)).to(w.dtype)
    state = {k: v for k, v in state.items() if not k.endswith(("embeddings.position_ids", ".scale_input")) and k != "scaled_fp8"}
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers (position ids) real
        model = cls(cls.config_class.from_pretrained(config_root, subfolder=subfolder, local_files_only=True))
    expected = set(model.state_dict())
    for old, new in (("text_model.", ""), ("", "text_model.")):  # transformers 5 dropped text_model. in CLIPTextModel
        if not expected & set(state):
            state = {new + k[len(old):]: v for k, v in state.items() if k.startswith(old)}
    unexpected = sorted(set(state) - expected)
    if unexpected or not state:
        raise ValueError(f"{path}: not a {cls.__name__} weights file for {config_root / subfolder} "
                         f"(unexpected keys such as {unexpected[:3]})")
    projection = model.state_dict().get("text_projection.weight")
    if projection is not None and "text_projection.weight" not in state and projection.shape[0] == projection.shape[1]:
        import torch  # a CLIP-L file without its projection (some clip_l.safetensors): the identity, as ComfyUI uses

        state["text_projection.weight"] = torch.eye(projection.shape[0], dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # T5 files carry `shared.weight` only; the encoder's embedding is tied to it
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: missing weights for {cls.__name__}, e.g. {still_meta[:3]}")
    return model.eval()  # as from_pretrained returns it


def folder_fingerprint(*folders: Path, extra: str = "") -> str:
    """Identity of model components for cache keys: their configs plus weight file sizes and mtimes."""
    h = hashlib.sha256(extra.encode())
    for folder in folders:
        for f in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
            if f.suffix == ".json":
                h.update(f.read_bytes())
            elif f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def encode_latents(vae, pixels, dtype):
    """[B,3,H,W] in [-1,1] -> the latents the denoiser sees (posterior mode, shifted and scaled), refusing
    NaN/inf so that no broken latent reaches a cache."""
    import torch

    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    latents = ((latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).to(dtype)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"the VAE produced NaN/inf latents in {vae.dtype} (and {dtype}); set model.vae_dtype: fp32")
    return latents


def latent_image_ids(h: int, w: int, device, dtype):
    """The Flux family's position ids of an h x w grid of latent patches, (h*w, 3) rows of (0, row, column), as
    diffusers' `_prepare_latent_image_ids` gives them but made on the device: no host-to-device copy in the step,
    which a CUDA graph could not hold."""
    import torch

    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols], 1).to(dtype)


@contextlib.contextmanager
def on_device(module, device):
    """Run with `module` on `device`, then put it back where it was (e.g. a VAE kept on the CPU)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def save_lora_with_diffusers(pipe_cls, path, modules: dict, dtype) -> None:
    """A LoRA in diffusers/peft layout (DoRA magnitudes as peft's `lora_magnitude_vector`) with its peft
    configs as metadata, written by diffusers' own `save_lora_weights`. `modules`: the saver's argument
    stem (`unet_lora`, `transformer_lora`, `text_encoder_lora`, ...) -> the module carrying the adapter."""
    import tempfile

    from peft.utils import get_peft_model_state_dict

    kw = {}
    for stem, module in modules.items():
        kw[f"{stem}_layers"] = {k: v.to(dtype) for k, v in get_peft_model_state_dict(module).items()}
        kw[f"{stem}_adapter_metadata"] = module.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        pipe_cls.save_lora_weights(tmp, weight_name="lora.safetensors", **kw)
        Path(tmp, "lora.safetensors").replace(path)


def write_diffusers_folder(root: Path | None, folder: Path, modules: dict, pipeline_cls=None) -> None:
    """A diffusers folder at `folder`: the base folder `root` with each `modules` subfolder (e.g. `transformer`)
    replaced by that module's save_pretrained; the other components hard-linked (or copied). With `pipeline_cls`,
    model_index.json names that pipeline and the written modules' classes (a model whose components came from
    another variant's folder). Written beside and swapped in, so a previous complete folder stays until the new one is."""
    import os
    import shutil

    if root is None:
        raise ValueError("save.save_format: diffusers needs the base's diffusers folder for the other components; "
                         "set model.extras_name_or_path")
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(root, tmp, ignore=lambda d, names: list(modules) if Path(d) == Path(root) else [],
                    copy_function=link_or_copy)
    for sub, module in modules.items():
        module.save_pretrained(tmp / sub)
    if pipeline_cls is not None:
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index_path.unlink()  # a hard link to the base's: replaced, never written through
        index["_class_name"] = pipeline_cls.__name__
        index.update({sub: [type(m).__module__.split(".")[0], type(m).__name__] for sub, m in modules.items()})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    if folder.exists():
        folder.replace(old)
    tmp.replace(folder)
    shutil.rmtree(old, ignore_errors=True)


@cache
def variant_configs(folder: Path) -> dict[str, dict]:
    """An architecture's shipped configs of its released variants, `folder/<variant>/transformer/config.json` (without
    diffusers' `_` keys) and `scheduler/scheduler_config.json`, by variant folder name."""
    read = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
    return {d.name: {"transformer": read(d / "transformer" / "config.json"),
                     "scheduler": json.loads((d / "scheduler" / "scheduler_config.json").read_text())}
            for d in sorted(folder.iterdir()) if d.is_dir()}
