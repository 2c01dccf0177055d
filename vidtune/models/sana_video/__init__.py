"""Sana Video 2B (T2V, I2V) transformer."""
from .flavours import ARCHS, flavour_config, is_i2v, transformer_subfolder
from .model import KEEP_FP32, SanaVideoBlock, SanaVideoConfig, SanaVideoTransformer

# What the model registry (vidtune.models) reads of a family.
CLASS_NAMES = ("SanaVideoTransformer3DModel",)
CONFIG_CLASS = SanaVideoConfig
MODEL_CLASS = SanaVideoTransformer

__all__ = ["ARCHS", "CLASS_NAMES", "CONFIG_CLASS", "KEEP_FP32", "MODEL_CLASS", "SanaVideoBlock", "SanaVideoConfig",
           "SanaVideoTransformer", "flavour_config", "is_i2v", "transformer_subfolder"]
