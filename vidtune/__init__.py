"""vidtune: a lean, performance-first trainer for video diffusion transformers."""

__version__ = "0.1.0"
