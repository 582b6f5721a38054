"""Kolors: SDXL's UNet layout (with a projection of the text states) conditioned on ChatGLM3, as diffusers'
KolorsPipeline has it. Objective, micro-conditioning, LoRA targets, kohya files and the other LoRA layouts are
SDXL's, for the UNet alone."""
from __future__ import annotations

import torch
from diffusers import KolorsPipeline
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

from ..sdxl import SDXL

# Kwai-Kolors/Kolors-diffusers' UNet: SDXL base's, with ChatGLM3's 4096-wide states projected to its 2048-wide
# cross-attention and the 4096-wide pooled state in the added conditioning (4096 + 6 time ids x 256)
KOLORS_UNET = {"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 4096, "projection_class_embeddings_input_dim": 5632}


class Kolors(SDXL):
    base_model_version = "kolors"
    components = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    te_keys, te_linears = ("te",), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    # lora_layouts are SDXL's: ComfyUI's Kolors nodes load the UNet into ComfyUI's SDXL model with `encoder_hid_proj`
    # under its diffusers name, so they apply kohya's `lora_unet_<diffusers name>` (`comfy`) as for SDXL
    DIFFUSERS_PREFIXES = {"unet": "unet."}

    def full_to_file(self, state=None):
        """The UNet (or its gathered `state`) as Kolors ships it (diffusers' unet/diffusion_pytorch_model.safetensors):
        Kolors has no SGM checkpoint layout (its encoder_hid_proj and ChatGLM have no SGM names)."""
        return dict(state or self.unet.state_dict())

    def lora_components(self, transformer_only: bool, train_text_encoder: bool):
        if train_text_encoder:  # diffusers' kohya reader only knows CLIP layer names; ComfyUI has no Kolors
            raise ValueError("train.train_text_encoder is not supported yet for kolors: no loader reads ChatGLM LoRA keys")
        return super().lora_components(transformer_only, train_text_encoder)

    @classmethod
    def unet_config(cls) -> dict:
        return {**super().unet_config(), **KOLORS_UNET}

    @classmethod
    def lora_text_encoders(cls, root=None) -> list:
        return []  # no ChatGLM LoRAs (see lora_components): convert and merge read the UNet's alone

    @classmethod
    def _open_single_file_for_merge(cls, path):
        """A Kolors UNet file in diffusers' keys (`unet/diffusion_pytorch_model.safetensors` as Kolors ships it, which
        ComfyUI's Kolors nodes load and our full fine-tune writes), merged and written back with the same keys."""
        from safetensors.torch import save_file

        from ..sources import load_state_dict_file

        sd = load_state_dict_file(path)
        if "encoder_hid_proj.weight" not in sd:
            raise ValueError(f"{path}: not a Kolors UNet in diffusers' keys (no encoder_hid_proj.weight); --base takes a "
                             "Kolors diffusers folder or its unet/diffusion_pytorch_model.safetensors")

        def write(out) -> None:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt"})
        return {"unet": sd}, write, cls.lora_read_any

    @staticmethod
    def build_tiny(folder, **kw):
        from .tiny import build_tiny_kolors

        return build_tiny_kolors(folder, **kw)

    def load(self, base=None) -> None:
        super().load(base)
        # KolorsPipeline encodes an empty negative prompt rather than zeroing it: keep one for previews
        with torch.no_grad():
            self.unconditional = {k: v.detach() for k, v in self.encode_prompts([""]).items()}

    def load_text(self, root, te_dtype):
        encoder = ChatGLMModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=te_dtype, local_files_only=True)
        return [encoder], [ChatGLMTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)]

    def make_pipeline(self, scheduler):
        return KolorsPipeline(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                              unet=self.unet, scheduler=scheduler)

    def file_prefix(self, key: str) -> str:
        return {"unet": "lora_unet", "te": "lora_te"}[key]
