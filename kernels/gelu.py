# GELU, tanh approximation: the Wan feed-forward activation.
#
# Shapes / strides: x any shape, flattened (contiguous) for the kernels; out like x, x.dtype.
# Math (fp32, one rounding), k = sqrt(2/pi), a = 0.044715:
#   u = k (x + a x^3),  t = tanh(u),  out = 0.5 x (1 + t)
#   backward:  dx = g * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2))
# tanh is written as sign(u) (1 - e) / (1 + e), e = exp(-2|u|): e never overflows, the limits at
# +-inf are exact and there is no libdevice call, so the same kernel runs on CUDA, ROCm and the
# CPU interpreter.
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import HAS_TRITON, use_triton
from ._triton_common import interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import cast_out

    @triton.jit
    def _tanh_inner(x):
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u >= 0, t, -t)

    @triton.jit
    def _gelu_tanh_fwd_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = 0.5 * x * (1.0 + _tanh_inner(x))
        tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)

    @triton.jit
    def _gelu_tanh_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = _tanh_inner(x)
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        tl.store(dx_ptr + offs, cast_out(g * dgelu, dx_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


_BLOCK = 1024


def gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        _gelu_tanh_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, out, n, BLOCK=_BLOCK, ROUND_BF16=interpreting())
        return out
    # F.gelu computes in fp32 (opmath) for low-precision inputs; outputs are contiguous like the fakes.
    return F.gelu(x, approximate="tanh").contiguous()


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        grad, x = grad.contiguous(), x.contiguous()
        dx = torch.empty_like(x)
        n = x.numel()
        _gelu_tanh_bwd_kernel[(triton.cdiv(n, _BLOCK),)](grad, x, dx, n, BLOCK=_BLOCK,
                                                         ROUND_BF16=interpreting())
        return dx
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh").contiguous()


@torch.library.custom_op("vidtune::gelu_tanh_fwd", mutates_args=())
def _gelu_tanh_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_forward(x)


@_gelu_tanh_fwd_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vidtune::gelu_tanh_bwd", mutates_args=())
def _gelu_tanh_bwd_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_backward(grad, x)


@_gelu_tanh_bwd_op.register_fake
def _(grad, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.vidtune.gelu_tanh_fwd(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.vidtune.gelu_tanh_bwd(grad, x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") with fp32 math, output in x.dtype."""
    return GeluTanhFunction.apply(x)


class GeluTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)
