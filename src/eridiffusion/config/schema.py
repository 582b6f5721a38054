"""ai-toolkit's YAML schema, typed (ai-toolkit 0.12.26; see the shared ai-toolkit config reference, section 1).

Every key ai-toolkit reads is known here. Keys the engine honours are fields with ai-toolkit's defaults;
the rest sit in per-section `unsupported` tables and are accepted only at ai-toolkit's default, so a config
that spells a default out still runs while one that asks for a missing feature fails at load.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config problem; the message names the file and the key path (`config.process[0].train.lr`)."""


def not_supported(value: Any, hint: str, key: str = "") -> PydanticCustomError:
    """Error for a known ai-toolkit value EriDiffusion cannot honour yet; `key` extends the error's location."""
    return PydanticCustomError("not_supported", "not supported yet", {"key": key, "value": value, "hint": hint})


def supported_hint(values: tuple) -> str:
    if len(values) == 1 and (values[0] is None or values[0] is False or values[0] in ("", [], {})):
        return "EriDiffusion does not support it yet; remove the key"
    shown = ", ".join(repr(v) for v in values)
    return f"EriDiffusion supports only {shown} for now" + ("; remove the key" if len(values) == 1 else "")


class Section(BaseModel):
    """One YAML mapping. Subclasses describe their ai-toolkit keys with three tables (data, not code)."""

    model_config = ConfigDict(extra="forbid")

    # known ai-toolkit key -> the only value accepted for now (its ai-toolkit default). At that value the key
    # is dropped; any other value stays and fails as an extra key, reported as "not supported yet".
    unsupported: ClassVar[dict[str, Any]] = {}
    # declared field -> the values honoured for now (strings compared case-insensitively)
    limited: ClassVar[dict[str, tuple]] = {}
    # legacy ai-toolkit spelling -> current key
    renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def known_keys(cls) -> list[str]:
        return [*cls.model_fields, *cls.unsupported, *cls.renamed]

    @model_validator(mode="before")
    @classmethod
    def _drop_defaults_and_renames(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                value = data.pop(old)
                if new in data and data[new] != value:
                    raise ValueError(f"both '{old}' (legacy spelling) and '{new}' are set; keep only '{new}'")
                data[new] = value
        for key, default in cls.unsupported.items():
            # None, False, 0, "" and empty lists all mean "off" in ai-toolkit
            if key in data and (data[key] == default or not (data[key] or default)):
                del data[key]
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _honoured_value(cls, value: Any, info: ValidationInfo) -> Any:
        honoured = cls.limited.get(info.field_name)
        if honoured is None:
            return value
        value = value.lower() if isinstance(value, str) else value
        if value not in honoured:
            raise not_supported(value, supported_hint(honoured))
        return value


# dtype spellings ai-toolkit accepts -> our short name; the save section writes the long name
_DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
           "fp32": "fp32", "float": "fp32", "float32": "fp32"}
_LONG_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _short_dtype(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    name = value.lower()
    if name in _DTYPES:
        return _DTYPES[name]
    if name.startswith(("float8", "fp8")):
        raise not_supported(value, "EriDiffusion supports fp16, bf16 and fp32 for now")
    raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(_DTYPES)}")


# sd-scripts style inline prompt flags -> sample item field and type
_PROMPT_FLAGS: dict[str, tuple[str, type]] = {
    "n": ("neg", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int), "seed": ("seed", int),
    "l": ("guidance_scale", float), "cfg": ("guidance_scale", float), "s": ("sample_steps", int),
    "steps": ("sample_steps", int), "m": ("network_multiplier", float), "network_multiplier": ("network_multiplier", float),
    "frames": ("num_frames", int), "num_frames": ("num_frames", int), "fps": ("fps", int),
    "ctrl_img": ("ctrl_img", str),
}


def parse_prompt_flags(text: str) -> tuple[str, dict[str, Any]]:
    """'a cat --w 768 --n blurry' -> ('a cat', {'width': 768, 'neg': 'blurry'})."""
    prompt, *chunks = re.split(r"(?:^|\s)--(?=[A-Za-z])", text)
    overrides: dict[str, Any] = {}
    for chunk in chunks:
        flag, _, value = chunk.strip().partition(" ")
        if flag not in _PROMPT_FLAGS:
            known = " ".join(f"--{f}" for f in _PROMPT_FLAGS)
            raise ConfigError(f"unknown or unsupported prompt flag --{flag} in {text!r} (known: {known})")
        key, kind = _PROMPT_FLAGS[flag]
        try:
            overrides[key] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"prompt flag --{flag} expects {kind.__name__}, got {value.strip()!r} in {text!r}") from None
    return prompt.strip(), overrides


class NetworkKwargs(Section):
    only_if_contains: list[str] | None = None
    ignore_if_contains: list[str] | None = None
    rank_dropout: float | None = Field(None, ge=0, lt=1)  # LoHa / LoKr (peft has them for those only)
    module_dropout: float | None = Field(None, ge=0, lt=1)
    unsupported = {"full_if_contains": None, "parameter_threshold": 0.0,
                   "target_lin_modules": None, "block_dims": None, "block_alphas": None, "conv_block_dims": None,
                   "conv_block_alphas": None, "full_train_in_out": False}


class NetworkConfig(Section):
    type: str = "lora"
    linear: int | None = Field(None, ge=1)  # 4 when neither linear nor rank is set
    linear_alpha: float | None = Field(None, gt=0)  # defaults to alpha
    alpha: float = Field(1.0, gt=0)
    conv: int | None = Field(None, ge=1)
    conv_alpha: float | None = Field(None, gt=0)  # defaults to conv
    dropout: float | None = Field(None, ge=0, lt=1)
    network_kwargs: NetworkKwargs = Field(default_factory=NetworkKwargs)
    transformer_only: bool = True
    lokr_full_rank: bool = True  # type lokr: both Kronecker factors full matrices (ai-toolkit sets every rank/alpha to 9999999999)
    lokr_factor: int = -1  # type lokr: Kronecker factor; -1 = the largest factor not above the square root
    pretrained_lora_path: str | None = None  # start from this adapter file (same type and ranks) instead of zero
    limited = {"type": ("lora", "locon", "lycoris", "dora", "loha", "lokr")}
    renamed = {"rank": "linear"}
    unsupported = {"lorm": None, "old_lokr_format": False,
                   "split_multistage_loras": True, "layer_offloading": False,
                   "all_layers": False, "normalize": False}

    @model_validator(mode="after")
    def _fill(self) -> NetworkConfig:
        self.type = "locon" if self.type == "lycoris" else self.type  # ai-toolkit's two names for LyCORIS LoCon
        self.linear = 4 if self.linear is None else self.linear
        self.linear_alpha = self.alpha if self.linear_alpha is None else self.linear_alpha
        if self.type == "locon" and self.conv is None:  # LoCon: the conv layers too, at the Linear rank unless set
            self.conv = self.linear
            self.conv_alpha = self.linear_alpha if self.conv_alpha is None else self.conv_alpha
        self.conv_alpha = self.conv if self.conv_alpha is None else self.conv_alpha
        if self.type == "lokr" and self.lokr_full_rank:  # as ai-toolkit: no low-rank factor, scale 1
            full = 9999999999
            self.linear = self.linear_alpha = full
            if self.conv:
                self.conv = self.conv_alpha = full
        return self


class SaveConfig(Section):
    save_every: int = Field(1000, ge=1)
    dtype: str = "float16"  # normalised to float16 / bfloat16 / float32
    max_step_saves_to_keep: int = Field(5, ge=1)
    save_format: str = "safetensors"
    # EriDiffusion's: also write each LoRA in diffusers/peft layout as <file>.diffusers.safetensors (for
    # architectures whose native layout is another one, e.g. kohya's for UNets)
    diffusers_lora: bool = False
    limited = {"save_format": ("safetensors", "diffusers")}
    unsupported = {"push_to_hub": False, "hf_repo_id": None, "hf_private": False}

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> Any:
        short = _short_dtype(value)
        return _LONG_DTYPES.get(short, short)


class DatasetConfig(Section):
    type: str = "image"
    folder_path: str
    caption_ext: str = ".txt"
    default_caption: str | None = None
    trigger_word: str | None = None  # filled from the process trigger_word
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    shuffle_tokens: bool = False
    token_dropout_rate: float = Field(0.0, ge=0, le=1)
    keep_tokens: int = Field(0, ge=0)
    num_repeats: int = Field(1, ge=1)
    flip_x: bool = False
    flip_y: bool = False
    resolution: list[PositiveInt] = Field(default_factory=lambda: [512], min_length=1)
    buckets: bool = True
    random_crop: bool = False
    scale: float = Field(1.0, gt=0)
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = False
    batch_size: int | None = Field(None, ge=1)  # filled from train.batch_size
    loss_multiplier: float = Field(1.0, ge=0)
    # video (for architectures that take clips; an image model refuses num_frames > 1): clips of at most
    # num_frames frames (snapped to the counts the model's VAE takes), spread over the whole clip
    # (shrink_video_to_frames) or taken at `fps` from a random start; auto_frame_count: as long as the clip
    # lasts at `fps`, its tail trimmed (trim_auto_frame_count_tail) or the clip spread over the count
    num_frames: int = Field(1, ge=1)
    shrink_video_to_frames: bool = True
    fps: float = Field(24, gt=0)
    auto_frame_count: bool = False
    trim_auto_frame_count_tail: bool = True
    # same-stem control images or clips, fitted exactly as their image or clip (video architectures for now)
    control_path: str | None = None
    control_transparent_color: list[int] = Field(default_factory=lambda: [0, 0, 0], min_length=3, max_length=3)
    # ai-toolkit's "train this dataset image-to-video": only architectures that condition clips on their first frame
    # accept true, and there it changes nothing (they condition every clip, as ai-toolkit's do)
    do_i2v: bool = False
    limited = {"type": ("image",), "buckets": (True,)}
    renamed = {"dataset_path": "folder_path", "caption_type": "caption_ext"}
    unsupported = {
        "is_reg": False, "network_weight": 1.0, "num_workers": 2, "prior_reg": False, "random_triggers": [], "random_triggers_max": 1,
        "random_scale": False, "bucket_tolerance": 64, "augments": [], "augmentations": None,
        "shuffle_augmentations": False, "control_path_1": None, "control_path_2": None,
        "control_path_3": None, "control_from_same_folder": False, "num_controls_from_same_folder": 1,
        "inpaint_path": None, "full_size_control_images": True,
        "controls": [], "alpha_mask": False, "mask_path": None, "invert_mask": False, "mask_min_value": 0.0,
        "unconditional_path": None, "poi": None, "use_short_captions": False, "cache_tensors_to_disk": False,
        "cache_clip_vision_to_disk": False, "load_image_when_caching_latents": False, "standardize_images": False,
        "clip_image_path": None, "clip_image_from_same_folder": False, "clip_image_augmentations": None,
        "clip_image_shuffle_augmentations": False, "replacements": [], "cache_latents_num_workers": None,
        "extra_values": [], "square_crop": False, "replay_transforms": True,
        "debug": False, "fast_image_size": False, "do_audio": False, "audio_preserve_pitch": False,
        "audio_normalize": False, "guidance_type": "targeted", "diff_output_preservation": False,
        "diff_output_preservation_class": "",
    }

    @field_validator("caption_ext")
    @classmethod
    def _dot(cls, value: str) -> str:
        return value if value.startswith(".") else f".{value}"

    @field_validator("resolution", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("control_path", mode="before")
    @classmethod
    def _one_control(cls, value: Any) -> Any:
        if isinstance(value, list):  # ai-toolkit takes several folders (several controls per item)
            if len(value) > 1:
                raise not_supported(value, "EriDiffusion takes one control_path folder for now")
            return value[0] if value else None
        return value

    @field_validator("control_transparent_color")
    @classmethod
    def _rgb(cls, value: list[int]) -> list[int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("control_transparent_color is [r, g, b], each 0-255")
        return value


class EmaConfig(Section):
    use_ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    unsupported = {"use_feedback": False, "param_multiplier": 1.0}


class ValidationConfig(Section):
    unsupported = {"validation_items": [], "resolution": 512, "validate_every_n_steps": 10,
                   "validation_sigmas": [1.0, 0.75, 0.5, 0.25]}


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    lr: float = Field(1e-6, gt=0)
    unet_lr: float | None = Field(None, gt=0)  # defaults to lr
    text_encoder_lr: float | None = Field(None, gt=0)  # defaults to lr
    optimizer: str = "adamw"
    optimizer_params: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_scheduler_params: dict[str, Any] = Field(default_factory=dict)  # e.g. num_warmup_steps
    dtype: str = "fp32"  # normalised to bf16 / fp16 / fp32
    noise_scheduler: str = "ddpm"
    timestep_type: str = "sigmoid"
    content_or_style: str = "balanced"
    min_denoising_steps: int = Field(0, ge=0)
    max_denoising_steps: int = Field(999, ge=0)
    num_train_timesteps: int = Field(1000, ge=1)
    gradient_checkpointing: bool = True
    # EriDiffusion's (musubi-tuner's name): the inputs checkpointed blocks keep for their recompute wait in host
    # memory until backward (long video clips, whose saved inputs alone outgrow a 24 GB card)
    gradient_checkpointing_cpu_offload: bool = False
    # EriDiffusion's: checkpointed blocks keep their attention outputs, so the recompute in backward skips attention
    # (one more activation per attention call; for long sequences, where attention dominates the step)
    gradient_checkpointing_keep_attention: bool = False
    gradient_accumulation: int = Field(1, ge=1)  # effective value, after merging the legacy key
    gradient_accumulation_steps: int = 1  # legacy spelling
    max_grad_norm: float = Field(1.0, ge=0)
    train_unet: bool = True
    train_text_encoder: bool = False
    # ai-toolkit's: captions ignored, every step conditioned on the trigger word (or the empty prompt), whose
    # embedding is cached with the sample prompts' before the text encoders are freed
    unload_text_encoder: bool = False
    cache_text_embeddings: bool = False
    skip_first_sample: bool = False
    force_first_sample: bool = False
    disable_sampling: bool = False
    bypass_guidance_embedding: bool = False
    cfg_scale: float = 1.0
    ema_config: EmaConfig = Field(default_factory=EmaConfig)
    validation_config: ValidationConfig | None = None
    loss_type: str = "mse"
    snr_gamma: float | None = Field(None, gt=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    start_step: int | None = Field(None, ge=0)
    sdp: bool = False  # PyTorch SDPA: what "native" attention already is
    # EriDiffusion's memory plan: "auto" picks quantization, block swap and checkpointing to fit the free GPU
    # memory; "off" (default) does what the config says, as ai-toolkit does
    memory: str = "off"
    # EriDiffusion's: each parameter's optimizer step runs inside backward and frees its gradient at once
    # (full fine-tunes: no full set of gradients ever exists); needs gradient_accumulation 1, no clipping (with
    # optimizer_state_device: cpu, each gradient is freed once copied to the host, and clipping stays)
    fused_backward: bool = False
    # EriDiffusion's: "cpu" keeps the optimizer's state (and its copy of the trained weights) in host memory and
    # steps there (torchao's CPUOffloadOptimizer); the GPU holds only the weights and gradients. A CPU run is unchanged
    optimizer_state_device: str = "device"
    attention_backend: str = "native"  # diffusers attention backend, e.g. flash, _flash_3, sage
    # EriDiffusion's: the step replayed from CUDA graphs (no kernel waits on the host). "auto": where the run allows
    # it (train/graphs.py says what blocks it); "on": the same, an error naming what blocks it; "off": never
    cuda_graphs: str = "auto"
    limited = {
        "optimizer": ("adamw", "adam", "adamw8bit", "adam8bit", "sgd", "adafactor", "prodigy"),
        "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "step"),
        "timestep_type": ("sigmoid", "linear", "shift", "flux_shift", "weighted", "lumina2_shift", "lognorm_blend"),
        "content_or_style": ("balanced", "content", "style"),
        "loss_type": ("mse",),
        "memory": ("off", "auto"),
        "optimizer_state_device": ("device", "cpu"),
        "cuda_graphs": ("auto", "on", "off"),
    }
    unsupported = {
        "linear_timesteps": False, "xformers": False,
        "refiner_lr": None, "embedding_lr": None, "adapter_lr": None, "linear_timesteps2": False,
        "next_sample_timesteps": 8, "train_refiner": True, "switch_boundary_every": 1, "prompt_dropout_prob": 0.0,
        "negative_prompt": None, "max_negative_prompts": 1, "reg_weight": 1.0, "loss_target": "noise",
        "learnable_snr_gos": False, "dynamic_noise_offset": False, "noise_multiplier": 1.0,
        "target_noise_multiplier": 1.0, "random_noise_multiplier": 0.0, "random_noise_shift": 0.0,
        "do_signal_correction_noise": False, "signal_correction_noise_scale": 1.0, "do_batch_noise_correction": False,
        "batch_noise_correction_scale": 0.1, "do_signal_amplification": False, "signal_amplification_strength": 0.5,
        "img_multiplier": 1.0, "latent_multiplier": 1.0, "noisy_latent_multiplier": 1.0,
        "adaptive_scaling_factor": False, "standardize_images": False, "standardize_latents": False,
        "match_noise_norm": False, "correct_pred_norm": False, "correct_pred_norm_multiplier": 1.0,
        "pred_scaler": 1.0, "target_norm_std": None, "target_norm_std_value": 1.0, "inverted_mask_prior": False,
        "inverted_mask_prior_multiplier": 0.5, "diff_output_preservation": False,
        "diff_output_preservation_multiplier": 1.0, "diff_output_preservation_class": "",
        "blank_prompt_preservation": False, "blank_prompt_preservation_multiplier": 1.0,
        "do_prior_divergence": False, "do_guidance_loss": False, "guidance_loss_target": 3.0,
        "do_guidance_loss_cfg_zero": False, "guidance_loss_schedule": "constant", "unconditional_prompt": "",
        "do_differential_guidance": False, "differential_guidance_scale": 3.0, "do_cfg": False,
        "do_random_cfg": False, "max_cfg_scale": None, "cfg_rescale": None, "t0_loss_target": False,
        "t0_velocity_equiv_weight": False, "do_fft_loss": False, "do_fft_velocity_equiv_weight": False,
        "diffusion_feature_extractor_path": None, "latent_feature_extractor_path": None,
        "diffusion_feature_extractor_weight": 1.0, "optimal_noise_pairing_samples": 1,
        "force_consistent_noise": False, "blended_blur_noise": False, "do_blank_stabilization": False,
        "max_loss": None, "max_loss_debug": False, "audio_loss_multiplier": 1.0, "short_and_long_captions": False,
        "short_and_long_captions_encoder_split": False, "single_item_batching": False,
        "prompt_saturation_chance": 0.0, "train_turbo": False, "show_turbo_outputs": False, "free_u": False,
        "weight_jitter": 0.0, "match_adapter_assist": False, "match_adapter_chance": 0.0,
        "adapter_assist_name_or_path": None, "adapter_assist_type": None, "merge_network_on_save": False,
        "merge_network_on_save_strength": 1.0, "do_paramiter_swapping": False, "paramiter_swapping_factor": 0.1,
    }

    _dtype = field_validator("dtype", mode="before")(_short_dtype)

    @model_validator(mode="after")
    def _resolve(self) -> TrainConfig:
        legacy = self.gradient_accumulation_steps
        if legacy == -1:  # ai-toolkit: accumulate a whole epoch
            raise not_supported(legacy, "use gradient_accumulation: N", key="gradient_accumulation_steps")
        if legacy < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1 (given {legacy})")
        if legacy > 1:
            if self.gradient_accumulation not in (1, legacy):
                raise ValueError(f"gradient_accumulation ({self.gradient_accumulation}) and legacy "
                                 f"gradient_accumulation_steps ({legacy}) disagree; keep only gradient_accumulation")
            self.gradient_accumulation = legacy
        if self.min_denoising_steps > self.max_denoising_steps:
            raise ValueError("min_denoising_steps must be <= max_denoising_steps")
        if self.optimizer_state_device == "cpu":
            # the CPU steps one optimizer per parameter: bitsandbytes' 8-bit state is CUDA-only, Prodigy estimates
            # its step size over all parameters together, and fp16 loss scaling would unscale the host copies
            bad = [f"train.{key}: {value}" for key, value in (("optimizer", self.optimizer), ("dtype", self.dtype))
                   if value in ("adamw8bit", "adam8bit", "prodigy", "fp16")]
            if bad:
                raise ValueError(f"train.optimizer_state_device: cpu cannot be combined with {' and '.join(bad)} "
                                 "(use optimizer adamw, adam, sgd or adafactor and dtype bf16 or fp32, "
                                 "or optimizer_state_device: device)")
        self.unet_lr = self.lr if self.unet_lr is None else self.unet_lr
        self.text_encoder_lr = self.lr if self.text_encoder_lr is None else self.text_encoder_lr
        return self


# legacy model flags -> arch, most specific first
_ARCH_FLAGS = {"is_flux": "flux", "is_ssd": "ssd", "is_vega": "vega", "is_xl": "sdxl", "is_v3": "sd3", "is_v2": "sd2",
               "is_pixart_sigma": "pixart_sigma", "is_pixart": "pixart", "is_auraflow": "auraflow",
               "is_lumina2": "lumina2"}
_ARCH_ALIASES = {"flex1": "flux"}


class QuantizeKwargs(Section):
    exclude: list[str] = Field(default_factory=list)  # module-name patterns kept in full precision
    unsupported = {"include": None}


class ModelConfig(Section):
    name_or_path: str
    arch: str | None = None  # as written, e.g. "wan21:14b"; read arch_name / arch_variant
    is_flux: bool = False
    is_xl: bool = False
    is_v3: bool = False
    is_v2: bool = False
    is_pixart: bool = False
    is_pixart_sigma: bool = False
    is_auraflow: bool = False
    is_lumina2: bool = False
    is_ssd: bool = False
    is_vega: bool = False
    is_v_pred: bool = False
    dtype: str = "float16"  # replaced by train.dtype, as ai-toolkit does
    # a diffusers folder or HF repo id (local cache) for the components a single-file name_or_path lacks
    extras_name_or_path: str | None = None
    vae_path: str | None = None  # a VAE folder (config.json), a diffusers folder with vae/, or a single file
    # component name -> its own folder or weights file (e.g. text_encoder: clip_l.safetensors); see the arch
    model_paths: dict[str, str] = Field(default_factory=dict)
    vae_dtype: str | None = None  # unset: the architecture's choice (train.dtype, or fp32 for VAEs that overflow)
    te_dtype: str | None = None  # unset: train.dtype
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    # regional torch.compile of the denoiser; unset: on where it pays off (CUDA with Triton), see train/loop.py
    compile: bool | None = None
    # quantized frozen base (quant.py): the denoiser's Linear weights stored in 8 or 4 bits
    quantize: bool = False
    qtype: str = "qfloat8"
    quantize_te: bool | None = None  # unset: same as quantize, as in ai-toolkit
    qtype_te: str = "qfloat8"
    quantize_kwargs: QuantizeKwargs = Field(default_factory=QuantizeKwargs)
    text_encoder_bits: int = 16  # 8 or 4: text encoders stored in int8 / nf4 (ai-toolkit's bitsandbytes key)
    low_vram: bool = False  # quantize on the CPU before a block reaches the GPU (less GPU memory while loading)
    # EriDiffusion's: float8 base layers multiply on fp8 tensor cores, activations scaled per row (sm89+)
    float8_matmul: bool = False
    # block swap: repeated denoiser blocks kept in pinned host memory and streamed to the GPU as they run
    layer_offloading: bool = False
    layer_offloading_transformer_percent: float = Field(1.0, ge=0, le=1)
    layer_offloading_text_encoder_percent: float = Field(1.0, ge=0, le=1)
    swap_blocks: int | None = Field(None, ge=0)  # EriDiffusion's: a block count instead of a percentage
    # a LoRA fused into the base for training and taken out again for samples (FLUX.1-schnell's training adapter)
    assistant_lora_path: str | None = None
    lora_path: str | None = None  # a LoRA fused into the base before training, kept for samples
    # full fine-tune (no network section): which parameters train, by `<component>.<parameter>` substrings
    only_if_contains: list[str] | None = None
    ignore_if_contains: list[str] | None = None
    renamed = {"auto_memory": "layer_offloading"}
    unsupported = {
        "attn_masking": False, "inference_lora_path": None,
        "vae_device": None, "te_device": None, "refiner_name_or_path": None, "refiner_start_at": 0.5,
        "unconditional_lora_path": None, "latent_space_version": None, "use_text_encoder_1": True,
        "use_text_encoder_2": True, "experimental_xl": False, "unet_path": None,
        "unet_sample_size": None,
        "split_model_over_gpus": False, "split_model_other_module_param_count_scale": 0.3, "te_name_or_path": None,
        "accuracy_recovery_adapter": None, "block_compile": False, "compile_mode": "default",
        "compile_fullgraph": False, "compile_dynamic": True, "cache_size_limit": None,
        "in_context": False,
    }

    _dtypes = field_validator("dtype", "vae_dtype", "te_dtype", mode="before")(_short_dtype)

    @field_validator("qtype", "qtype_te")
    @classmethod
    def _qtype(cls, value: str, info: ValidationInfo) -> str:
        from ..quant import storage_of

        try:
            storage_of(value, key=f"model.{info.field_name}")
        except ValueError as e:
            raise not_supported(value, str(e).partition(": ")[2] or str(e)) from None
        return value.lower()

    @field_validator("text_encoder_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in (4, 8, 16):
            raise ValueError("text_encoder_bits must be 16, 8 or 4")
        return value

    @model_validator(mode="after")
    def _fill_quantize_te(self) -> ModelConfig:
        self.quantize_te = self.quantize if self.quantize_te is None else self.quantize_te
        return self

    @property
    def arch_alias(self) -> str | None:
        """The alias the config asked for (e.g. 'flex1'), or None."""
        base = (self.arch or "").partition(":")[0]
        return base if base in _ARCH_ALIASES else None

    @property
    def arch_variant(self) -> str | None:
        """The `:tag` of `arch` ('14b' for 'wan21:14b'), or None."""
        return (self.arch or "").partition(":")[2] or None

    @property
    def arch_name(self) -> str:
        """The architecture to load: `arch` without tag and alias, else from the legacy flags, else sd1."""
        if self.arch:
            base = self.arch.partition(":")[0]
            return _ARCH_ALIASES.get(base, base)
        return next((arch for flag, arch in _ARCH_FLAGS.items() if getattr(self, flag)), "sd1")


class SampleItem(Section):
    prompt: str
    # unset fields are filled from the sample section
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    neg: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    sample_steps: int | None = Field(None, ge=1)
    network_multiplier: float | None = None
    num_frames: int | None = Field(None, ge=1)  # video models
    fps: int | None = Field(None, ge=1)
    ctrl_img: str | None = None  # the start image of image-to-video models
    unsupported = {"ctrl_idx": None, "ctrl_img_1": None,
                   "ctrl_img_2": None, "ctrl_img_3": None, "do_cfg_norm": False}

    @model_validator(mode="before")
    @classmethod
    def _inline_flags(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            prompt, overrides = parse_prompt_flags(data["prompt"])
            data = {**data, **overrides, "prompt": prompt}
        return data


class SampleConfig(Section):
    sampler: str = "ddpm"
    sample_every: int = Field(100, ge=1)
    sample_start_step: int = Field(0, ge=0)
    width: int = Field(512, gt=0)
    height: int = Field(512, gt=0)
    neg: str = ""
    seed: int = 0
    walk_seed: bool = False
    guidance_scale: float = 7.0
    sample_steps: int = Field(20, ge=1)
    network_multiplier: float = 1.0
    # video models: frames per sample (1: a still image, saved in `format`) and the clip's frame rate; a clip is
    # written as .mp4 (PyAV), or as animated .webp where PyAV is not installed
    num_frames: int = Field(1, ge=1)
    fps: int = Field(16, ge=1)
    format: str = "jpg"
    prompts: list[str] = Field(default_factory=list)  # legacy: moved into samples
    samples: list[SampleItem] = Field(default_factory=list)
    limited = {"format": ("jpg", "jpeg", "png", "webp")}
    unsupported = {"guidance_rescale": 0.0, "adapter_conditioning_scale": 1.0, "refiner_start_at": 0.5, "extra_values": [], "do_cfg_norm": False}

    @model_validator(mode="before")
    @classmethod
    def _prompts_to_samples(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("prompts"), list) and data["prompts"]:
            if data.get("samples"):
                raise ValueError("set either 'prompts' or 'samples', not both")
            data = {**data, "samples": [{"prompt": p} for p in data["prompts"]], "prompts": []}
        return data

    @model_validator(mode="after")
    def _fill_samples(self) -> SampleConfig:
        for i, item in enumerate(self.samples):
            for key in ("width", "height", "neg", "guidance_scale", "sample_steps", "network_multiplier", "num_frames", "fps"):
                if getattr(item, key) is None:
                    setattr(item, key, getattr(self, key))
            if item.seed is None:
                item.seed = self.seed + i if self.walk_seed else self.seed
        return self


class LoggingConfig(Section):
    log_every: int = Field(100, ge=1)  # a console line with the mean loss every N steps
    project_name: str = "ai-toolkit"  # these two name a W&B run, and W&B (use_wandb) is not supported yet
    run_name: str | None = None
    unsupported = {"use_wandb": False, "use_ui_logger": False, "verbose": False}


class ProcessConfig(Section):
    type: str
    name: str | None = None  # defaults to config.name
    training_folder: str = "output"
    device: str = "cuda:0"
    trigger_word: str | None = None
    training_seed: int | None = None
    network: NetworkConfig | None = None  # absent: full fine-tune
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    sample: SampleConfig | None = None
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    limited = {"type": ("sd_trainer", "diffusion_trainer", "ui_trainer")}
    unsupported = {"log_dir": None, "performance_log_every": 0, "torch_profiler": False, "do_lorm": False,
                   "lorm_extract_mode": "ratio", "lorm_extract_mode_param": 0.25, "sqlite_db_path": "./aitk_db.db",
                   "adapter": None, "embedding": None, "decorator": None, "guidance": None, "slider": None,
                   "first_sample": None}

    @model_validator(mode="after")
    def _resolve(self) -> ProcessConfig:
        model, train = self.model, self.train
        model.dtype = train.dtype
        for ds in self.datasets:
            ds.trigger_word = ds.trigger_word if ds.trigger_word is not None else self.trigger_word
            ds.batch_size = ds.batch_size or train.batch_size
            ds.cache_text_embeddings = ds.cache_text_embeddings or train.cache_text_embeddings or train.unload_text_encoder
        if train.unload_text_encoder and train.train_text_encoder:
            raise ValueError("train.unload_text_encoder and train.train_text_encoder exclude each other (the text "
                             "encoders are freed once the trigger word is encoded); remove one")
        if len({ds.cache_text_embeddings for ds in self.datasets}) > 1:
            raise ValueError("cache_text_embeddings must be set on all datasets or none (or set train.cache_text_embeddings)")
        return self


class JobSection(Section):
    name: str = Field(min_length=1)
    process: list[ProcessConfig] = Field(min_length=1)
    device: str | None = None  # unused by training processes, as in ai-toolkit
    unsupported = {"training_folder": None, "log_dir": None, "is_v2": False}  # job: train only


class JobConfig(Section):
    job: str
    config: JobSection
    meta: dict[str, Any] = Field(default_factory=dict)
    limited = {"job": ("extension",)}

    @model_validator(mode="after")
    def _name_processes(self) -> JobConfig:
        for proc in self.config.process:
            proc.name = proc.name or self.config.name
        return self
