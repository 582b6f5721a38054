"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo) on diffusers' SD3Transformer2DModel (MMDiT): flow
matching on 16-channel latents, conditioned on CLIP-L + CLIP-G penultimate states beside T5 (zeros without
T5, as diffusers' pipeline does) and the two CLIPs' pooled embeddings. Loads diffusers folders and Stability AI's
single files (formats.py). LoRA files in diffusers' layout (`transformer.<diffusers name>`) with each LoRA's
alpha/rank folded into lora_B and no `.alpha`, which ComfyUI's SD3 loader and diffusers' `load_lora_weights` both
apply in full at scale 1.0 (diffusers refuses `.alpha` keys); DoRA, LoHa and LoKr keep ComfyUI's `.alpha`."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from ...adapters.merge import adapter_modules, fold_alphas, rank_alphas
from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, finish_loaded, folder_readers, materialize, read_units
from ..common import (check_flow_model_keys, encode_latents, folder_fingerprint, load_text_encoder, load_vae,
                     on_device, resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..sources import find_tokenizer_files, resolve_model_source
from .formats import (BLOCK_LISTS, TEXT_PREFIXES, VAE_PREFIX, diffusers_to_sai_file, load_sd3_single_file, open_file,
                      read_part, require_sai_sd3, vae_to_diffusers)

# text_encoder_3 / tokenizer_3 (T5) are optional: a folder without them conditions on zeros in T5's place
COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
FILE_PREFIX = "transformer."  # diffusers' SD3 LoRA layout, which ComfyUI's SD3 loader also maps


class SD3:
    base_model_version = "sd3"
    block_lists = BLOCK_LISTS  # the repeated MMDiT blocks, in execution order (block swap, block-wise loading)
    # kept in full precision when the base is quantized: patch/text/time embedders and the output projection are
    # small and every token goes through them
    quantize_exclude = ["pos_embed*", "context_embedder", "time_text_embed*", "norm_out*", "proj_out"]
    model_kwargs = {"max_text_length": 256}  # T5 tokens, as diffusers' StableDiffusion3Pipeline default
    attention_kernel = "flash"  # SDPA's kernel tried first (train/attention.py): 64-wide heads, cuDNN's ran slower (H200)

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        self.max_sequence_length = int({**self.model_kwargs, **proc.model.model_kwargs}["max_text_length"])
        check_flow_model_keys(proc, "sd3", TEXT_PARTS, not_applicable=("bypass_guidance_embedding",))

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_sd3

        return build_tiny_sd3(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base or FrozenBase(self.device, self.dtype)
        cfg = self.model_cfg
        paths = {k: Path(v).expanduser() for k, v in cfg.model_paths.items()}
        reader, inside = None, set()  # a single file, and the components it holds besides the MMDiT
        src = resolve_model_source(cfg.name_or_path)
        if src.kind == "single_file":
            reader = open_file(src.path)
            keys = reader.keys()
            require_sai_sd3(keys, f"model.name_or_path: {src.path}")  # before anything else is looked for
            inside = {name for name, prefix in [*TEXT_PREFIXES.items(), ("vae", VAE_PREFIX)] if any(k.startswith(prefix) for k in keys)}
        elsewhere = inside | {p for p in paths if p.startswith("text_encoder")} | ({"vae"} if cfg.vae_path else set())
        single, main_root, root = resolve_roots(cfg, COMPONENTS, "transformer", tuple(elsewhere))
        self.components_root = root
        te_dtype = DTYPES[cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[cfg.vae_dtype or self.train_cfg.dtype]
        if "vae" in inside and not cfg.vae_path:  # SAI's files carry the VAE
            vae, vae_source = self.vae_from_file(reader, root, vae_dtype), single
        else:
            vae, vae_source = load_vae(cfg.vae_path, root, vae_dtype)
        self.vae_from_single_file = vae_source == single
        if single:
            transformer = load_sd3_single_file(reader, single, self.dtype, self.base)
        else:
            with torch.device("meta"):  # filled block by block, each block finished (quantized, moved) as it arrives
                transformer = SD3Transformer2DModel.from_config(
                    SD3Transformer2DModel.load_config(main_root, subfolder="transformer", local_files_only=True))
            folder = main_root / "transformer"
            materialize(transformer, read_units(folder_readers(folder), BLOCK_LISTS), self.base, BLOCK_LISTS, str(folder))

        # each text encoder from model.model_paths, else the single file, else the components folder; those from
        # elsewhere are read again when a diffusers folder is written after they were freed (save_full_diffusers)
        sources, loaders = {}, {}
        for name, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                          ("text_encoder_3", T5EncoderModel)):
            state = None
            if name in paths:
                if not paths[name].exists():
                    raise FileNotFoundError(f"model.model_paths.{name}: {paths[name]} does not exist")
                sources[name] = paths[name]
            elif name in inside:
                sources[name], state = single, TEXT_PREFIXES[name]
            elif (root / name).exists() or name != "text_encoder_3":  # no T5: zeros in its place, as diffusers' pipeline does
                sources[name] = root / name
            else:
                continue
            if not (root / name / "config.json").is_file():
                raise FileNotFoundError(f"{root / name / 'config.json'} is missing: model.extras_name_or_path must hold the "
                                        f"config of {name} (its weights come from {sources[name]})")
            loaders[name] = lambda cls=cls, name=name, prefix=state: load_text_encoder(
                cls, sources[name], root, name, te_dtype,
                state=read_part(open_file(sources[name]), prefix, te_dtype) if prefix else None)
        self.text_reloads = {name: load for name, load in loaders.items() if sources[name] != root / name}
        encoders = {name: load() for name, load in loaders.items()}
        tokenizer_files = {"tokenizer": [["vocab.json", "merges.txt"], ["tokenizer.json"]],
                           "tokenizer_2": [["vocab.json", "merges.txt"], ["tokenizer.json"]],
                           "tokenizer_3": [["spiece.model"], ["tokenizer.json"]]}
        tokenizer_folders = {tok: paths.get(tok, root / tok) for tok in tokenizer_files
                             if f"text_encoder{tok[len('tokenizer'):]}" in encoders}
        tokenizers = [AutoTokenizer.from_pretrained(find_tokenizer_files(tokenizer_folders[tok], files), local_files_only=True)
                      if tok in tokenizer_folders else None for tok, files in tokenizer_files.items()]
        self.attach(transformer=transformer, vae=vae, tokenizers=tuple(tokenizers),
                    text_encoders=tuple(encoders.get(n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")),
                    scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True))
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"sd3:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*dict.fromkeys([*sources.values(), *tokenizer_folders.values()]),
                                                   extra=f"sd3:{self.max_sequence_length}:{te_dtype}:{self.dtype}")

    @staticmethod
    def vae_from_file(reader, root: Path, dtype):
        """The VAE of a SAI file (`first_stage_model.*`), with the components folder's VAE config."""
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(root, subfolder="vae", local_files_only=True)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(config)
        state = vae_to_diffusers({k: reader.read(k) for k in reader.keys() if k.startswith(VAE_PREFIX)}, config)
        try:
            vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"the single file's VAE (first_stage_model.*) does not fit {root / 'vae'}'s config: {e}") from e
        return vae.eval()

    def attach(self, *, transformer, scheduler, vae=None, text_encoders=(None, None, None), tokenizers=(None, None, None)) -> None:
        """Take loaded components (from `load()`, or built in memory by a benchmark) and place them."""
        self.transformer, self.vae = transformer, vae
        self.base = getattr(self, "base", None) or FrozenBase(self.device, self.dtype)
        finish_loaded(transformer.eval(), self.base, BLOCK_LISTS)
        for m in text_encoders:
            if m is not None:
                self.base.te_quantizer(m.requires_grad_(False))
        for m in (vae, *text_encoders):
            if m is not None:
                m.requires_grad_(False).eval().to(self.device)
        te1, te2, te3 = text_encoders
        tok1, tok2, tok3 = tokenizers
        # The sampling pipeline shares these very modules, so previews use the in-training weights.
        self.pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                                             tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                             tokenizer_3=tok3)
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.bucket_divisibility = self.vae_scale_factor * transformer.config.patch_size
        self.shift = flow.FlowShift(shift=scheduler.config.shift)  # 3.0 for SD3/3.5, no resolution-dependent shift
        self.denoiser = transformer
        # the empty prompt, the previews' negative once the text encoders are freed (the pipeline encodes "", no zeros)
        self.unconditional = self.encode_prompts([""]) if te1 is not None else {}

    def drop_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        h, w = latents.shape[-2:]
        p = self.transformer.config.patch_size
        return flow.training_loss(latents.to(self.device, self.dtype), lambda noisy, sigma: self.predict(noisy, sigma, text),
                                  self.train_cfg, shift=self.shift, seq_len=(h // p) * (w // p), generator=generator)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer(
            hidden_states=noisy,
            encoder_hidden_states=text["prompt_embeds"].to(self.device, self.dtype),
            pooled_projections=text["pooled_prompt_embeds"].to(self.device, self.dtype),
            timestep=(sigma * 1000).to(self.dtype),  # SD3's transformer takes the scheduler's 0..1000 timesteps
            return_dict=False,
        )[0]

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        if train_text_encoder:
            raise ValueError("train.train_text_encoder is not supported yet for sd3")
        # the last block's text queries only feed text outputs that the model drops (context_pre_only): no LoRA there
        dead = {f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(self.transformer.transformer_blocks)
                if b.context_pre_only}
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear) and n not in dead]
        return {"transformer": LoraTargets(self.transformer, [n for n in names if n.startswith("transformer_blocks.")]
                                           if transformer_only else names, [])}

    def lora_to_file(self, states):
        return {FILE_PREFIX + k: v for k, v in fold_alphas(states["transformer"]).items()}

    def lora_from_file(self, tensors):
        return {"transformer": read_lora(tensors)}

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it, with its peft config as metadata. For a LoRA the main file
        already loads in diffusers with the same result; for DoRA (whose main file keeps ComfyUI's `.dora_scale`
        and `.alpha`, which diffusers drops or refuses) this copy is the one diffusers reads."""
        save_lora_with_diffusers(StableDiffusion3Pipeline, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- full fine-tune ------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The MMDiT (or its gathered `state`) with the VAE, in Stability AI's single-file layout, as
        sd3.5_large.safetensors ships (ComfyUI's checkpoints/; the text encoders stay separate files)."""
        return diffusers_to_sai_file(state or self.transformer.state_dict(), self.vae.state_dict() if self.vae is not None else None)

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        """The components folder with this transformer, and the parts that came from files rather than from that
        folder (the single file's VAE and text encoders, model.model_paths) written out too."""
        modules = {"transformer": self.transformer}
        if getattr(self, "vae_from_single_file", False):
            modules["vae"] = self.vae
        for name, load in getattr(self, "text_reloads", {}).items():
            modules[name] = getattr(self.pipe, name) or load()
        write_diffusers_folder(getattr(self, "components_root", None), folder, modules)

    # ---- other layouts and merging (trainer lora convert / merge) ---------------------------------
    # diffusers: ours (`transformer.<diffusers name>`, alpha folded); comfy: `diffusion_model.<SAI name>` (q/k/v
    # fused into qkv), ComfyUI's generic layout; kohya: `lora_transformer_<diffusers name with _>` (OneTrainer's,
    # which ComfyUI's SD3 loader maps). `lora_unet_<SAI name>` (sd-scripts) is read too.
    lora_layouts = ("diffusers", "comfy", "kohya")

    @staticmethod
    def lora_to_layout(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        from ...adapters.kohya import to_kohya
        from .formats import lora_diffusers_to_sai

        state = read_lora(tensors)
        if layout == "diffusers":
            out = {}
            for key, t in fold_alphas(state, with_dora=True).items():
                if ".hada_" in key or ".lokr_" in key:
                    raise ValueError(f"{key}: diffusers reads LoRA and DoRA only; LoHa/LoKr files stay in the ComfyUI layout")
                if key.endswith(".dora_scale"):  # as peft names and shapes DoRA's magnitude, which diffusers reads
                    key, t = key[: -len(".dora_scale")] + ".lora_magnitude_vector", t.reshape(-1)
                out[FILE_PREFIX + key] = t
            return out
        alphas = {k[: -len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
        if layout == "kohya":
            return to_kohya({k: v for k, v in state.items() if not k.endswith(".alpha")}, alphas, "lora_transformer")
        modules = adapter_modules(state)
        sai = lora_diffusers_to_sai(modules, _depth(modules, "transformer_blocks."))
        return {f"diffusion_model.{m}.{role}": t for m, parts in sai.items() for role, t in parts.items()}

    @staticmethod
    def open_for_merge(base: str):
        """trainer lora merge: ({component: module or state dict}, write(output), read(file tensors) -> states), for the
        base as the user keeps it: a diffusers folder is written as a folder (the other components linked or copied),
        a SAI single file as one, its VAE and text encoders copied through."""
        from safetensors.torch import save_file

        from ..blockwise import FLOAT8
        from ..sources import load_state_dict_file
        from .formats import diffusers_to_sai, file_prefix, sai_to_diffusers, transformer_part

        read = lambda tensors: {"transformer": read_lora(tensors)}
        src = resolve_model_source(base, key="--base")
        if src.kind == "single_file":
            sd = load_state_dict_file(src.path)
            require_sai_sd3(sd, f"--base {src.path}")
            part = transformer_part(sd)
            if any(v.dtype in FLOAT8 for v in part.values()):
                raise ValueError(f"--base {src.path}: a float8 model; merge into its bf16/fp16 release and quantize after")
            prefix = file_prefix(sd)
            state = sai_to_diffusers(part, _depth(part, "joint_blocks."))

            def write(out: Path) -> None:
                rest = {k: v for k, v in sd.items() if not (k.startswith(prefix) and k[len(prefix):] in part)}
                merged = {**rest, **{prefix + k: v for k, v in diffusers_to_sai(state).items()}}
                save_file({k: v.contiguous() for k, v in merged.items()}, str(out), metadata={"format": "pt"})
            return {"transformer": state}, write, read
        root = Path(src.path)
        reader = next(iter(folder_readers(root / "transformer").values()))
        dtype = next(reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point)  # as stored
        model = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
        return {"transformer": model}, lambda out: write_diffusers_folder(root, out, {"transformer": model}), read

    # ---- previews ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: SampleRequest):
        neg = request.neg_text or self.unconditional
        with on_device(self.vae, self.device):
            return self.pipe(
                prompt_embeds=request.text["prompt_embeds"].to(self.device, self.dtype),
                pooled_prompt_embeds=request.text["pooled_prompt_embeds"].to(self.device, self.dtype),
                negative_prompt_embeds=neg["prompt_embeds"].to(self.device, self.dtype),
                negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"].to(self.device, self.dtype),
                width=request.width, height=request.height, num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, max_sequence_length=self.max_sequence_length,
                generator=torch.Generator(self.device).manual_seed(request.seed),
            ).images[0]


def _depth(modules, blocks: str) -> int:
    """The block count a LoRA or state names: its last block is the model's last (whose text stream ends, and whose
    norm rows are swapped) or is not named at all."""
    return 1 + max((int(k[len(blocks):].split(".")[0]) for k in modules if k.startswith(blocks)), default=-1)


@functools.cache
def _module_names(layout: str) -> list[str]:
    """Every module name an SD3 / SD3.5 transformer may have, in diffusers' or SAI's names (a meta-device model with
    dual attention and QK norm in every block: the union of the releases' names)."""
    from .formats import diffusers_to_sai

    with torch.device("meta"):
        model = SD3Transformer2DModel(num_layers=38, dual_attention_layers=tuple(range(38)), qk_norm="rms_norm")
    if layout == "diffusers":
        return [n for n, _ in model.named_modules() if n]
    return sorted({k.rsplit(".", 1)[0] for k in diffusers_to_sai(model.state_dict())})


def read_lora(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3 LoRA file in any layout lora_to_layout writes (and sd-scripts' `lora_unet_<SAI name>`) -> peft-named
    tensors of the transformer with an `.alpha` per LoRA module (rank where the file has none: scale 1)."""
    from ...adapters.kohya import from_kohya
    from .formats import lora_sai_to_diffusers

    heads = ("lora_transformer_", "lora_unet_", "diffusion_model.", FILE_PREFIX)
    head = next((h for h in heads if any(k.startswith(h) for k in tensors)), None)
    stray = [k for k in tensors if head is None or not k.startswith(head)]
    if stray:
        raise ValueError(f"not an SD3 LoRA key: '{stray[0]}' (expected one layout: {', '.join(h + '...' for h in heads)})")
    if head.startswith("lora_"):
        names = _module_names("diffusers" if head == "lora_transformer_" else "sai")
        state, alphas = from_kohya(tensors, names, head[:-1])
        state.update({f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()})
    else:
        state = {k[len(head):]: v for k, v in tensors.items()}
    for key in [k for k in state if k.endswith(".lora_magnitude_vector")]:  # peft's DoRA magnitude (diffusers' saver)
        state[key[: -len(".lora_magnitude_vector")] + ".dora_scale"] = state.pop(key).reshape(-1, 1)
    state = rank_alphas(state)
    if head in ("lora_unet_", "diffusion_model."):
        modules = adapter_modules(state)
        state = {f"{m}.{role}": t for m, parts in lora_sai_to_diffusers(modules, _depth(modules, "joint_blocks.")).items()
                 for role, t in parts.items()}
    return state
