"""The contract between the shared engine and one architecture module.

The engine (data, loop, saving, sampling) only talks to a model through this interface; it never
names an architecture. An architecture wraps diffusers/transformers classes; it does not re-implement them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from .blockwise import FrozenBase


@dataclass
class LoraTargets:
    """One module of a model that gets LoRA layers: its Linear and its (3x3) Conv2d candidates."""

    module: torch.nn.Module
    linear: list[str]
    conv: list[str]


@dataclass
class SampleRequest:
    text: dict[str, torch.Tensor]  # encode_prompts() output for one prompt (batch dim 1)
    neg_text: dict[str, torch.Tensor] | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_frames: int = 1  # video architectures (frame_rule): >1 asks for a clip, generate() returns its frames
    ctrl_img: str | None = None  # the sample's ctrl_img (a path), for architectures with `takes_ctrl_img`


class Architecture(Protocol):
    """One model family. Constructed as `Cls(process_config, device, dtype)`, then `load()`."""

    # kohya/ai-toolkit `ss_base_model_version`, written into saved files
    base_model_version: str
    # image sides must be multiples of this (VAE downscale x patch size)
    bucket_divisibility: int
    # video architectures only: the frame counts the VAE takes, a*k + b as (a, b) (Wan: (4, 1)); their pixels are
    # [B, 3, F, H, W] (images F = 1, or [B, 3, H, W]) and their latents [B, C, f, h, w]. Image architectures lack it
    # frame_rule: tuple[int, int]
    # image-to-video architectures only: True where every clip is conditioned on its first frame (datasets[].do_i2v is
    # accepted there and refused elsewhere)
    # first_frame_conditioned: bool
    # architectures that condition on each dataset's control_path files (paired by stem) set takes_control = True:
    # encode_images then gets them as its second argument, in the layout of the pixels (cut the same way)
    # takes_control: bool
    # identify the VAE / text encoders so caches are invalidated when they change
    latent_fingerprint: str
    text_fingerprint: str
    # model.model_kwargs keys this architecture reads, with their defaults (others are an error)
    model_kwargs: dict
    # the module that is trained (transformer or UNet)
    denoiser: torch.nn.Module
    # the denoiser's lists of repeated blocks in execution order (block swap); () where there are none
    block_lists: tuple[str, ...]
    # denoiser Linear layers kept in full precision when the base is quantized (module names, shell patterns)
    quantize_exclude: list[str]

    def load(self, base: FrozenBase | None = None) -> None:
        """Load every component; `base` says how the frozen denoiser is finished block by block as it loads
        (assistant LoRA fused, quantized, moved or kept on the host) and how text encoders are quantized."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> latents [B,C,h,w] as the denoiser sees them (scaled/shifted). An architecture
        that also conditions on the pixels themselves (Wan I2V: the first frame) or on the controls (takes_control:
        `encode_images(pixels, control)`) may return a dict of named tensors, batch first; it is cached and batched
        part by part and reaches training_loss as that dict."""

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning, every value with batch dim first. Cached to disk as-is."""

    def drop_text_encoders(self) -> None:
        """Free the text encoders once every needed embedding is cached."""

    def drop_vae_encoder(self) -> None:
        """Move the VAE off the training device once every latent is cached."""

    def training_loss(self, latents: torch.Tensor, text: dict[str, torch.Tensor], batch, generator: torch.Generator
                      ) -> torch.Tensor:
        """Noise the latents with the arch's objective, predict, return the per-sample loss [B].
        `batch` (data.Batch) carries per-image facts some models condition on (original size, crop)."""

    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        """The modules that get LoRA layers by default, by component name ("transformer", "unet", "te1", ...).
        The denoiser's component is trained at unet_lr, the others at text_encoder_lr."""

    def lora_to_file(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per component, peft-named LoRA tensors plus `<module>.alpha` -> the key layout written to disk."""

    def lora_from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Inverse of lora_to_file."""

    # full fine-tune (no network section): the trained component's name (`<component>.<parameter>` is what
    # model.only_if_contains filters), the model in its original single-file layout, and as a diffusers folder
    full_component: str

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...

    def save_full_diffusers(self, folder, dtype) -> None: ...

    def generate(self, request: SampleRequest) -> Image.Image | list[Image.Image]:
        """One preview image with the weights as they are now (a video architecture: its frames, for num_frames > 1)."""
