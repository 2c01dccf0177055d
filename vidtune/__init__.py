"""vidtune: a lean, performance-first trainer for video diffusion transformers."""

from . import quiet

quiet.install()  # before torch, torchao, bitsandbytes or diffusers are imported anywhere

__version__ = "0.1.0"
