"""Wan 2.1 VACE (1.3B, 14B): the T2V model (this package) with VACE's control blocks (WanVACETransformer3DModel), which
read a control video and add their hints to the main blocks' states. The control is the dataset's control_path clip
(or image) paired with each training clip, as WanVACEPipeline conditions on its `video`:

- no mask is given, so the mask is all ones (the whole control video is "reactive", to be regenerated, as the
  pipeline does when `mask` is None): the VAE encodes the control video times (1 - mask) (here all zeros) and times
  the mask (the control video itself), normalised as the clip's latents: 16 + 16 channels;
- the mask folded to the VAE's 8 x 8 pixels per latent pixel (64 channels, all ones) follows: 96 channels,
  `control_hidden_states`, with `control_hidden_states_scale` 1 for every control block.

encode_images returns the clip's latents and the 32 control channels (`latent`, `control`), cached per item with
them; the mask follows from the shape and is rebuilt each step. A control image stands for a still control video of
the clip's frame count. Samples take the sample's `ctrl_img` (an image, or a clip: its first frames) as the pipeline's
`video`. Reference images (the pipeline's `reference_images`) are not used."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanVACEPipeline
from PIL import Image

from ...data.video import VIDEO_EXTS, probe_clip, read_frames
from ..base import SampleRequest
from . import Wan21
from .formats import VACE_BLOCK_LISTS


class Wan21VACE(Wan21):
    variant, pipeline_cls, block_lists = "vace", WanVACEPipeline, VACE_BLOCK_LISTS
    takes_control = True  # training clips come with their control clip (datasets[].control_path)
    takes_ctrl_img = True  # samples take sample.samples[].ctrl_img as the control video

    @staticmethod
    def build_tiny(folder, **kw):
        from .tiny import build_tiny_wan21

        return build_tiny_wan21(folder, vace=True, **kw)

    def load(self, base=None) -> None:
        super().load(base)
        self.latent_fingerprint += ":vace"

    # ---- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, control: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """[B, 3, F, H, W] (or [B, 3, H, W]) in [-1, 1] and their controls (F frames, or 1: a still) -> {"latent": the
        clip's latents, "control": the latents of the control video's inactive and reactive parts (32 channels)}."""
        if control is None:
            raise ValueError("Wan VACE trains on control clips: give each dataset a control_path (datasets[].control_path)")
        pixels, control = (t.unsqueeze(2) if t.dim() == 4 else t for t in (pixels, control))
        frames = pixels.shape[2]
        if control.shape[2] == 1 and frames > 1:  # a control image: a still control video
            control = control.expand(-1, -1, frames, -1, -1)
        if control.shape != pixels.shape:
            raise ValueError(f"control {tuple(control.shape)} does not match its clip {tuple(pixels.shape)}: a control "
                             "clip needs the clip's frames and size")
        encode = super().encode_images
        return {"latent": encode(pixels), "control": torch.cat([encode(torch.zeros_like(control)), encode(control)], 1)}

    def vace_context(self, control: torch.Tensor) -> torch.Tensor:
        """The transformer's control input: the control latents and the all-ones mask, WanVACEPipeline's
        prepare_masks folding each latent pixel's 8 x 8 pixels into channels."""
        b, _, f, h, w = control.shape
        fold = self.pipe.vae_scale_factor_spatial ** 2
        return torch.cat([control, control.new_ones(b, fold, f, h, w)], 1)

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        latent = latents["latent"]
        context = self.vace_context(latents["control"].to(self.device, self.dtype))
        scale = context.new_ones(len(self.transformer.config.vace_layers))
        return self.flow_loss(latent, lambda noisy, sigma: self.predict(
            noisy, sigma, text, control_hidden_states=context, control_hidden_states_scale=scale), generator)

    # ---- previews ------------------------------------------------------------------------------
    def sample_inputs(self, request: SampleRequest) -> dict:
        """The control video from ctrl_img at the sample's size: an image repeated over the frames, or a clip's first
        num_frames frames."""
        if not request.ctrl_img:
            raise ValueError("sample.samples[].ctrl_img: Wan VACE samples follow a control video; give each sample "
                             "prompt a ctrl_img, an image or a clip (or --ctrl_img PATH in the prompt)")
        path, count = Path(request.ctrl_img).expanduser(), request.num_frames
        if path.suffix.lower() in VIDEO_EXTS:
            if (has := probe_clip(path).frames) < count:
                raise ValueError(f"sample ctrl_img {path}: {has} frames, fewer than the sample's {count}")
            frames = read_frames(path, list(range(count)))
        else:
            frames = [Image.open(path).convert("RGB")] * count
        return {"video": [f.resize((request.width, request.height), Image.LANCZOS) for f in frames]}
