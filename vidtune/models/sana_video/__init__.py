"""Sana Video 2B (T2V, I2V) transformer."""
from .flavours import ARCHS, flavour_config, is_i2v, transformer_subfolder
from .flow import sigma_sampler
from .model import KEEP_FP32, SanaVideoBlock, SanaVideoConfig, SanaVideoTransformer

# What the model registry (vidtune.models) reads of a family.
CLASS_NAMES = ("SanaVideoTransformer3DModel",)
CONFIG_CLASS = SanaVideoConfig
MODEL_CLASS = SanaVideoTransformer
TEXT_LEN = 300  # SanaVideoPipeline's max_sequence_length: Gemma2 tokens per caption
TEXT_ENCODER = "gemma2"
# Tokens the text encoder runs on: TEXT_LEN + the instruction prefix (~1,160 characters, about 250
# Gemma tokens: an estimate, for the planner's caching phase) - 2.
TEXT_ENCODER_LEN = 550

__all__ = ["ARCHS", "CLASS_NAMES", "CONFIG_CLASS", "KEEP_FP32", "MODEL_CLASS", "SanaVideoBlock", "SanaVideoConfig",
           "SanaVideoTransformer", "TEXT_ENCODER", "TEXT_ENCODER_LEN", "TEXT_LEN", "flavour_config", "is_i2v",
           "sigma_sampler", "transformer_subfolder"]
