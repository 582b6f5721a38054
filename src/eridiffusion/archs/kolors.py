"""Kolors: SDXL's UNet layout (with a projection of the text states) conditioned on ChatGLM3, as diffusers'
KolorsPipeline has it. Objective, micro-conditioning, LoRA targets and kohya files are SDXL's."""
from __future__ import annotations

import torch
from diffusers import KolorsPipeline
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

from .sdxl import SDXL


class Kolors(SDXL):
    base_model_version = "kolors"
    components = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    te_keys, te_linears = ("te",), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    lora_layouts = ()  # SDXL's converters assume CLIP text encoders and SDXL's UNet config

    def full_to_file(self, state=None):
        """The UNet (or its gathered `state`) as Kolors ships it (diffusers' unet/diffusion_pytorch_model.safetensors):
        Kolors has no SGM checkpoint layout (its encoder_hid_proj and ChatGLM have no SGM names)."""
        return dict(state or self.unet.state_dict())

    def lora_components(self, transformer_only: bool, train_text_encoder: bool):
        if train_text_encoder:  # diffusers' kohya reader only knows CLIP layer names; ComfyUI has no Kolors
            raise ValueError("train.train_text_encoder is not supported yet for kolors: no loader reads ChatGLM LoRA keys")
        return super().lora_components(transformer_only, train_text_encoder)

    @staticmethod
    def build_tiny(folder, **kw):
        from .kolors_tiny import build_tiny_kolors

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
