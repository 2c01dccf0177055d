"""Chunked feed-forward: the FFN over token chunks, so the (N, ffn_dim) intermediate never exists.

Shapes: x (..., D) is viewed as (N, D), N = product of the leading dims (so chunking works at
batch 1: chunk_size counts tokens). fn maps (n, D) -> (n, D_out) row by row (the Wan FFN
proj(D -> ffn_dim) -> gelu_tanh -> Linear(ffn_dim -> D)); out is (..., D_out).

Memory: each chunk runs under non-reentrant activation checkpointing, so forward keeps only the
chunk inputs (views of x) and the chunk outputs; backward recomputes one chunk's intermediate at
a time. Peak intermediate bytes drop from N * ffn_dim to chunk_size * ffn_dim (times the few
tensors the FFN saves). Backward math is fn's own: grad_x[chunk] = vjp of fn at x[chunk], and the
parameter grads are the sum over chunks, which autograd accumulates. fn is any callable (the
block's own modules), so peft LoRA or torchao-quantized Linears compose unchanged.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ENV_CHUNK_SIZE = "WAN_FEED_FORWARD_CHUNK_SIZE"


def resolve_chunk_size(configured: int | None) -> int | None:
    """The chunk size to use: ``$WAN_FEED_FORWARD_CHUNK_SIZE`` if set (0 disables), else
    ``configured``. None means no chunking."""
    raw = os.environ.get(ENV_CHUNK_SIZE, "").strip()
    if raw:
        try:
            configured = int(raw)
        except ValueError:
            raise ValueError(
                f"{ENV_CHUNK_SIZE}={raw!r} is not an integer: set a token count, or 0 to disable "
                "feed-forward chunking"
            ) from None
    return configured if configured is not None and configured > 0 else None


def chunked_feed_forward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """fn(x) computed over chunks of ``chunk_size`` tokens (all leading dims of x flattened)."""
    flat = x.reshape(-1, x.shape[-1])
    if chunk_size is None or chunk_size <= 0 or chunk_size >= flat.shape[0]:
        return fn(x)
    chunks = flat.split(chunk_size)
    if torch.is_grad_enabled():
        outs = [checkpoint(fn, c, use_reentrant=False) for c in chunks]
    else:
        outs = [fn(c) for c in chunks]
    out = torch.cat(outs)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def recomputed_when_saved(out: torch.Tensor, recompute: Callable[[], torch.Tensor]):
    """Inside the block, an op that saves ``out`` (or a view of it) for backward keeps nothing of
    it: backward calls ``recompute()`` when it reads it. For an elementwise activation whose input
    is kept anyway (its own backward needs it): the FFN's ``gelu(proj(x))``, which the Linear
    after it saves for its weight's (or LoRA's) gradient, is tokens x ffn_dim that one
    elementwise pass rebuilds. Inert when saved-tensor hooks are already active (activation
    checkpointing, offload, chunked FF): they decide what is kept; and under torch.compile, whose
    partitioner picks what to recompute itself."""
    if (not torch.is_grad_enabled() or not out.requires_grad or torch.compiler.is_compiling()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
        yield
        return
    storage = weakref.ref(out.untyped_storage())  # a strong reference would keep out's memory

    def pack(t):
        try:
            same = t.untyped_storage() is storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one (int8 weights)
            same = False
        return (t.size(), t.stride(), t.storage_offset()) if same else t

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        with torch.no_grad():
            return recompute().as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class ChunkedFeedForward(nn.Module):
    """Wraps a feed-forward ``fn``; ``chunk_size`` (tokens, None = off) can be changed any time.

    A module ``fn`` is registered as the child ``fn``, so its parameters are named ``fn.*``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int | None = None):
        super().__init__()
        self.fn = fn
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_feed_forward(self.fn, x, self.chunk_size)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
