"""Wan 2.2 S2V (speech-to-video) transformer."""
from .flavours import ARCHS, flavour_config, transformer_subfolder
from .keys import checkpoint_key, official_module
from .model import KEEP_FP32, MOTION_FRAMES, WanS2VBlock, WanS2VConfig, WanS2VTransformer, example_inputs

# What the model registry (vidtune.models) reads of a family.
CLASS_NAMES = ("WanS2VTransformer3DModel", "WanModel_S2V")
CONFIG_CLASS = WanS2VConfig
MODEL_CLASS = WanS2VTransformer
TEXT_LEN = 512  # Wan pads UMT5 prompts to 512 tokens

__all__ = ["ARCHS", "CLASS_NAMES", "CONFIG_CLASS", "KEEP_FP32", "MODEL_CLASS", "MOTION_FRAMES", "TEXT_LEN", "WanS2VBlock",
           "WanS2VConfig", "WanS2VTransformer", "checkpoint_key", "example_inputs", "flavour_config", "official_module",
           "transformer_subfolder"]
