"""Wan 2.1 / 2.2 (T2V, I2V, TI2V) transformer."""
from .flavours import ARCHS, BOUNDARY_RATIO, flavour_config, transformer_subfolder
from .model import KEEP_FP32, WanBlock, WanConfig, WanTransformer
from .pipeline import WanInputs, boundary_ratio, pipeline_index
from .pipeline import wan_inputs as model_inputs

# What the model registry (vidtune.models) reads of a family.
CLASS_NAMES = ("WanTransformer3DModel",)
CONFIG_CLASS = WanConfig
MODEL_CLASS = WanTransformer
TEXT_LEN = 512  # WanPipeline pads UMT5 prompts to 512 tokens

__all__ = ["ARCHS", "BOUNDARY_RATIO", "CLASS_NAMES", "CONFIG_CLASS", "KEEP_FP32", "MODEL_CLASS", "TEXT_LEN", "WanBlock",
           "WanConfig", "WanInputs", "WanTransformer", "boundary_ratio", "flavour_config", "model_inputs",
           "pipeline_index", "transformer_subfolder"]
