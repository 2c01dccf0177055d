"""Adapters over peft: LoRA and LoKr on our models, start from an existing adapter, export and
convert between key layouts (``layouts``), merge (``tools``), the run's files (``export``).

Names load lazily, so ``vidtune.adapters.names`` (the torch-free config checks) imports nothing
heavy.
"""
import importlib

_WHERE = {
    "names": ("AdapterError", "check_adapter", "export_layouts"),
    "layouts": ("LAYOUTS", "AdapterModule", "diffusers_reads", "read_file", "write_file", "write_state"),
    "lora": ("DIFFUSERS_FILE", "WAN_FILE", "WAN_LOKR_FILE", "adapter_layers", "adapter_metadata", "adapter_modules",
             "apply_lora", "export_lora", "load_lora_into", "lora_modules", "lora_weights", "read_lora"),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name):
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
