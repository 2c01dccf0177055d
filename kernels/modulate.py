# adaLN modulate: LayerNorm without affine, then scale and shift.
#
# Shapes / strides
#   x (B, S, D), any strides; out (B, S, D) contiguous in x.dtype; mean, rstd (B, S) fp32 saved.
#   shift, scale fp32, broadcastable to x: per sample (B, 1, D) or per token (B, S, D), usually
#   non-contiguous chunks of a (B, 6, D) / (B, S, 6, D) table. The kernels read them through
#   their (expanded) strides, so a per-sample table has token stride 0 and is never copied.
# Math (fp32 statistics, one rounding):
#   xh = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps);   out = xh * (1 + scale) + shift
#   backward:  dshift = sum_bcast(g);  dscale = sum_bcast(g * xh);  dxh = g * (1 + scale);
#              dx = rstd * (dxh - mean_D(dxh) - xh * mean_D(dxh * xh))
#   sum_bcast sums over the dims where shift/scale broadcast (the tokens, for per-sample).
from __future__ import annotations

import torch
from torch import nn

from ._dispatch import HAS_TRITON, use_triton
from ._triton_common import interpreting, row_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import cast_out

    @triton.jit
    def _modulate_fwd_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr, S, D, eps,
                             sx_b, sx_s, sh_b, sh_s, sc_b, sc_s,
                             BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        s = row % S
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        x = tl.load(x_ptr + b * sx_b + s * sx_s + d, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
        shift = tl.load(shift_ptr + b * sh_b + s * sh_s + d, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * sc_b + s * sc_s + d, mask=mask, other=0.0).to(tl.float32)
        out = xc * rstd * (1.0 + scale) + shift
        tl.store(out_ptr + row * D + d, cast_out(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _modulate_bwd_kernel(g_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dscale_ptr,
                             S, D, rows_per_prog,
                             sg_b, sg_s, sx_b, sx_s, sc_b, sc_s,
                             PER_TOKEN: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
                             BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Grid (B, chunks): each program walks rows_per_prog tokens of one sample. Per-sample
        # dscale is accumulated in fp32 registers and written as one partial per program.
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        s_end = tl.minimum(S, (chunk + 1) * rows_per_prog)
        for s in range(chunk * rows_per_prog, s_end):
            row = b * S + s
            g = tl.load(g_ptr + b * sg_b + s * sg_s + d, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + b * sx_b + s * sx_s + d, mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + b * sc_b + s * sc_s + d, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xh = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
            dxh = g * (1.0 + scale)
            c1 = tl.sum(dxh, axis=0) / D
            c2 = tl.sum(dxh * xh, axis=0) / D
            dx = rstd * (dxh - c1 - xh * c2)
            tl.store(dx_ptr + row * D + d, cast_out(dx, dx_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
            if COMPUTE_DSCALE:
                if PER_TOKEN:
                    tl.store(dscale_ptr + row * D + d, g * xh, mask=mask)
                else:
                    acc += g * xh
        if COMPUTE_DSCALE and not PER_TOKEN:
            tl.store(dscale_ptr + (b * tl.num_programs(1) + chunk) * D + d, acc, mask=mask)


def _per_token(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and t.shape[-2] != 1


def _stat_strides(t: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    e = t.expand(x.shape)
    return e.stride(0), e.stride(1)


def modulate_forward(x, shift, scale, eps):
    B, S, D = x.shape
    if use_triton(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        shift = shift if shift.stride(-1) == 1 else shift.contiguous()
        scale = scale if scale.stride(-1) == 1 else scale.contiguous()
        out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
        mean = torch.empty((B, S), dtype=torch.float32, device=x.device)
        rstd = torch.empty((B, S), dtype=torch.float32, device=x.device)
        _modulate_fwd_kernel[(B * S,)](x, shift, scale, out, mean, rstd, S, D, eps,
                                       x.stride(0), x.stride(1), *_stat_strides(shift, x),
                                       *_stat_strides(scale, x), BLOCK_D=triton.next_power_of_2(D),
                                       ROUND_BF16=interpreting())
        return out, mean, rstd
    normed, mean, rstd = torch.native_layer_norm(x.float(), (D,), None, None, eps)
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    torch.addcmul(shift, normed, scale + 1, out=out)  # fp32 math, one rounding into out
    return out, mean.squeeze(-1), rstd.squeeze(-1)


def modulate_backward(grad, x, scale, mean, rstd, compute_dscale):
    """Returns (dx, dscale); dscale is summed to scale's shape and empty if not computed."""
    B, S, D = x.shape
    per_token = _per_token(scale)
    if use_triton(x):
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        x = x if x.stride(-1) == 1 else x.contiguous()
        scale = scale if scale.stride(-1) == 1 else scale.contiguous()
        rows_per_prog = triton.cdiv(S, max(1, row_programs(B * S, x.device) // B))
        chunks = triton.cdiv(S, rows_per_prog)
        dx = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
        shape = ((B, S, D) if per_token else (B, chunks, D)) if compute_dscale else (0,)
        dscale = torch.empty(shape, dtype=torch.float32, device=x.device)
        _modulate_bwd_kernel[(B, chunks)](
            grad, x, scale, mean, rstd, dx, dscale, S, D, rows_per_prog,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), *_stat_strides(scale, x),
            PER_TOKEN=per_token, COMPUTE_DSCALE=compute_dscale, BLOCK_D=triton.next_power_of_2(D),
            ROUND_BF16=interpreting())
        if compute_dscale:
            dscale = dscale.sum(1, keepdim=True) if not per_token else dscale
            dscale = dscale.sum_to_size(scale.shape)
        return dx, dscale
    xf = x.float()
    xhat = (xf - mean.unsqueeze(-1)).mul_(rstd.unsqueeze(-1))
    gf = grad.float()
    dscale = (gf * xhat).sum_to_size(scale.shape).contiguous() if compute_dscale else xhat.new_empty(0)
    dx = torch.ops.aten.native_layer_norm_backward(gf * (scale + 1), xf, (D,), mean.unsqueeze(-1),
                                          rstd.unsqueeze(-1), None, None, [True, False, False])[0]
    return dx.to(x.dtype, memory_format=torch.contiguous_format), dscale


@torch.library.custom_op("vidtune::modulate_fwd", mutates_args=())
def _modulate_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulate_forward(x, shift, scale, eps)


@_modulate_fwd_op.register_fake
def _(x, shift, scale, eps):
    B, S, D = x.shape
    stat = torch.empty((B, S), dtype=torch.float32, device=x.device)
    return torch.empty((B, S, D), dtype=x.dtype, device=x.device), stat, torch.empty_like(stat)


@torch.library.custom_op("vidtune::modulate_bwd", mutates_args=())
def _modulate_bwd_op(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor, compute_dscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return modulate_backward(grad, x, scale, mean, rstd, compute_dscale)


@_modulate_bwd_op.register_fake
def _(grad, x, scale, mean, rstd, compute_dscale):
    dscale = torch.empty(scale.shape if compute_dscale else (0,), dtype=torch.float32, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dscale


def _sum_to_fp32(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """grad summed over the broadcast dims of `shape`, accumulated in fp32."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    out = grad.sum(dims, keepdim=True, dtype=torch.float32) if dims else grad.float()
    return out.reshape(shape)


class ModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        out, mean, rstd = torch.ops.vidtune.modulate_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_shape = shift.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dscale = torch.ops.vidtune.modulate_bwd(grad, x, scale, mean, rstd, ctx.needs_input_grad[2])
        # dshift is a plain reduction of grad: left to torch, no kernel work to fuse.
        dshift = _sum_to_fp32(grad, ctx.shift_shape) if ctx.needs_input_grad[1] else None
        return dx, dshift, (dscale.to(scale.dtype) if ctx.needs_input_grad[2] else None), None


def _check(x: torch.Tensor, *stats: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"expected x of shape (B, S, D), got {tuple(x.shape)}")
    for t in stats:
        if t.dim() != 3 or torch.broadcast_shapes(t.shape, x.shape) != x.shape:
            raise ValueError(f"modulation tensors must be (B, 1, D) or (B, S, D) for x "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(LayerNorm_noaffine(x) * (1 + scale) + shift) in fp32, returned in x.dtype."""
    _check(x, shift, scale)
    return ModulateFunction.apply(x, shift, scale, float(eps))


class Modulate(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return modulate(x, shift, scale, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
