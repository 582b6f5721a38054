"""FLUX.1 (dev, schnell) and Flex.1 on diffusers' FluxTransformer2DModel: flow matching on 2x2-packed
16-channel latents, CLIP-L pooled + T5 text conditioning, optional guidance embedding."""
from __future__ import annotations

import types
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..common import (check_flow_model_keys, encode_latents, folder_fingerprint, latent_image_ids, load_text_encoder,
                     load_vae, on_device, resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..blockwise import FrozenBase, finish_loaded, folder_readers, materialize, read_units
from .formats import BLOCK_LISTS, load_flux_single_file
from ..sources import find_tokenizer_files

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # what model.model_paths may name
FILE_PREFIX = "transformer."  # diffusers' Flux LoRA layout, which ComfyUI's Flux loader also maps


def _time_text_embed_without_guidance(self, timestep, guidance, pooled_projection):
    # Flex.1 is trained with its guidance embedder bypassed: timestep + pooled text only
    t = self.time_proj(timestep)
    temb = self.timestep_embedder(t.to(dtype=pooled_projection.dtype))
    return temb + self.text_embedder(pooled_projection)


class Flux:
    base_model_version = "flux.1"
    block_lists = BLOCK_LISTS  # the repeated blocks, in execution order (block swap, block-wise loading)
    # kept in full precision when the base is quantized: the input/output projections and the timestep,
    # guidance and pooled-text embedders are tiny and every token's result goes through them
    quantize_exclude = ["x_embedder", "context_embedder", "proj_out", "norm_out*", "time_text_embed*"]
    model_kwargs = {"max_text_length": 512}  # the model.model_kwargs this architecture reads, with defaults
    attention_kernel = "cudnn"  # SDPA's kernel tried first (train/attention.py): 12 % less step time than flash (H200)
    # the step reads only the batch's tensors and makes none on the host: it can replay from CUDA graphs (train/graphs.py)
    cuda_graphs = True

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        self.max_sequence_length = int({**self.model_kwargs, **proc.model.model_kwargs}["max_text_length"])
        # Flux is always trained and sampled with flow matching, as in ai-toolkit; these keys may only say so
        check_flow_model_keys(proc, "flux", TEXT_PARTS)

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_flux

        return build_tiny_flux(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base or FrozenBase(self.device, self.dtype)
        single, main_root, root = resolve_roots(self.model_cfg, COMPONENTS, "transformer")
        self.components_root = root  # the other components' diffusers folder (full fine-tunes are written beside it)
        load = dict(torch_dtype=DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype], local_files_only=True)
        vae_dtype = DTYPES[self.model_cfg.vae_dtype or self.train_cfg.dtype]
        vae, vae_source = load_vae(self.model_cfg.vae_path, root, vae_dtype)
        paths = {k: Path(v).expanduser() for k, v in self.model_cfg.model_paths.items()}
        if single:
            transformer = load_flux_single_file(single, self.dtype, self.base)
        else:
            with torch.device("meta"):  # filled block by block, each block finished (quantized, moved) as it arrives
                transformer = FluxTransformer2DModel.from_config(
                    FluxTransformer2DModel.load_config(main_root, subfolder="transformer", local_files_only=True))
            folder = main_root / "transformer"
            materialize(transformer, read_units(folder_readers(folder), BLOCK_LISTS), self.base, BLOCK_LISTS, str(folder))
        self.attach(
            transformer=transformer,
            vae=vae,
            text_encoder=load_text_encoder(CLIPTextModel, paths.get("text_encoder", root / "text_encoder"), root,
                                           "text_encoder", load["torch_dtype"]),
            text_encoder_2=load_text_encoder(T5EncoderModel, paths.get("text_encoder_2", root / "text_encoder_2"), root,
                                             "text_encoder_2", load["torch_dtype"]),
            tokenizer=AutoTokenizer.from_pretrained(find_tokenizer_files(
                paths.get("tokenizer", root / "tokenizer"), [["vocab.json", "merges.txt"], ["tokenizer.json"]]), local_files_only=True),
            tokenizer_2=AutoTokenizer.from_pretrained(find_tokenizer_files(
                paths.get("tokenizer_2", root / "tokenizer_2"), [["spiece.model"], ["tokenizer.json"]]), local_files_only=True),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True),
        )
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"flux:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*(paths.get(c, root / c) for c in TEXT_PARTS),
                                                   extra=f"flux:{self.max_sequence_length}:{self.dtype}")

    def attach(self, *, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
               tokenizer_2=None) -> None:
        """Take loaded components (from `load()`, or built in memory by a benchmark) and place them."""
        self.transformer, self.vae, self.text_encoder, self.text_encoder_2 = transformer, vae, text_encoder, text_encoder_2
        self.base = getattr(self, "base", None) or FrozenBase(self.device, self.dtype)
        finish_loaded(transformer.eval(), self.base, BLOCK_LISTS)
        for m in (text_encoder, text_encoder_2):
            if m is not None:
                self.base.te_quantizer(m.requires_grad_(False))
        for m in (vae, text_encoder, text_encoder_2):
            if m is not None:
                m.requires_grad_(False).eval().to(self.device)
        if self.train_cfg.bypass_guidance_embedding and transformer.config.guidance_embeds:
            tte = transformer.time_text_embed
            tte.forward = types.MethodType(_time_text_embed_without_guidance, tte)
        # The sampling pipeline shares these very modules, so previews use the in-training weights.
        self.pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.bucket_divisibility = self.vae_scale_factor * 2
        self.shift = flow.FlowShift.from_scheduler(scheduler.config)
        self.denoiser = transformer

    def drop_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2"):
            setattr(self.pipe, name, None)
            setattr(self, name, None)

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        h, w = latents.shape[-2:]
        return flow.training_loss(latents.to(self.device, self.dtype), lambda noisy, sigma: self.predict(noisy, sigma, text),
                                  self.train_cfg, shift=self.shift, seq_len=(h // 2) * (w // 2), generator=generator)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = noisy.shape
        embeds = text["prompt_embeds"].to(self.device, self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(self.train_cfg.cfg_scale), device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            encoder_hidden_states=embeds,
            pooled_projections=text["pooled_prompt_embeds"].to(self.device, self.dtype),
            timestep=sigma.to(self.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, self.device, self.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        if train_text_encoder:
            raise ValueError("train.train_text_encoder is not supported yet for flux")
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        return {"transformer": LoraTargets(self.transformer, [n for n in names if n.startswith(BLOCKS)]
                                           if transformer_only else names, [])}

    def lora_to_file(self, states):
        return {FILE_PREFIX + k: v for k, v in states["transformer"].items()}

    def lora_from_file(self, tensors):
        bad = [k for k in tensors if not k.startswith(FILE_PREFIX)]
        if bad:
            raise ValueError(f"not a diffusers-layout {type(self).__name__} LoRA (key '{bad[0]}' lacks the '{FILE_PREFIX}' prefix)")
        return {"transformer": {k[len(FILE_PREFIX):]: v for k, v in tensors.items()}}

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it: the main file already is, but for DoRA, whose magnitudes
        the main file stores as ComfyUI's `.dora_scale` and diffusers' Flux loader drops."""
        save_lora_with_diffusers(FluxPipeline, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- full fine-tune ----------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformer (or its gathered `state`) in BFL's single-file layout (ComfyUI's
        models/diffusion_models/flux1-dev.safetensors)."""
        from .formats import diffusers_to_bfl

        return diffusers_to_bfl(state or self.transformer.state_dict())

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        write_diffusers_folder(getattr(self, "components_root", None), folder, {"transformer": self.transformer})

    # ---- other layouts (trainer lora convert) ----------------------------------------------------
    lora_layouts = ("diffusers", "comfy", "kohya")

    @staticmethod
    def lora_to_layout(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """A Flux LoRA file in any of lora_layouts (or bare diffusers names) -> the same LoRA in `layout`:
        diffusers `transformer.<diffusers name>` (ours), ComfyUI `diffusion_model.<BFL name>` or kohya
        `lora_unet_<BFL name with _>` (sd-scripts)."""
        from ...adapters.kohya import from_kohya, to_kohya
        from .formats import lora_bfl_to_diffusers, lora_diffusers_to_bfl

        bfl_names = _bfl_module_names()
        if any(k.startswith("lora_unet_") for k in tensors):
            state, alphas = from_kohya(tensors, bfl_names, "lora_unet")
            state = lora_bfl_to_diffusers({**state, **{f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()}})
        elif any(k.startswith("diffusion_model.") for k in tensors):
            state = lora_bfl_to_diffusers({k[len("diffusion_model."):]: v for k, v in tensors.items()})
        else:
            state = {k.removeprefix(FILE_PREFIX): v for k, v in tensors.items()}
        if layout == "diffusers":
            return {FILE_PREFIX + k: v for k, v in state.items()}
        bfl = lora_diffusers_to_bfl(state)
        if layout == "comfy":
            return {f"diffusion_model.{k}": v for k, v in bfl.items()}
        alphas = {k[: -len(".alpha")]: float(v) for k, v in bfl.items() if k.endswith(".alpha")}
        return to_kohya({k: v for k, v in bfl.items() if not k.endswith(".alpha")}, alphas, "lora_unet")

    @staticmethod
    def open_for_merge(base: str):
        """trainer lora merge: ({component: module}, write(output), read(file tensors) -> states) for the base as
        the user keeps it: a diffusers folder is written as a folder (the other components linked or copied), a BFL
        single file as one."""
        from .formats import diffusers_to_bfl

        return open_transformer_for_merge(base, FluxTransformer2DModel, load_flux_single_file, diffusers_to_bfl, read_any_lora)

    # ---- previews ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: SampleRequest):
        with on_device(self.vae, self.device):
            return self.pipe(
                prompt_embeds=request.text["prompt_embeds"].to(self.device, self.dtype),
                pooled_prompt_embeds=request.text["pooled_prompt_embeds"].to(self.device, self.dtype),
                width=request.width, height=request.height, num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, max_sequence_length=self.max_sequence_length,
                generator=torch.Generator(self.device).manual_seed(request.seed),
            ).images[0]


def _bfl_module_names() -> list[str]:
    """Every module name of FLUX.1-dev's transformer in BFL's layout (Flex.1 and schnell name a subset)."""
    from .formats import diffusers_to_bfl, known_flux_configs

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(known_flux_configs()["flux-dev"])
    return sorted({k.rsplit(".", 1)[0] for k in diffusers_to_bfl(model.state_dict())})


def read_any_lora(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A Flux LoRA file in any layout lora_to_layout reads -> {"transformer": peft-named state}."""
    return Flux.lora_from_file(None, Flux.lora_to_layout(tensors, "diffusers"))


def open_transformer_for_merge(base: str, model_cls, load_single_file, to_bfl, read_any):
    """Flux.open_for_merge for any transformer of the family: `load_single_file(path, dtype)` reads its BFL-style
    single file, `to_bfl` writes one back, `model_cls.from_pretrained` reads its diffusers folder."""
    from safetensors.torch import save_file

    from ..blockwise import SafetensorsReader
    from ..sources import resolve_model_source
    from .formats import PREFIXES

    src = resolve_model_source(base, key="--base")
    if src.kind == "single_file":
        reader = SafetensorsReader(src.path)
        dtype = next((reader.dtype(k) for k in reader.keys() if reader.dtype(k) in (torch.float32, torch.float16)),
                     torch.bfloat16)  # float8 files are merged and written in bf16
        prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in reader.keys())), "")
        model = load_single_file(src.path, dtype)

        def write(out: Path) -> None:
            save_file({prefix + k: v.contiguous() for k, v in to_bfl(model.state_dict()).items()}, str(out))
        return {"transformer": model}, write, read_any
    root = Path(src.path)
    reader = next(iter(folder_readers(root / "transformer").values()))
    dtype = next(reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point)  # as stored
    model = model_cls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    return {"transformer": model}, lambda out: write_diffusers_folder(root, out, {"transformer": model}), read_any
