"""Wan 2.1 text-to-video (1.3B, 14B) on diffusers' WanTransformer3DModel: flow matching on the Wan VAE's 16-channel
video latents (8x spatial, 4x temporal: F = 4k + 1 frames give 1 + k latent frames; an image is one frame),
normalised with the VAE config's latents_mean / latents_std as WanPipeline does, conditioned on UMT5-XXL states
padded with zeros to 512 tokens (WanPipeline's encoding). Training and sampling use the shift of the folder's
scheduler (UniPC over flow sigmas, flow_shift 3.0 in the T2V diffusers repos; 5.0 is Wan's choice for 720p).

Loads diffusers folders and the original-layout single files ComfyUI keeps (formats.py), the text encoder and VAE
also from model.model_paths (`text_encoder`: umt5_xxl_*.safetensors, `vae`: wan_2.1_vae.safetensors). LoRA files in
the original layout (`diffusion_model.blocks.0.self_attn.q...`), which ComfyUI's Wan models and
WanPipeline.load_lora_weights both apply; full fine-tunes as an original-layout single file."""
from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from transformers import AutoTokenizer, UMT5EncoderModel

from ...objectives import flow
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, folder_readers, materialize, read_units
from ..common import (check_flow_model_keys, folder_fingerprint, load_text_encoder, load_vae, on_device,
                      resolve_roots, save_lora_with_diffusers, write_diffusers_folder)
from ..sources import find_tokenizer_files, resolve_model_source
from . import formats
from .formats import BLOCK_LISTS, TRANSFORMER_CLS

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
MODEL_PATHS = ("text_encoder", "tokenizer", "vae")  # what model.model_paths may name
# the Linears outside the blocks that both ComfyUI (original names) and diffusers' Wan LoRA converter map
OUTSIDE_BLOCKS = ("condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
                  "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                  "condition_embedder.time_proj", "proj_out")


class Wan21:
    base_model_version = "wan_2.1"
    block_lists = BLOCK_LISTS  # the repeated blocks, in execution order (block swap, block-wise loading)
    # kept in full precision when the base is quantized: the patch, text and time embedders and the output layer are
    # small and every token goes through them
    quantize_exclude = ["patch_embedding", "condition_embedder*", "proj_out"]
    model_kwargs = {"max_text_length": 512}  # UMT5 tokens, as WanPipeline's default
    attention_kernel = "cudnn"  # SDPA's kernel tried first (train/attention.py): 31 % less step time than flash (1.3B, H200)
    # frame counts the VAE takes: 4k + 1 (images are 1 frame); pixels [B, 3, F, H, W]
    frame_rule = (4, 1)
    # blocks kept whole measured 23.4 activation units each (1.3B, 832x480x81, H200), above the estimate's 21, and
    # saved 0.8 % of the step per block: the memory plan checkpoints every block
    plan_whole_blocks = False
    # the I2V and VACE subclasses (i2v.py, vace.py) change these
    variant, pipeline_cls, model_paths, outside_blocks = "t2v", WanPipeline, MODEL_PATHS, OUTSIDE_BLOCKS

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg = proc.model, proc.train
        self.device, self.dtype = device, dtype
        self.max_sequence_length = int({**self.model_kwargs, **proc.model.model_kwargs}["max_text_length"])
        check_flow_model_keys(proc, formats.ARCH_OF[self.variant], self.model_paths, not_applicable=("bypass_guidance_embedding",))
        if "vae" in proc.model.model_paths and proc.model.vae_path:
            raise ValueError("model.vae_path and model.model_paths.vae both name the VAE; keep one")

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_wan21

        return build_tiny_wan21(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base = base or FrozenBase(self.device, self.dtype)
        cfg = self.model_cfg
        paths = {k: Path(v).expanduser() for k, v in cfg.model_paths.items()}
        for key, path in paths.items():
            if not path.exists():
                raise FileNotFoundError(f"model.model_paths.{key}: {path} does not exist")
        vae_path = cfg.vae_path or (str(paths["vae"]) if "vae" in paths else None)
        elsewhere = ({"text_encoder"} & set(paths)) | ({"vae"} if vae_path else set())
        single, main_root, root = resolve_roots(cfg, COMPONENTS, "transformer", tuple(elsewhere))
        self.components_root = root
        te_dtype = DTYPES[cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[cfg.vae_dtype or self.train_cfg.dtype]
        self.vae, vae_source = load_vae(vae_path, root, vae_dtype, cls=AutoencoderKLWan)
        self.vae.requires_grad_(False).eval().to(self.device)
        te_source = paths.get("text_encoder", root / "text_encoder")
        tokenizer_folder = paths.get("tokenizer", root / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_files(tokenizer_folder, [["spiece.model"], ["tokenizer.json"]]),
                                                  local_files_only=True)
        # The text encoder (UMT5-XXL, 11 GB in bf16) is placed before the transformer loads, so that the memory plan,
        # made as it loads, counts the GPU memory it holds until the embeddings are cached and it is freed
        self.text_reload = (lambda: load_text_encoder(UMT5EncoderModel, te_source, root, "text_encoder", te_dtype)) \
            if "text_encoder" in paths else None
        text_encoder = load_text_encoder(UMT5EncoderModel, te_source, root, "text_encoder", te_dtype)
        base.te_quantizer(text_encoder.requires_grad_(False).eval())
        text_encoder.to(self.device)
        if single:
            config = root / "transformer" / "config.json"
            transformer = formats.load_single_file(single, base, json.loads(config.read_text()) if config.is_file() else None,
                                                   want=self.variant)
        else:
            cls = TRANSFORMER_CLS[self.variant]
            config = cls.load_config(main_root, subfolder="transformer", local_files_only=True)
            formats.check_variant(formats.config_variant(config), main_root, self.variant)
            with torch.device("meta"):  # filled block by block, each block finished (quantized, moved) as it arrives
                transformer = cls.from_config(config)
            folder = main_root / "transformer"
            rope = formats.computed_buffers(transformer)
            materialize(transformer, chain(read_units(folder_readers(folder), self.block_lists), [rope]), base,
                        self.block_lists, str(folder), exact=frozenset(rope))
        self.transformer = self.denoiser = transformer
        # the Wan repos ship UniPCMultistepScheduler (flow sigmas); the class the config names
        sched_cls = getattr(diffusers, json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
        scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        # The sampling pipeline shares these very modules, so previews use the in-training weights.
        self.pipe = self.pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=self.vae, scheduler=scheduler,
                                      transformer=transformer, **self.load_image_encoder(root, paths))
        self.pipe.set_progress_bar_config(disable=True)
        p = transformer.config.patch_size
        self.bucket_divisibility = self.pipe.vae_scale_factor_spatial * p[1]  # 8 x 2
        self.shift = flow.FlowShift.from_scheduler(scheduler.config)
        # the empty prompt, the previews' negative once the text encoder is freed (the pipeline encodes "")
        self.unconditional = self.encode_prompts([""])
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"wan21:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*dict.fromkeys([te_source, tokenizer_folder]),
                                                   extra=f"wan21:{self.max_sequence_length}:{te_dtype}:{self.dtype}")

    def load_image_encoder(self, root: Path, paths: dict[str, Path]) -> dict:
        """The pipeline's image-conditioning components (none for T2V)."""
        return {}

    def drop_text_encoders(self) -> None:
        self.pipe.text_encoder = None

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] (or [B, 3, H, W]: one frame) in [-1, 1] -> [B, 16, 1 + (F - 1) // 4, H / 8, W / 8], the
        posterior's mode normalised with the VAE's latents_mean / latents_std (as WanPipeline un-normalises)."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        a, b = self.frame_rule
        if (pixels.shape[2] - b) % a:
            raise ValueError(f"{pixels.shape[2]} frames: the Wan VAE takes {a}k + {b} frames (1, 5, 9, ..., 81)")
        vae = self.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        latents = ((latents - mean) / std).to(self.dtype)
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"the VAE produced NaN/inf latents in {vae.dtype}; set model.vae_dtype: fp32")
        return latents

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """UMT5's last states of each prompt, zeros after its last token up to max_text_length (WanPipeline's)."""
        # WanPipeline's encoding for every variant: WanImageToVideoPipeline's is the same but needs ftfy installed
        embeds = WanPipeline._get_t5_prompt_embeds(self.pipe, prompt=prompts, device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.dtype)}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        if latents.dim() == 4:  # [B, C, h, w] of an image: one latent frame
            latents = latents.unsqueeze(2)
        return self.flow_loss(latents, lambda noisy, sigma: self.predict(noisy, sigma, text), generator)

    def flow_loss(self, latents: torch.Tensor, predict, generator) -> torch.Tensor:
        f, h, w = latents.shape[-3:]
        pt, ph, pw = self.transformer.config.patch_size
        return flow.training_loss(latents.to(self.device, self.dtype), predict, self.train_cfg, shift=self.shift,
                                  seq_len=(f // pt) * (h // ph) * (w // pw), generator=generator)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: dict[str, torch.Tensor], **conditions) -> torch.Tensor:
        """The transformer's prediction; `conditions`: its further inputs (I2V's image embedding, VACE's control)."""
        return self.transformer(hidden_states=noisy, timestep=sigma.float() * 1000,  # the scheduler's 0..1000 timesteps
                                encoder_hidden_states=text["prompt_embeds"].to(self.device, self.dtype),
                                return_dict=False, **conditions)[0]

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        """The blocks' Linears; with transformer_only: false also the text/time embedders and the output layer."""
        if train_text_encoder:
            raise ValueError("train.train_text_encoder is not supported for wan21 (UMT5-XXL); remove it")
        blocks = tuple(f"{b}." for b in self.block_lists)
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)
                 and (n.startswith(blocks) or (not transformer_only and n in self.outside_blocks))]
        return {"transformer": LoraTargets(self.transformer, names, [])}

    def lora_to_file(self, states):
        return formats.lora_to_file(states["transformer"])

    def lora_from_file(self, tensors):
        return {"transformer": formats.lora_from_file(tensors)}

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The LoRA as diffusers' own saver writes it (DoRA magnitudes as peft's `lora_magnitude_vector`); for a plain
        LoRA the main file already loads in WanPipeline, which converts the original layout itself."""
        save_lora_with_diffusers(self.pipeline_cls, path, {"transformer_lora": modules["transformer"]}, dtype)

    # ---- other layouts and merging (trainer lora convert / merge) ---------------------------------
    lora_layouts = ("comfy", "diffusers", "kohya")
    lora_to_layout = staticmethod(formats.lora_to_layout)

    @classmethod
    def open_for_merge(cls, base: str):
        """trainer lora merge into a Wan diffusers folder (written as a folder) or original-layout single file (as one)."""
        from safetensors.torch import save_file

        from ..sources import load_state_dict_file

        read = lambda tensors: {"transformer": formats.lora_from_file(tensors)}
        src = resolve_model_source(base, key="--base")
        if src.kind == "single_file":
            sd = load_state_dict_file(src.path)
            prefix, names = formats.strip_prefix(sd)
            formats.require_variant(names, f"--base {src.path}", cls.variant)
            if any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in sd.values()):
                raise ValueError(f"--base {src.path}: a float8 model; merge into its bf16/fp16 release and quantize after")
            state = {formats.to_diffusers(k): sd[prefix + k] for k in names}

            def write(out: Path) -> None:
                save_file({prefix + k: v.contiguous() for k, v in formats.diffusers_to_original(state).items()}, str(out))
            return {"transformer": state}, write, read
        root = Path(src.path)
        reader = next(iter(folder_readers(root / "transformer").values()))
        dtype = next(reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point)  # as stored
        model = TRANSFORMER_CLS[cls.variant].from_pretrained(root, subfolder="transformer", torch_dtype=dtype,
                                                             local_files_only=True)
        return {"transformer": model}, lambda out: write_diffusers_folder(root, out, {"transformer": model}), read

    # ---- full fine-tune ------------------------------------------------------------------------
    full_component = "transformer"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformer (or its gathered `state`) in the original layout, as ComfyUI's
        diffusion_models/wan2.1_t2v_14B_bf16.safetensors holds it (no prefix)."""
        return formats.diffusers_to_original(state or self.transformer.state_dict())

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        """The components folder with this transformer, named as this variant's pipeline (the components may come
        from another variant's folder); a text encoder that came from model.model_paths is written too, and I2V's
        image encoder and processor always."""
        modules = {"transformer": self.transformer, **self.image_components()}
        if getattr(self, "text_reload", None) is not None:
            modules["text_encoder"] = self.pipe.text_encoder or self.text_reload()
        write_diffusers_folder(getattr(self, "components_root", None), folder, modules, pipeline_cls=self.pipeline_cls)

    def image_components(self) -> dict:
        """The pipeline's image-conditioning components as loaded (none for T2V)."""
        return {}

    # ---- previews ------------------------------------------------------------------------------
    def sample_inputs(self, request: SampleRequest) -> dict:
        """What else the pipeline takes for this sample (I2V: the start image)."""
        return {}

    @torch.no_grad()
    def generate(self, request: SampleRequest):
        """A still (num_frames 1), else the video's frames (WanPipeline rounds the count to 4k + 1)."""
        neg = request.neg_text or self.unconditional
        with on_device(self.vae, self.device):
            frames = self.pipe(
                prompt_embeds=request.text["prompt_embeds"].to(self.device, self.dtype),
                negative_prompt_embeds=neg["prompt_embeds"].to(self.device, self.dtype),
                height=request.height, width=request.width, num_frames=request.num_frames,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                max_sequence_length=self.max_sequence_length, output_type="pil",
                generator=torch.Generator(self.device).manual_seed(request.seed), **self.sample_inputs(request),
            ).frames[0]
        return frames[0] if request.num_frames == 1 else frames
