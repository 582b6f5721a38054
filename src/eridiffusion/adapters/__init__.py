from .lora import LoraSpec, filter_names, inject_lora, load_lora_state, lora_alphas, lora_scale, lora_state, to_dora_scale

__all__ = ["LoraSpec", "filter_names", "inject_lora", "load_lora_state", "lora_alphas", "lora_scale", "lora_state", "to_dora_scale"]
