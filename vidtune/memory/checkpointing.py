"""Activation (gradient) checkpointing, applied from outside the model.

Checkpointing replaces a block's *instance* ``forward`` with a checkpointed call of the forward it
had, so parameter names (and so state dicts and adapter keys) do not change. Order matters: apply
offload before checkpointing, so the recompute in backward goes through the offload-wrapped
forward and loads the block's weights again (the case diffusers' group offload breaks).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(inner):
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        inner = forward.__wrapped__  # read at call time: apply_compile may swap in a compiled one
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    forward._vidtune_checkpointed = True
    forward._vidtune_wrapper = True
    return forward


def apply_activation_checkpointing(blocks: nn.ModuleList, every_n: int = 1) -> int:
    """Checkpoint every ``every_n``-th block (blocks 0, n, 2n, ...). Returns how many were wrapped.

    ``every_n=1`` checkpoints all blocks (lowest memory); larger values trade memory for less
    recompute. Idempotent: an already checkpointed block is left as it is.
    """
    if every_n < 1:
        raise ValueError(f"gradient checkpointing every_n must be >= 1, got {every_n}")
    wrapped = 0
    for i, block in enumerate(blocks):
        if i % every_n or getattr(block.forward, "_vidtune_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
        wrapped += 1
    return wrapped


def remove_activation_checkpointing(blocks: nn.ModuleList) -> None:
    for block in blocks:
        if getattr(block.forward, "_vidtune_checkpointed", False):
            block.forward = block.forward.__wrapped__  # whatever forward it had before
