from .lora import LoraSpec, inject_lora, lora_scale, lora_state, load_lora_state, select_linear_modules

__all__ = ["LoraSpec", "inject_lora", "lora_scale", "lora_state", "load_lora_state", "select_linear_modules"]
