"""Pure-torch references: the spec every kernel is tested and benchmarked against.

Each function is written for clarity, computes in fp32 where the model does, and returns the
dtype the fused op returns. Autograd through these functions gives the reference gradients.
"""
from __future__ import annotations

import torch

# --- rope, qk_norm_rope, modulate, gated_residual, gelu_tanh (kernels/rope.py, modulate.py,
# --- residual.py, gelu.py) ---------------------------------------------------------------


# --- tread gather/scatter, chunked feed-forward (kernels/tread.py, ffn.py) -------------------
