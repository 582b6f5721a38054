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
before the last 512 as the image's.

Every clip and image is conditioned on its first frame, whatever `datasets[].do_i2v` says: as in ai-toolkit's wan21_i2v
(which does not read the key), the transformer takes no clip without its start image.

The image encoder is the components folder's image_encoder/ + image_processor/, or `model.model_paths.image_encoder`:
a CLIPVisionModel folder, or one file as ComfyUI keeps it (models/clip_vision/clip_vision_h.safetensors, read by
clip_vision_state), with CLIP's standard preprocessing at the model's image size where no image_processor/ is found."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ...train.dtypes import DTYPES
from ..base import SampleRequest
from ..common import folder_fingerprint, on_device
from ..sources import load_state_dict_file
from . import MODEL_PATHS, OUTSIDE_BLOCKS, Wan21

TEXT_TOKENS = 512  # diffusers' WanAttnProcessor: image tokens = all but the last 512
# CLIP vision towers by width, for errors: what a file holds against the width the transformer's image embedder takes
CLIP_VISION_NAMES = {768: "ViT-B", 1024: "ViT-L/14", 1152: "SigLIP so400m", 1280: "ViT-H/14: ComfyUI's clip_vision_h.safetensors",
                     1664: "ViT-bigG/14"}


class Wan21I2V(Wan21):
    variant, pipeline_cls, model_paths = "i2v", WanImageToVideoPipeline, MODEL_PATHS + ("image_encoder",)
    first_frame_conditioned = True  # datasets[].do_i2v is accepted (and changes nothing: every clip is conditioned)
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
        """The CLIP vision encoder and its image processor (see the module's docstring for where they come from)."""
        dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        source = paths.get("image_encoder", root / "image_encoder")
        where = "model.model_paths.image_encoder" if "image_encoder" in paths else "the components folder's image_encoder/"
        if source.is_dir():
            encoder = CLIPVisionModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
        elif source.is_file():
            encoder = load_clip_vision_file(source, dtype, where)
        else:
            raise FileNotFoundError(f"{root} has no image_encoder/, which Wan I2V needs (its CLIP vision encoder, "
                                    "ViT-H/14): set model.model_paths.image_encoder to ComfyUI's clip_vision_h.safetensors")
        width, image_dim = encoder.config.hidden_size, self.transformer.config.image_dim
        if width != image_dim:
            raise ValueError(f"{where}: {source} holds a {encoder.config.num_hidden_layers}-layer CLIP vision model "
                             f"{width} wide ({CLIP_VISION_NAMES.get(width, 'an unknown one')}); this Wan I2V transformer "
                             f"takes {image_dim}-wide image states ({CLIP_VISION_NAMES.get(image_dim, 'its own CLIP')})")
        processor_dir = next((d for d in (source, root / "image_processor") if (d / "preprocessor_config.json").is_file()), None)
        if processor_dir is not None:
            processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
        else:  # the Wan I2V repos' image_processor: CLIP's mean/std, bicubic, shortest side then centre crop
            side = encoder.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        settings = {k: getattr(processor, k) for k in ("size", "crop_size", "image_mean", "image_std", "resample")}
        self.image_fingerprint = folder_fingerprint(source, extra=json.dumps(settings, sort_keys=True, default=str))
        return {"image_encoder": encoder.requires_grad_(False).eval().to(self.device), "image_processor": processor}

    def image_components(self) -> dict:
        return {"image_encoder": self.pipe.image_encoder, "image_processor": self.pipe.image_processor}

    def load(self, base=None) -> None:
        super().load(base)
        self.latent_fingerprint += ":i2v:" + self.image_fingerprint

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


# ---- CLIP vision files ----------------------------------------------------------------------------------------------
OPEN_CLIP_NAMES = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
                   "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
                   "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
                   "ln_post.bias": "post_layernorm.bias"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


def clip_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP file's vision tower in CLIPVisionModel's names (transformers 5: `embeddings.`, `encoder.layers.N.`, ...),
    from ComfyUI's clip_vision layout (those names after `vision_model.`, as transformers 4 saved
    CLIPVisionModelWithProjection: clip_vision_h.safetensors), the bare names, or open_clip's `visual.` layout (which
    ComfyUI's loader converts too). Dropped: the projection into CLIP's joint space (`visual_projection.weight`,
    `visual.proj`: Wan takes the penultimate hidden states), `position_ids` buffers, and a whole CLIP file's text tower."""
    if "visual.conv1.weight" in state:
        out = {}
        for key, value in state.items():
            if not key.startswith("visual.") or key == "visual.proj":
                continue
            name = key[len("visual."):]
            block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", name)  # [._]: in_proj_weight
            if block is None:
                out[OPEN_CLIP_NAMES.get(name, name)] = value
            elif block[2] == "attn.in_proj":  # q, k and v stacked
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"encoder.layers.{block[1]}.self_attn.{part}_proj.{block[3]}"] = chunk
            else:
                out[f"encoder.layers.{block[1]}.{OPEN_CLIP_BLOCK.get(block[2], block[2])}.{block[3]}"] = value
        return out
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")
            and not k.startswith(("visual_projection.", "text_model.", "text_projection.", "logit_scale"))}


def clip_vision_config(state: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """The config of CLIPVisionModel `state` (clip_vision_state's names): widths, depth, patch and image size from the
    tensors; what none tells as ViT-H/14 has it (as ComfyUI's clip_vision_config_h.json): 16 heads, gelu, eps 1e-5."""
    patch = state["embeddings.patch_embedding.weight"]
    grid = math.isqrt(state["embeddings.position_embedding.weight"].shape[0] - 1)  # patches a side; +1: the class token
    return CLIPVisionConfig(
        hidden_size=patch.shape[0], num_channels=patch.shape[1], patch_size=patch.shape[-1], image_size=grid * patch.shape[-1],
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")}),
        num_attention_heads=16, hidden_act="gelu", layer_norm_eps=1e-5)


def load_clip_vision_file(path: Path, dtype: torch.dtype, where: str) -> CLIPVisionModel:
    """CLIPVisionModel from one CLIP weights file (clip_vision_state's layouts), every weight of the model loaded from it.
    `where` names the config key in errors."""
    from accelerate import init_empty_weights

    full = load_state_dict_file(path, dtype=dtype)
    state = clip_vision_state(full)
    needed = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight")
    if not all(k in state for k in needed):
        text = any(k.startswith(("text_model.", "token_embedding.", "embeddings.token_embedding.", "encoder.block.", "shared."))
                   for k in full)
        raise ValueError(f"{where}: {path} holds {'a text encoder' if text else 'no CLIP vision model'} (keys such as "
                         f"{sorted(full)[:3]}); Wan I2V takes the CLIP vision encoder ViT-H/14, ComfyUI's "
                         "models/clip_vision/clip_vision_h.safetensors")
    with init_empty_weights():  # parameters on the meta device until the file's are assigned
        model = CLIPVisionModel(clip_vision_config(state))
    expected = set(model.state_dict())
    if all(k.startswith("vision_model.") for k in expected):  # transformers 4 names
        state = {"vision_model." + k: v for k, v in state.items()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: {path} is not a CLIP vision model of the shape its tensors describe "
                         f"({model.config.num_hidden_layers} layers, {model.config.hidden_size} wide): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, assign=True)
    return model.eval()
