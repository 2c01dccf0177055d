"""Wan 2.1 / 2.2 (T2V, I2V) transformer."""
from .flavours import ARCHS, flavour_config, transformer_subfolder
from .model import KEEP_FP32, WanBlock, WanConfig, WanTransformer

# What the model registry (vidtune.models) reads of a family.
CLASS_NAMES = ("WanTransformer3DModel",)
CONFIG_CLASS = WanConfig
MODEL_CLASS = WanTransformer
TEXT_LEN = 512  # WanPipeline pads UMT5 prompts to 512 tokens

__all__ = ["ARCHS", "CLASS_NAMES", "CONFIG_CLASS", "KEEP_FP32", "MODEL_CLASS", "WanBlock", "WanConfig",
           "WanTransformer", "TEXT_LEN", "flavour_config", "transformer_subfolder"]
