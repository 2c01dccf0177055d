"""Pure-torch references: the spec every kernel is tested and benchmarked against.

Each function is written for clarity, computes in fp32 where the model does, and returns the
dtype the fused op returns. Autograd through these functions gives the reference gradients.
"""
from __future__ import annotations

import torch

# --- rope, qk_norm_rope, modulate, gated_residual, gelu_tanh (kernels/rope.py, modulate.py,
# --- residual.py, gelu.py) ---------------------------------------------------------------


# --- tread gather/scatter, chunked feed-forward (kernels/tread.py, ffn.py) -------------------


def tread_gather_ref(x: torch.Tensor, idx: torch.Tensor, *, shared: bool = False) -> torch.Tensor:
    """x (B, S, *rest) -> (B, K, *rest) with row b = x[b, idx[b]]; ``shared``: x is (S, *rest)."""
    if shared:
        return x[idx]
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def tread_scatter_ref(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """base (B, S, *rest), y (B, K, *rest) -> base with rows idx[b] of sample b replaced by y[b]."""
    out = base.clone()
    out[torch.arange(base.shape[0], device=base.device)[:, None], idx] = y
    return out
