"""Model families. ``from_pretrained`` loads any supported diffusers-layout checkpoint."""
from .load import from_pretrained

__all__ = ["from_pretrained"]
