"""Adapters over peft: LoRA on our models, start from an existing LoRA, export/convert layouts."""
from .lora import (DIFFUSERS_FILE, WAN_FILE, AdapterError, apply_lora, export_lora, load_lora_into,
                   lora_modules, lora_weights, read_lora)

__all__ = ["DIFFUSERS_FILE", "WAN_FILE", "AdapterError", "apply_lora", "export_lora", "load_lora_into",
           "lora_modules", "lora_weights", "read_lora"]
