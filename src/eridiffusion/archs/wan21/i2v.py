"""Wan 2.1 image-to-video (14B, 480p and 720p): the T2V model (this package) with WanImageToVideoPipeline's two
image conditions, both computed from the first frame of the training clip itself (ai-toolkit's wan21_i2v):

- the CLIP vision embedding: CLIPVisionModel's penultimate hidden states of the frame as CLIPImageProcessor prepares
  it (the pipeline's own encode_image), into the transformer's image embedder and the cross-attention's k_img/v_img;
- the first-frame latents: the VAE encoding of [first frame, F - 1 black frames], normalised as the clip's latents,
  after 4 mask channels (1 over the first latent frame, 0 after), concatenated with the noisy latents on the channel
  axis (16 + 4 + 16 = the transformer's 36 input channels).

encode_images returns both with the clip's latents (`latent`, `condition`, `image_embeds`), cached per item with
them; the mask follows from the frame count and is rebuilt each step. Samples start from the sample's `ctrl_img`
(ai-toolkit's key, `--ctrl_img` in a prompt). The text must be 512 tokens: diffusers' attention takes the tokens
before the last 512 as the image's."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel

from ...train.dtypes import DTYPES
from ..base import SampleRequest
from ..common import folder_fingerprint, on_device
from . import OUTSIDE_BLOCKS, Wan21

TEXT_TOKENS = 512  # diffusers' WanAttnProcessor: image tokens = all but the last 512


class Wan21I2V(Wan21):
    variant, pipeline_cls = "i2v", WanImageToVideoPipeline
    outside_blocks = OUTSIDE_BLOCKS + ("condition_embedder.image_embedder.ff.net.0.proj",
                                       "condition_embedder.image_embedder.ff.net.2")
    takes_ctrl_img = True  # samples start from sample.samples[].ctrl_img

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        super().__init__(proc, device, dtype)
        if self.max_sequence_length != TEXT_TOKENS:
            raise ValueError(f"model.model_kwargs.max_text_length {self.max_sequence_length}: Wan I2V takes {TEXT_TOKENS} "
                             "text tokens (the image tokens are told apart by that count); remove it")

    @staticmethod
    def build_tiny(folder, **kw):
        from .tiny import build_tiny_wan21

        return build_tiny_wan21(folder, i2v=True, **kw)

    def load_image_encoder(self, root: Path, paths: dict[str, Path]) -> dict:
        dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        self.image_encoder_source = root / "image_encoder"
        encoder = CLIPVisionModel.from_pretrained(self.image_encoder_source, torch_dtype=dtype, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(root / "image_processor", local_files_only=True)
        return {"image_encoder": encoder.requires_grad_(False).eval().to(self.device), "image_processor": processor}

    def load(self, base=None) -> None:
        super().load(base)
        self.latent_fingerprint += ":i2v:" + folder_fingerprint(self.image_encoder_source)

    def drop_vae_encoder(self) -> None:
        super().drop_vae_encoder()
        self.pipe.image_encoder.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, F, H, W] (or [B, 3, H, W]) in [-1, 1] -> {"latent": the clip's latents, "condition": the latents of
        its first frame followed by F - 1 zero frames, "image_embeds": the first frame's CLIP embedding}."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        first = pixels[:, :, :1]
        video_condition = torch.cat([first, first.new_zeros(*first.shape[:2], pixels.shape[2] - 1, *first.shape[3:])], 2)
        images = ((first[:, :, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        with on_device(self.pipe.image_encoder, self.device):
            embeds = self.pipe.encode_image([Image.fromarray(a) for a in images.cpu().numpy()], self.device)
        return {"latent": super().encode_images(pixels), "condition": super().encode_images(video_condition),
                "image_embeds": embeds.to(self.dtype)}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        latent = latents["latent"]
        condition = torch.cat([first_frame_mask(latent), latents["condition"]], 1).to(self.device, self.dtype)
        image = latents["image_embeds"].to(self.device, self.dtype)
        return self.flow_loss(latent, lambda noisy, sigma: self.predict(torch.cat([noisy, condition], 1), sigma, text,
                                                                        encoder_hidden_states_image=image), generator)

    # ---- previews ------------------------------------------------------------------------------
    def sample_inputs(self, request: SampleRequest) -> dict:
        if not request.ctrl_img:
            raise ValueError("sample.samples[].ctrl_img: Wan I2V samples start from an image; give each sample prompt "
                             "a ctrl_img (or --ctrl_img PATH in the prompt)")
        return {"image": Image.open(Path(request.ctrl_img).expanduser()).convert("RGB")}

    @torch.no_grad()
    def generate(self, request: SampleRequest):
        with on_device(self.pipe.image_encoder, self.device):
            return super().generate(request)


def first_frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """WanImageToVideoPipeline's mask channels for [B, C, f, h, w] latents: 4 (the VAE's frames per latent frame), 1
    over the first latent frame (the given image), 0 over the rest."""
    b, _, f, h, w = latents.shape
    mask = torch.zeros(b, 4, f, h, w, device=latents.device, dtype=latents.dtype)
    mask[:, :, 0] = 1
    return mask
