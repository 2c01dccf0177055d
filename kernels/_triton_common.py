"""Pieces shared by the rope, modulate, residual and gelu kernels."""
from __future__ import annotations

import functools
import os

import torch

from ._dispatch import HAS_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers call it every step); 1 for
    the interpreter, so per-SM program counts stay a handful there."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def row_programs(rows: int, device: torch.device) -> int:
    """Programs for kernels that stride over rows: a few per SM on GPU, a handful when interpreted."""
    return max(1, min(rows, 4 * sm_count(device) if device.type == "cuda" else 8))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def cast_out(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
        """x (fp32) -> dtype. The Triton interpreter truncates fp32 -> bf16, so when ROUND_BF16 is
        set (interpreter only) round to nearest even by hand, as the GPU's cast does."""
        if ROUND_BF16 and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)
