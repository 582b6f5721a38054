from .lora import (KINDS, LoraSpec, filter_names, inject_lora, load_lora_file_state, load_lora_state, lora_alphas,
                   lora_file_state, lora_scale, lora_state)

__all__ = ["KINDS", "LoraSpec", "filter_names", "inject_lora", "load_lora_file_state", "load_lora_state", "lora_alphas",
           "lora_file_state", "lora_scale", "lora_state"]
