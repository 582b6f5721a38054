"""HiDream-I1 (Full, Dev, Fast) on diffusers' HiDreamImageTransformer2DModel: a sparse (mixture-of-experts) DiT
trained with flow matching on 16-channel latents, conditioned on CLIP-L + CLIP-G pooled embeddings, T5-XXL and
every layer's hidden states of Llama-3.1-8B-Instruct, encoded as diffusers' HiDreamImagePipeline encodes them.
The transformer predicts the negative of the flow velocity (the pipeline negates its output), and each variant
samples with a static shift its scheduler config names (Full 3, Dev 6, Fast 3). LoRA files in diffusers' layout
(`transformer.<diffusers name>`), which ComfyUI and HiDreamImagePipeline.load_lora_weights both apply."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import diffusers
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, LlamaForCausalLM, T5EncoderModel

from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, folder_readers, materialize, read_units
from ..common import (check_flow_model_keys, encode_latents, folder_fingerprint, load_text_encoder, load_vae,
                      on_device, resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..sources import find_tokenizer_files, resolve_folder
from . import formats
from .formats import BLOCK_LISTS
from .moe import use_grouped_experts

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
              "tokenizer_3", "scheduler"]
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
LLAMA_DEFAULT = "unsloth/Meta-Llama-3.1-8B-Instruct"  # ai-toolkit's default (the meta-llama repo is gated)


class HiDream:
    base_model_version = "hidream_i1"
    block_lists = BLOCK_LISTS  # the repeated blocks, in execution order (block swap, block-wise loading)
    # train.memory: auto keeps every block checkpointed: a 24 GiB card ran out of memory with the 3 MoE blocks kept
    # whole that the estimate (calibrated on Flux's blocks) allowed (bench/RESULTS.md, issue 11)
    plan_whole_blocks = False
    # kept in full precision when the base is quantized: the patch, timestep and pooled-text embedders and the
    # output layer are small and every token goes through them (the 49 caption projections, 0.5B weights, are not)
    quantize_exclude = ["x_embedder*", "t_embedder*", "p_embedder*", "final_layer*"]
    # T5 / Llama tokens (HiDreamImagePipeline's max_sequence_length, as ai-toolkit encodes); the Llama folder
    model_kwargs = {"max_text_length": 128, "llama_model_path": None}
    attention_kernel = "flash"  # SDPA's kernel tried first (train/attention.py): cuDNN's took 12 % more step time (H200)

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        kwargs = {**self.model_kwargs, **proc.model.model_kwargs}
        self.max_sequence_length, self.llama_path = int(kwargs["max_text_length"]), kwargs["llama_model_path"]
        check_flow_model_keys(proc, "hidream", TEXT_PARTS, not_applicable=("bypass_guidance_embedding",))

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_hidream

        return build_tiny_hidream(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None, defer_denoiser: bool = False) -> None:
        """Every component; with `defer_denoiser`, all but the transformer, which `load_denoiser()` then loads
        (the engine does so once the text embeddings are cached and the text encoders freed: Llama-3.1-8B and
        T5-XXL and the 17 B transformer do not fit a 24 GB card together)."""
        self.base = base = base or FrozenBase(self.device, self.dtype)
        single, main_root, root = resolve_roots(self.model_cfg, COMPONENTS, "transformer")
        self.components_root = root
        te_dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[self.model_cfg.vae_dtype or self.train_cfg.dtype]
        self.vae, vae_source = load_vae(self.model_cfg.vae_path, root, vae_dtype)
        self.vae.requires_grad_(False).eval().to(self.device)
        paths = {k: Path(v).expanduser() for k, v in self.model_cfg.model_paths.items()}
        part = {c: paths.get(c, root / c) for c in TEXT_PARTS}
        llama = self._llama_folder(root)

        def tokenizer(folder, files):
            return AutoTokenizer.from_pretrained(find_tokenizer_files(folder, files), local_files_only=True)
        clip_files, t5_files = [["vocab.json", "merges.txt"], ["tokenizer.json"]], [["spiece.model"], ["tokenizer.json"]]
        tokenizers = (tokenizer(part["tokenizer"], clip_files), tokenizer(part["tokenizer_2"], clip_files),
                      tokenizer(part["tokenizer_3"], t5_files), tokenizer(llama[1], ["tokenizer.json"]))
        encoders = (load_text_encoder(CLIPTextModelWithProjection, part["text_encoder"], root, "text_encoder", te_dtype),
                    load_text_encoder(CLIPTextModelWithProjection, part["text_encoder_2"], root, "text_encoder_2", te_dtype),
                    load_text_encoder(T5EncoderModel, part["text_encoder_3"], root, "text_encoder_3", te_dtype),
                    LlamaForCausalLM.from_pretrained(llama[0], torch_dtype=te_dtype, local_files_only=True))
        # The text encoders (Llama 8B, T5-XXL) are placed before the transformer loads, so that the memory plan,
        # made as it loads, counts the GPU memory they hold (unless the engine defers the transformer until the
        # embeddings are cached and the encoders freed: defer_denoiser)
        for m in encoders:
            base.te_quantizer(m.requires_grad_(False).eval())
            m.to(self.device)
        self._denoiser_source = single, main_root, root
        # Full ships UniPCMultistepScheduler, Dev and Fast FlowMatchLCMScheduler: the class its config names
        sched_cls = getattr(diffusers, json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
        scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        # The sampling pipeline shares these very modules, so previews use the in-training weights.
        self.pipe = HiDreamImagePipeline(
            scheduler=scheduler, vae=self.vae, transformer=None,
            **{name: m for name, m in zip(ENCODERS, encoders)},
            **{name.replace("text_encoder", "tokenizer"): t for name, t in zip(ENCODERS, tokenizers)})
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = self.pipe.vae_scale_factor
        folder_config = (main_root or root) / "transformer" / "config.json"
        patch = json.loads(folder_config.read_text())["patch_size"] if folder_config.is_file() else 2  # every release's
        self.bucket_divisibility = self.vae_scale_factor * patch
        self.shift = flow.FlowShift(shift=formats.static_shift(scheduler.config))
        # the empty prompt, the previews' negative once the text encoders are freed (the pipeline encodes "")
        self.unconditional = self.encode_prompts([""])
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"hidream:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*(p for p in part.values()), *llama,
                                                   extra=f"hidream:{self.max_sequence_length}:{te_dtype}:{self.dtype}")
        if not defer_denoiser:
            self.load_denoiser()

    def load_denoiser(self) -> None:
        """The transformer, block by block, each block finished (quantized, moved or kept on the host) as it
        arrives; the sampling pipeline shares it, so previews use the in-training weights."""
        single, main_root, root = self._denoiser_source
        if single:
            extra = [HiDreamImageTransformer2DModel.load_config(root / "transformer")] \
                if (root / "transformer" / "config.json").is_file() else []
            transformer = formats.load_single_file(single, self.base, extra)
        else:
            with torch.device("meta"):
                transformer = HiDreamImageTransformer2DModel.from_config(
                    HiDreamImageTransformer2DModel.load_config(main_root, subfolder="transformer", local_files_only=True))
            folder = main_root / "transformer"
            materialize(transformer, read_units(folder_readers(folder), BLOCK_LISTS), self.base, BLOCK_LISTS, str(folder))
        use_grouped_experts(transformer)  # training's MoE through grouped matmuls (moe.py)
        self.transformer = self.denoiser = self.pipe.transformer = transformer

    def _llama_folder(self, root: Path) -> tuple[Path, Path]:
        """(model folder, tokenizer folder) of Llama-3.1-8B-Instruct: model_kwargs.llama_model_path (a folder or a
        repo id in the local HF cache, as ai-toolkit reads it), else text_encoder_4 / tokenizer_4 when the HiDream
        folder bundles them, else ai-toolkit's default repo from the local HF cache."""
        if self.llama_path is None and (root / "text_encoder_4" / "config.json").is_file():
            return root / "text_encoder_4", root / "tokenizer_4"
        key = "model.model_kwargs.llama_model_path"
        try:
            folder = resolve_folder(self.llama_path or LLAMA_DEFAULT, key=key)
        except FileNotFoundError as e:
            if self.llama_path:
                raise
            raise FileNotFoundError(f"{e}. HiDream needs Llama-3.1-8B-Instruct: set {key} to its folder") from None
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{key}: {folder} is not a Llama model folder (config.json is missing)")
        return folder, folder

    def drop_text_encoders(self) -> None:
        for name in ENCODERS:
            setattr(self.pipe, name, None)

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As HiDreamImagePipeline.encode_prompt, every encoder padded to max_text_length (CLIP to at most 218):
        T5 [B, L, D], Llama's layers [B, layers, L, D] (batch first, the pipeline's is layers first), pooled CLIPs."""
        t5, _, llama, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds_t5": t5.to(self.dtype), "prompt_embeds_llama3": llama.transpose(0, 1).to(self.dtype),
                "pooled_prompt_embeds": pooled.to(self.dtype)}

    def _conditioning(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cached embeddings -> the transformer's and pipeline's text arguments."""
        get = lambda k: text[k].to(self.device, self.dtype)
        return {"t5": get("prompt_embeds_t5"), "llama3": get("prompt_embeds_llama3").transpose(0, 1),
                "pooled": get("pooled_prompt_embeds")}

    def _check_size(self, h: int, w: int, what: str) -> None:
        """diffusers pads a non-square latent to the transformer's max_seq patches (max_resolution: 1024 x 1024 px
        of area for the released model); a larger one has no room."""
        p = self.transformer.config.patch_size
        if h != w and (h // p) * (w // p) > self.transformer.max_seq:
            side = int(math.sqrt(self.transformer.max_seq)) * p * self.vae_scale_factor
            raise ValueError(f"{what}: HiDream takes non-square images of at most {side} x {side} px of area; "
                             f"{w * self.vae_scale_factor} x {h * self.vae_scale_factor} is larger (use a smaller "
                             "resolution, or a square one)")

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        h, w = latents.shape[-2:]
        p = self.transformer.config.patch_size
        self._check_size(h, w, "datasets resolution")
        cond = self._conditioning(text)
        return flow.training_loss(latents.to(self.device, self.dtype), lambda noisy, sigma: self.predict(noisy, sigma, cond),
                                  self.train_cfg, shift=self.shift, seq_len=(h // p) * (w // p), generator=generator)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flow velocity (noise - x0). HiDream's transformer outputs its negative, which HiDreamImagePipeline
        negates before each scheduler step; so does this."""
        b, c, h, w = noisy.shape
        out = self.transformer(hidden_states=noisy, timesteps=(sigma * 1000).to(self.dtype),
                               encoder_hidden_states_t5=cond["t5"], encoder_hidden_states_llama3=cond["llama3"],
                               pooled_embeds=cond["pooled"], return_dict=False)[0]
        if self.transformer.training and not self.transformer.config.force_inference_output:
            # in training mode (the only one in which gradients reach the routed experts) diffusers returns the
            # patch sequence [B, C, tokens (padded to max_seq when non-square), p*p]; back to [B, C, H, W]
            p = self.transformer.config.patch_size
            out = (out[:, :, : (h // p) * (w // p)].reshape(b, c, h // p, w // p, p, p)
                   .permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w))
        return -out

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        if train_text_encoder:
            raise ValueError("train.train_text_encoder is not supported for hidream (ai-toolkit: 'wont work with "
                             "hidream'); remove it")
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        blocks = tuple(f"{b}." for b in BLOCK_LISTS)
        return {"transformer": LoraTargets(self.transformer, [n for n in names if n.startswith(blocks)]
                                           if transformer_only else names, [])}

    def lora_to_file(self, states):
        return formats.lora_to_file(states["transformer"])

    def lora_from_file(self, tensors):
        return {"transformer": formats.lora_from_file(tensors)}

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it (DoRA magnitudes as peft's `lora_magnitude_vector`, alpha as
        metadata); for a plain LoRA the main file already loads in diffusers."""
        save_lora_with_diffusers(HiDreamImagePipeline, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- other layouts and merging (trainer lora convert / merge) ---------------------------------
    # diffusers: ours (`transformer.<name>`); comfy: `diffusion_model.<name>`; kohya: `lora_unet_<name with _>`
    # (ComfyUI's generic rules; its names are diffusers'). SimpleTuner's `lycoris_<name with _>` is read too.
    lora_layouts = ("diffusers", "comfy", "kohya")
    lora_to_layout = staticmethod(formats.lora_to_layout)

    @staticmethod
    def open_for_merge(base: str):
        """trainer lora merge: ({component: module or state dict}, write(output), read(file tensors) -> states) for
        the base as the user keeps it: a diffusers folder is written as a folder (the other components linked or
        copied), a single file (ComfyUI's diffusion_models/hidream_i1_*.safetensors) as one, with its prefix and any
        other tensors it holds. A single file's weights are merged by name: no config is needed."""
        from safetensors.torch import save_file

        from ..blockwise import FLOAT8
        from ..sources import load_state_dict_file, resolve_model_source

        read = lambda tensors: {"transformer": formats.lora_from_file(tensors)}
        src = resolve_model_source(base, key="--base")
        if src.kind == "single_file":
            sd = load_state_dict_file(src.path)
            prefix, names = formats.strip_prefix(sd)
            formats.require_transformer(names, f"--base {src.path}")
            state = {k: sd[prefix + k] for k in names}  # the same tensors: merged in place, written with the rest
            if any(v.dtype in FLOAT8 for v in state.values()):
                raise ValueError(f"--base {src.path}: a float8 model; merge into its bf16/fp16 release and quantize after")

            def write(out: Path) -> None:
                save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt"})
            return {"transformer": state}, write, read
        root = Path(src.path)
        reader = next(iter(folder_readers(root / "transformer").values()))
        dtype = next(reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point)  # as stored
        model = HiDreamImageTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype,
                                                               local_files_only=True)
        return {"transformer": model}, lambda out: write_diffusers_folder(root, out, {"transformer": model}), read

    # ---- full fine-tune ------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformer (or its gathered `state`) as ComfyUI's diffusion_models/hidream_i1_*.safetensors holds
        it: diffusers' names, no prefix (see formats)."""
        return dict(state or self.transformer.state_dict())

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        write_diffusers_folder(getattr(self, "components_root", None), folder, {"transformer": self.transformer})

    # ---- previews ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: SampleRequest):
        width, height = request.width, request.height
        self._check_size(height // self.vae_scale_factor, width // self.vae_scale_factor, "sample width/height")
        cond, neg = self._conditioning(request.text), self._conditioning(request.neg_text or self.unconditional)
        self.pipe.default_sample_size = _sample_size_keeping(width, height, self.vae_scale_factor)
        with on_device(self.vae, self.device):
            return self.pipe(
                prompt_embeds_t5=cond["t5"], prompt_embeds_llama3=cond["llama3"], pooled_prompt_embeds=cond["pooled"],
                negative_prompt_embeds_t5=neg["t5"], negative_prompt_embeds_llama3=neg["llama3"],
                negative_pooled_prompt_embeds=neg["pooled"], width=width, height=height,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                max_sequence_length=self.max_sequence_length,
                generator=torch.Generator(self.device).manual_seed(request.seed),
            ).images[0]


def _sample_size_keeping(width: int, height: int, vae_scale_factor: int) -> int:
    """HiDreamImagePipeline scales every request to an area of (default_sample_size x vae scale factor)² pixels,
    then rounds each side down to its multiple of 2 x vae scale factor: the default_sample_size for which that
    gives back (width, height)."""
    division = 2 * vae_scale_factor
    start = math.ceil(math.sqrt(width * height) / vae_scale_factor)
    for size in range(start, start + 4):
        scale = math.sqrt((size * vae_scale_factor) ** 2 / (width * height))
        if (int(width * scale // division * division), int(height * scale // division * division)) == (width, height):
            return size
    raise ValueError(f"sample width/height {width} x {height}: HiDreamImagePipeline cannot keep this size (sides must "
                     f"be multiples of {division}, the aspect ratio within 4:1)")
