"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo) on diffusers' SD3Transformer2DModel (MMDiT): flow
matching on 16-channel latents, conditioned on CLIP-L + CLIP-G penultimate states beside T5 (zeros without
T5, as diffusers' pipeline does) and the two CLIPs' pooled embeddings. LoRA files in diffusers' layout
(`transformer.<diffusers name>`), which ComfyUI's SD3 loader and diffusers' `load_lora_weights` both read."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, finish_loaded, folder_readers, materialize, read_units
from ..common import (check_flow_model_keys, encode_latents, folder_fingerprint, load_text_encoder, load_vae,
                     on_device, resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..sources import find_tokenizer_files, resolve_model_source

# text_encoder_3 / tokenizer_3 (T5) are optional: a folder without them conditions on zeros in T5's place
COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
T5_PARTS = ("text_encoder_3", "tokenizer_3")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
BLOCK_LISTS = ("transformer_blocks",)
FILE_PREFIX = "transformer."  # diffusers' SD3 LoRA layout, which ComfyUI's SD3 loader also maps


class SD3:
    base_model_version = "sd3"
    block_lists = BLOCK_LISTS  # the repeated MMDiT blocks, in execution order (block swap, block-wise loading)
    # kept in full precision when the base is quantized: patch/text/time embedders and the output projection are
    # small and every token goes through them
    quantize_exclude = ["pos_embed*", "context_embedder", "time_text_embed*", "norm_out*", "proj_out"]
    model_kwargs = {"max_text_length": 256}  # T5 tokens, as diffusers' StableDiffusion3Pipeline default

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        self.max_sequence_length = int({**self.model_kwargs, **proc.model.model_kwargs}["max_text_length"])
        if proc.network is None:  # refused before loading, rather than at the first save (full_to_file)
            raise ValueError("a full fine-tune (no network section) is not supported yet for sd3: its single-file "
                             "(SAI MMDiT) layout is not written yet; add a network section (lora, lokr, ...)")
        check_flow_model_keys(proc, "sd3", TEXT_PARTS, not_applicable=("bypass_guidance_embedding",))

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_sd3

        return build_tiny_sd3(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base or FrozenBase(self.device, self.dtype)
        for key, value in (("model.name_or_path", self.model_cfg.name_or_path),
                           ("model.extras_name_or_path", self.model_cfg.extras_name_or_path)):
            if value and resolve_model_source(value, key=key).kind == "single_file":
                raise ValueError(f"{key}: single-file checkpoints are not supported yet for sd3; "
                                 "use a diffusers folder (e.g. stabilityai/stable-diffusion-3.5-medium)")
        _, main_root, root = resolve_roots(self.model_cfg, COMPONENTS, "transformer")
        self.components_root = root
        te_dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[self.model_cfg.vae_dtype or self.train_cfg.dtype]
        vae, vae_source = load_vae(self.model_cfg.vae_path, root, vae_dtype)
        paths = {k: Path(v).expanduser() for k, v in self.model_cfg.model_paths.items()}
        part = {c: paths.get(c, root / c) for c in TEXT_PARTS}
        with torch.device("meta"):  # filled block by block, each block finished (quantized, moved) as it arrives
            transformer = SD3Transformer2DModel.from_config(
                SD3Transformer2DModel.load_config(main_root, subfolder="transformer", local_files_only=True))
        folder = main_root / "transformer"
        materialize(transformer, read_units(folder_readers(folder), BLOCK_LISTS), self.base, BLOCK_LISTS, str(folder))

        def clip(name, tok):
            return (load_text_encoder(CLIPTextModelWithProjection, part[name], root, name, te_dtype),
                    AutoTokenizer.from_pretrained(find_tokenizer_files(part[tok], [["vocab.json", "merges.txt"], ["tokenizer.json"]]),
                                                  local_files_only=True))
        te1, tok1 = clip("text_encoder", "tokenizer")
        te2, tok2 = clip("text_encoder_2", "tokenizer_2")
        te3 = tok3 = None
        if "text_encoder_3" in paths and not paths["text_encoder_3"].exists():
            raise FileNotFoundError(f"model.model_paths.text_encoder_3: {paths['text_encoder_3']} does not exist")
        if part["text_encoder_3"].exists():  # else zeros in T5's place, as diffusers' pipeline does
            te3 = load_text_encoder(T5EncoderModel, part["text_encoder_3"], root, "text_encoder_3", te_dtype)
            tok3 = AutoTokenizer.from_pretrained(find_tokenizer_files(part["tokenizer_3"], [["spiece.model"], ["tokenizer.json"]]),
                                                 local_files_only=True)
        self.attach(transformer=transformer, vae=vae, text_encoders=(te1, te2, te3), tokenizers=(tok1, tok2, tok3),
                    scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True))
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"sd3:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*(p for p in part.values() if p.exists()),
                                                   extra=f"sd3:{self.max_sequence_length}:{te_dtype}:{self.dtype}")

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
        return {FILE_PREFIX + k: v for k, v in states["transformer"].items()}

    def lora_from_file(self, tensors):
        bad = [k for k in tensors if not k.startswith(FILE_PREFIX)]
        if bad:
            raise ValueError(f"not a diffusers-layout SD3 LoRA (key '{bad[0]}' lacks the '{FILE_PREFIX}' prefix)")
        return {"transformer": {k[len(FILE_PREFIX):]: v for k, v in tensors.items()}}

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it (DoRA magnitudes as peft's `lora_magnitude_vector`)."""
        save_lora_with_diffusers(StableDiffusion3Pipeline, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- full fine-tune ------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        raise ValueError("save.save_format: the single-file (SAI MMDiT) layout is not supported yet for sd3; "
                         "use save_format: diffusers")

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        write_diffusers_folder(getattr(self, "components_root", None), folder, {"transformer": self.transformer})

    lora_layouts: tuple[str, ...] = ()  # trainer lora convert/merge: not yet for sd3

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
