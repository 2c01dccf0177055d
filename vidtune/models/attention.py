"""Attention backends: torch SDPA (default), flash-attn, SageAttention.

All take q, k, v as (B, S, H, Dh) and return (B, S, H, Dh). Optional backends are imported on first
use; a missing one is a clear error with the install command.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "sage")
_INSTALL = {
    "flash": "pip install flash-attn --no-build-isolation  (needs a CUDA build of torch)",
    "sage": "pip install sageattention  (needs a CUDA GPU)",
}


def _sdpa(q, k, v, mask=None):
    # SDPA wants (B, H, S, Dh); the transposes are views, as in diffusers' native backend.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash(q, k, v):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ImportError(f"attention_backend='flash' needs flash-attn: {_INSTALL['flash']}") from e
    return flash_attn_func(q, k, v)


def _sage(q, k, v):
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise ImportError(f"attention_backend='sage' needs SageAttention: {_INSTALL['sage']}") from e
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


_FNS = {"sdpa": _sdpa, "flash": _flash, "sage": _sage}


def check_backend(name: str) -> None:
    if name not in _FNS:
        raise ValueError(f"attention_backend={name!r} is not one of {', '.join(BACKENDS)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mask`` (bool, broadcastable to (B, H, Sq, Sk), True = attend) needs the sdpa backend."""
    if mask is None:
        return _FNS[backend](q, k, v)
    if backend != "sdpa":
        raise ValueError(f"masked attention runs on the sdpa backend, not {backend!r}")
    return _sdpa(q, k, v, mask)
