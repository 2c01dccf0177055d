"""Wan 2.1 / 2.2 (T2V, I2V) transformer."""
from .model import WanBlock, WanConfig, WanTransformer

__all__ = ["WanBlock", "WanConfig", "WanTransformer"]
