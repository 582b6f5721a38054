"""Chroma (lodestones' Chroma1-HD, chroma-unlocked-vNN) on diffusers' ChromaTransformer2DModel: FLUX.1-schnell's
transformer with every block's modulation computed by one small network (`distilled_guidance_layer`) from the
timestep alone, conditioned on T5 only. Flow matching on FLUX.1's 2x2-packed 16-channel latents.

T5's padding is masked, all but the first padding token (ChromaPipeline's mask). The mask is cached with the
embeddings, and the transformer sees each prompt cut to its unmasked tokens rather than the mask: the masked
tokens reach nothing else through attention, so the output is the same, with shorter sequences and no masked
attention rows. It also sidesteps diffusers' single blocks dropping the mask under gradient checkpointing.

Files: LoRAs in diffusers' Flux layout (`transformer.<diffusers name>`), which ComfyUI's Chroma (a Flux subclass) and
ChromaPipeline.load_lora_weights both read, and Flux's other layouts through `trainer lora convert`; full fine-tunes
in lodestones' BFL-style single-file layout (formats.py)."""
from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer, T5EncoderModel

from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, finish_loaded, folder_readers, materialize, read_units
from ..common import (check_flow_model_keys, encode_latents, folder_fingerprint, latent_image_ids, load_text_encoder,
                     load_vae, on_device, resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..flux import Flux, open_transformer_for_merge, read_any_lora
from ..sources import find_tokenizer_files, resolve_model_source
from .formats import BLOCK_LISTS, computed_buffers, diffusers_to_bfl, load_chroma_single_file

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
TEXT_PARTS = ("text_encoder", "tokenizer")  # what model.model_paths may name
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
# the Linears outside the blocks that ComfyUI's Flux key map names (the approximator has no name there, so a LoRA on
# it would not apply in ComfyUI: it is left to full fine-tunes)
OUTSIDE_BLOCKS = ("x_embedder", "context_embedder", "proj_out")
DEFAULT_EXTRAS = "ostris/Flex.1-alpha"  # where ai-toolkit takes Chroma's T5, VAE and scheduler from


class Chroma:
    base_model_version = "chroma"
    block_lists = BLOCK_LISTS  # the repeated blocks, in execution order (block swap, block-wise loading)
    # kept in full precision when the base is quantized: the input/output projections, and the approximator, whose
    # output modulates every block
    quantize_exclude = ["x_embedder", "context_embedder", "proj_out", "distilled_guidance_layer*"]
    model_kwargs = {"max_text_length": 512}  # T5 tokens, as ChromaPipeline's default
    attention_kernel = "cudnn"  # SDPA's kernel tried first (train/attention.py): FLUX.1's blocks, as Flux

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        self.max_sequence_length = int({**self.model_kwargs, **proc.model.model_kwargs}["max_text_length"])
        check_flow_model_keys(proc, "chroma", TEXT_PARTS, not_applicable=("bypass_guidance_embedding",))

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_chroma

        return build_tiny_chroma(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base or FrozenBase(self.device, self.dtype)
        single, main_root, root = resolve_roots(_as_ai_toolkit_names(self.model_cfg), COMPONENTS, "transformer")
        self.components_root = root  # the other components' diffusers folder (full fine-tunes are written beside it)
        te_dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[self.model_cfg.vae_dtype or self.train_cfg.dtype]
        vae, vae_source = load_vae(self.model_cfg.vae_path, root, vae_dtype)
        part = _t5_parts(root, {k: Path(v).expanduser() for k, v in self.model_cfg.model_paths.items()})
        if single:
            transformer = load_chroma_single_file(single, self.dtype, self.base)
        else:
            with torch.device("meta"):  # filled block by block, each block finished (quantized, moved) as it arrives
                transformer = ChromaTransformer2DModel.from_config(
                    ChromaTransformer2DModel.load_config(main_root, subfolder="transformer", local_files_only=True))
            folder = main_root / "transformer"
            units = read_units(folder_readers(folder), BLOCK_LISTS)
            materialize(transformer, chain(units, [computed_buffers(transformer)]), self.base, BLOCK_LISTS, str(folder))
        self.attach(
            transformer=transformer, vae=vae,
            text_encoder=load_text_encoder(T5EncoderModel, part["text_encoder"], root, "text_encoder", te_dtype),
            tokenizer=AutoTokenizer.from_pretrained(find_tokenizer_files(part["tokenizer"], [["spiece.model"], ["tokenizer.json"]]),
                                                    local_files_only=True),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True))
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"chroma:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*part.values(), extra=f"chroma:{self.max_sequence_length}:{te_dtype}:{self.dtype}")

    def attach(self, *, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None) -> None:
        """Take loaded components (from `load()`, or built in memory by a benchmark) and place them."""
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.base = getattr(self, "base", None) or FrozenBase(self.device, self.dtype)
        finish_loaded(transformer.eval(), self.base, BLOCK_LISTS)
        if text_encoder is not None:
            self.base.te_quantizer(text_encoder.requires_grad_(False))
        for m in (vae, text_encoder):
            if m is not None:
                m.requires_grad_(False).eval().to(self.device)
        # The sampling pipeline shares these very modules, so previews use the in-training weights.
        self.pipe = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   transformer=transformer)
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.bucket_divisibility = self.vae_scale_factor * 2  # 2x2 latent patches
        self.shift = flow.FlowShift.from_scheduler(scheduler.config)
        self.denoiser = transformer
        # the empty prompt, the previews' negative once the text encoder is freed (the pipeline encodes "")
        self.unconditional = self.encode_prompts([""]) if text_encoder is not None else {}

    def drop_text_encoders(self) -> None:
        self.pipe.text_encoder = self.text_encoder = None

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5 states padded to max_text_length, and the mask of the tokens the transformer sees: the prompt's and
        the first padding token (ChromaPipeline's mask, kept as booleans)."""
        embeds, _, mask, *_ = self.pipe.encode_prompt(prompt=prompts, device=self.device, do_classifier_free_guidance=False,
                                                      max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.dtype), "attention_mask": mask.bool()}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        h, w = latents.shape[-2:]
        return flow.training_loss(latents.to(self.device, self.dtype), lambda noisy, sigma: self.predict(noisy, sigma, text),
                                  self.train_cfg, shift=self.shift, seq_len=(h // 2) * (w // 2), generator=generator)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The velocity for each sample, its prompt cut to its unmasked tokens; samples whose prompts keep as many
        tokens go through the transformer together. A model sharded over several processes (FSDP2) takes one sample
        per call, so that every process runs as many calls, hence the same collectives."""
        from torch.distributed.fsdp import FSDPModule

        b, c, h, w = noisy.shape
        packed = ChromaPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = latent_image_ids(h // 2, w // 2, self.device, self.dtype)
        embeds = text["prompt_embeds"].to(self.device, self.dtype)
        # counted on the host (cached masks are loaded there): no device sync, and one batch of equal lengths
        # indexes nothing, so the step holds no host work a CUDA graph could not replay
        lengths = text["attention_mask"].sum(1).tolist()
        groups = ([[i] for i in range(b)] if isinstance(self.transformer, FSDPModule)
                  else [[i for i, m in enumerate(lengths) if m == n] for n in sorted(set(lengths))])
        outs = []
        for group in groups:
            pick = slice(None) if len(group) == b else torch.tensor(group, device=self.device)
            n = lengths[group[0]]
            outs.append(self.transformer(
                hidden_states=packed[pick], encoder_hidden_states=embeds[pick, :n], timestep=sigma[pick].to(self.dtype),
                img_ids=img_ids, txt_ids=torch.zeros(n, 3, device=self.device, dtype=self.dtype), return_dict=False)[0])
        order = [i for group in groups for i in group]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)[torch.tensor(order, device=self.device).argsort()]
        return ChromaPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        """The blocks' Linears; with transformer_only: false also the embedders and the output projection."""
        if train_text_encoder:
            raise ValueError("train.train_text_encoder is not supported yet for chroma")
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)
                 and (n.startswith(BLOCKS) or (not transformer_only and n in OUTSIDE_BLOCKS))]
        return {"transformer": LoraTargets(self.transformer, names, [])}

    # the file is Flux's diffusers layout, `transformer.<diffusers name>`
    lora_to_file, lora_from_file = Flux.lora_to_file, Flux.lora_from_file

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it: the main file already is, but for DoRA, whose magnitudes the
        main file stores as ComfyUI's `.dora_scale`."""
        save_lora_with_diffusers(ChromaPipeline, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- full fine-tune ------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformer (or its gathered `state`) in lodestones' BFL-style single-file layout (ComfyUI's
        models/diffusion_models/chroma-unlocked-v50.safetensors)."""
        return diffusers_to_bfl(state or self.transformer.state_dict())

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        write_diffusers_folder(getattr(self, "components_root", None), folder, {"transformer": self.transformer})

    # ---- other layouts (trainer lora convert / merge): Flux's, whose names Chroma's LoRA targets keep ------------
    lora_layouts = Flux.lora_layouts
    lora_to_layout = staticmethod(Flux.lora_to_layout)

    @staticmethod
    def open_for_merge(base: str):
        """trainer lora merge into a Chroma diffusers folder (written as a folder) or BFL-style single file (as one)."""
        return open_transformer_for_merge(base, ChromaTransformer2DModel, load_chroma_single_file, diffusers_to_bfl,
                                          read_any_lora)

    # ---- previews ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: SampleRequest):
        def cut(text):  # the prompt's unmasked tokens, as predict() sees them
            n = int(text["attention_mask"].sum())
            return text["prompt_embeds"][:, :n].to(self.device, self.dtype), text["attention_mask"][:, :n].to(self.device)

        (embeds, mask), (neg, neg_mask) = cut(request.text), cut(request.neg_text or self.unconditional)
        with on_device(self.vae, self.device):
            return self.pipe(
                prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=neg_mask, width=request.width, height=request.height,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                max_sequence_length=self.max_sequence_length, generator=torch.Generator(self.device).manual_seed(request.seed),
            ).images[0]


def _as_ai_toolkit_names(model_cfg):
    """The model section with ai-toolkit's names resolved: `lodestones/Chroma` / `lodestones/Chroma/vNN` (a cached
    repo of single files) as that file, and, for a single file without extras, ai-toolkit's source of Chroma's T5,
    VAE and scheduler (a Flex.1 folder) when it is in the local HF cache."""
    from .formats import file_in_cached_repo

    file = file_in_cached_repo(model_cfg.name_or_path)
    if file is not None:
        print(f"model.name_or_path: {model_cfg.name_or_path} -> {file}")
        model_cfg = model_cfg.model_copy(update={"name_or_path": str(file)})
    if model_cfg.extras_name_or_path or resolve_model_source(model_cfg.name_or_path).kind != "single_file":
        return model_cfg
    try:
        resolve_model_source(DEFAULT_EXTRAS, key="model.extras_name_or_path")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model.name_or_path is a single file ({model_cfg.name_or_path}); set model.extras_name_or_path to a Chroma "
            f"diffusers folder (lodestones/Chroma1-HD) or a FLUX.1 / Flex.1 one for Chroma's T5, VAE and scheduler "
            f"(ai-toolkit's default, {DEFAULT_EXTRAS}, is not in the local HF cache either)") from None
    print(f"model.extras_name_or_path: {DEFAULT_EXTRAS} (ai-toolkit's source of Chroma's T5, VAE and scheduler)")
    return model_cfg.model_copy(update={"extras_name_or_path": DEFAULT_EXTRAS})


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def _t5_parts(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """Where Chroma's T5 and its tokenizer come from: model.model_paths, else the components folder's
    text_encoder/tokenizer (a Chroma folder), else its text_encoder_2/tokenizer_2 (a FLUX.1 / Flex.1 folder, whose
    text_encoder is CLIP). Anything else is an error that says where a T5 can come from."""
    if not paths.keys() & set(TEXT_PARTS) and _model_type(root / "text_encoder") != "t5" and _model_type(root / "text_encoder_2") == "t5":
        print(f"Chroma's T5: {root / 'text_encoder_2'} (a FLUX.1 / Flex.1 folder)")
        return {"text_encoder": root / "text_encoder_2", "tokenizer": root / "tokenizer_2"}
    part = {c: paths.get(c, root / c) for c in TEXT_PARTS}
    folder = part["text_encoder"] if part["text_encoder"].is_dir() else root / "text_encoder"
    kind = _model_type(folder)
    if kind != "t5":
        raise ValueError(f"{folder} holds a {kind or 'unknown'} text encoder, not Chroma's T5: point model.extras_name_or_path "
                         "at a Chroma or FLUX.1 / Flex.1 diffusers folder (e.g. lodestones/Chroma1-HD, ostris/Flex.1-alpha), "
                         "or set model.model_paths.text_encoder and .tokenizer to a T5")
    return part
