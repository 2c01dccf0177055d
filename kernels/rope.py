# Wan 3D RoPE and the fused Wan q/k path (RMSNorm across heads -> RoPE).
#
# Shapes / strides
#   rope:          x (B, S, H, Dh), any strides; out (B, S, H, Dh) contiguous.
#   qk_norm_rope:  x (B, S, D = H*Dh), any strides; weight (D,); out (B, S, H, Dh) contiguous;
#                  rstd (B, S) fp32 saved for backward.
#   cos, sin:      fp32 (S, P) shared by the batch (batch stride 0) or (B, S, P) per sample,
#                  P = Dh // 2, pair i of every head uses column i.
# Math (pairs are adjacent elements, c = cos[.., i], s = sin[.., i]), all in fp32, one rounding:
#   out[2i]   = x[2i] c - x[2i+1] s
#   out[2i+1] = x[2i] s + x[2i+1] c
#   A rotation's transpose is the rotation by -theta, so  dx = rope(g, c, -s);  no grad to c, s.
# qk_norm_rope:  rstd = 1 / sqrt(mean_D(x^2) + eps),  xh = x * rstd,  n = xh * w,  out = rope(n)
#   backward:  gn = rope(g, c, -s) flattened to D;  dw = sum_tokens(gn * xh);  dn = gn * w;
#              dx = rstd * (dn - xh * mean_D(dn * xh)).
# The fused op never materialises n: the forward reads x once and writes out once.
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
    def _rotate(xe, xo, c, s):
        return xe * c - xo * s, xe * s + xo * c

    @triton.jit
    def _rope_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, P,
                   sx_b, sx_s, sx_h, sx_d, sc_b, sc_s,
                   SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                   ROUND_BF16: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        s = row % S
        h = tl.arange(0, BLOCK_H)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        mask = (h < H) & (p < P)
        c = tl.load(cos_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
        sn = SIGN * tl.load(sin_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
        x = x_ptr + b * sx_b + s * sx_s + h * sx_h + 2 * p * sx_d
        xe = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(x + sx_d, mask=mask, other=0.0).to(tl.float32)
        oe, oo = _rotate(xe, xo, c, sn)
        out = out_ptr + row * H * 2 * P + h * 2 * P + 2 * p
        tl.store(out, cast_out(oe, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(out + 1, cast_out(oo, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)

    @triton.jit
    def _rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, P,
                         sx_b, sx_s, sx_h, sx_d, sc_b, sc_s,
                         BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
        _rope_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, P, sx_b, sx_s, sx_h, sx_d, sc_b, sc_s,
                   1.0, BLOCK_H, BLOCK_P, ROUND_BF16)

    @triton.jit
    def _rope_bwd_kernel(g_ptr, cos_ptr, sin_ptr, dx_ptr, S, H, P,
                         sg_b, sg_s, sg_h, sg_d, sc_b, sc_s,
                         BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
        _rope_rows(g_ptr, cos_ptr, sin_ptr, dx_ptr, S, H, P, sg_b, sg_s, sg_h, sg_d, sc_b, sc_s,
                   -1.0, BLOCK_H, BLOCK_P, ROUND_BF16)

    @triton.jit
    def _qk_norm_rope_fwd_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, S, H, P, eps,
                                 sx_b, sx_s, sx_d, sc_b, sc_s,
                                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                                 ROUND_BF16: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        s = row % S
        h = tl.arange(0, BLOCK_H)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        mask = (h < H) & (p < P)
        d = h * 2 * P + 2 * p  # even feature index across all heads
        x = x_ptr + b * sx_b + s * sx_s + d * sx_d
        xe = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(x + sx_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(xe * xe + xo * xo, axis=1), axis=0) / (H * 2 * P) + eps)
        we = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + d + 1, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
        sn = tl.load(sin_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
        oe, oo = _rotate(xe * rstd * we, xo * rstd * wo, c, sn)
        out = out_ptr + row * H * 2 * P + d
        tl.store(out, cast_out(oe, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(out + 1, cast_out(oo, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, dw_ptr,
                                 n_rows, S, H, P,
                                 sg_b, sg_s, sg_h, sg_d, sx_b, sx_s, sx_d, sc_b, sc_s,
                                 COMPUTE_DW: tl.constexpr,
                                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                                 ROUND_BF16: tl.constexpr):
        # Programs stride over rows and keep a private fp32 dw partial (summed on the host).
        pid = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        mask = (h < H) & (p < P)
        d = h * 2 * P + 2 * p
        we = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + d + 1, mask=mask, other=0.0).to(tl.float32)
        dwe = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
        dwo = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
        for row in range(pid, n_rows, tl.num_programs(0)):
            b = row // S
            s = row % S
            g = g_ptr + b * sg_b + s * sg_s + h * sg_h + 2 * p * sg_d
            ge = tl.load(g, mask=mask, other=0.0).to(tl.float32)
            go = tl.load(g + sg_d, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(cos_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
            sn = tl.load(sin_ptr + b * sc_b + s * sc_s + p, mask=p < P, other=0.0)
            gne, gno = _rotate(ge, go, c, -sn)
            rstd = tl.load(rstd_ptr + row)
            x = x_ptr + b * sx_b + s * sx_s + d * sx_d
            xhe = tl.load(x, mask=mask, other=0.0).to(tl.float32) * rstd
            xho = tl.load(x + sx_d, mask=mask, other=0.0).to(tl.float32) * rstd
            if COMPUTE_DW:
                dwe += gne * xhe
                dwo += gno * xho
            dne = gne * we
            dno = gno * wo
            m = tl.sum(tl.sum(dne * xhe + dno * xho, axis=1), axis=0) / (H * 2 * P)
            dx = dx_ptr + row * H * 2 * P + d
            dx_ty = dx_ptr.dtype.element_ty
            tl.store(dx, cast_out(rstd * (dne - xhe * m), dx_ty, ROUND_BF16), mask=mask)
            tl.store(dx + 1, cast_out(rstd * (dno - xho * m), dx_ty, ROUND_BF16), mask=mask)
        if COMPUTE_DW:
            dw = dw_ptr + pid * H * 2 * P + d
            tl.store(dw, dwe, mask=mask)
            tl.store(dw + 1, dwo, mask=mask)


def _check_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    B, S = x.shape[:2]
    if cos.shape != sin.shape or cos.shape[-2:] != (S, head_dim // 2) or cos.dim() not in (2, 3) \
            or (cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(
            f"rope tables must be (S, Dh/2) = ({S}, {head_dim // 2}) or (B, S, Dh/2), got cos "
            f"{tuple(cos.shape)} and sin {tuple(sin.shape)}; build them with wan_rope_freqs"
        )


def _table_strides(cos: torch.Tensor) -> tuple[int, int]:
    return (cos.stride(0) if cos.dim() == 3 else 0), cos.stride(-2)


def _rotation(cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Complex table broadcastable against (B, S, H, P): one complex multiply per pair."""
    return torch.complex(cos.float(), sin.float() * sign).unsqueeze(-2)


def _as_complex(t: torch.Tensor) -> torch.Tensor:
    """(..., Dh) fp32 -> (..., Dh/2) complex view; copies only when the layout does not allow it."""
    pairs = t.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _rotate_torch(t: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """(..., H, Dh) rotated by rot in fp32; in place when t.float() already made a copy."""
    tc = _as_complex(t.float())
    tc = tc.mul_(rot) if tc.data_ptr() != t.data_ptr() else tc * rot
    return torch.view_as_real(tc).flatten(-2)


def _launch_rope(kernel, x, cos, sin):
    B, S, H, Dh = x.shape
    out = torch.empty((B, S, H, Dh), dtype=x.dtype, device=x.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    kernel[(B * S,)](x, cos, sin, out, S, H, Dh // 2, *x.stride(), *_table_strides(cos),
                     BLOCK_H=triton.next_power_of_2(H), BLOCK_P=triton.next_power_of_2(Dh // 2),
                     ROUND_BF16=interpreting())
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return _launch_rope(_rope_fwd_kernel, x, cos, sin)
    return _rotate_torch(x, _rotation(cos, sin, 1.0)).to(x.dtype, memory_format=torch.contiguous_format)


def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton(grad):
        return _launch_rope(_rope_bwd_kernel, grad, cos, sin)
    dx = _rotate_torch(grad, _rotation(cos, sin, -1.0))
    return dx.to(grad.dtype, memory_format=torch.contiguous_format)


def qk_norm_rope_forward(x, weight, eps, cos, sin, heads):
    B, S, D = x.shape
    Dh = D // heads
    if use_triton(x):
        out = torch.empty((B, S, heads, Dh), dtype=x.dtype, device=x.device)
        rstd = torch.empty((B, S), dtype=torch.float32, device=x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
        _qk_norm_rope_fwd_kernel[(B * S,)](
            x, weight, cos, sin, out, rstd, S, heads, Dh // 2, eps, *x.stride(), *_table_strides(cos),
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_P=triton.next_power_of_2(Dh // 2),
            ROUND_BF16=interpreting())
        return out, rstd
    # vector_norm reads x in its own dtype (no fp32 copy of x); rstd is folded into the rotation.
    rstd = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).pow_(2).div_(D).add_(eps).rsqrt_()
    rot = _rotation(cos, sin, 1.0) * rstd[..., None, None]
    xw = torch.mul(x, weight.float()).unflatten(-1, (heads, Dh))
    out = torch.view_as_real(_as_complex(xw).mul_(rot)).flatten(-2)
    out = out.to(x.dtype, memory_format=torch.contiguous_format)
    return out, rstd


def qk_norm_rope_backward(grad, x, weight, cos, sin, rstd, compute_dw):
    B, S, D = x.shape
    heads, Dh = grad.shape[-2:]
    if use_triton(x):
        dx = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
        n_prog = row_programs(B * S, x.device)
        dw = torch.empty((n_prog, D) if compute_dw else (0,), dtype=torch.float32, device=x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
        _qk_norm_rope_bwd_kernel[(n_prog,)](
            grad, x, weight, cos, sin, rstd, dx, dw, B * S, S, heads, Dh // 2,
            *grad.stride(), *x.stride(), *_table_strides(cos), COMPUTE_DW=compute_dw,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_P=triton.next_power_of_2(Dh // 2),
            ROUND_BF16=interpreting())
        return dx, (dw.sum(0) if compute_dw else dw).to(weight.dtype)
    rstd = rstd.unsqueeze(-1)
    gn = _rotate_torch(grad, _rotation(cos, sin, -1.0)).reshape(B, S, D)
    xhat = x * rstd
    dw = (gn * xhat).sum((0, 1)) if compute_dw else gn.new_empty(0)
    dn = gn.mul_(weight.float())
    xhat.mul_(torch.linalg.vecdot(dn, xhat).unsqueeze_(-1).div_(D))
    dx = dn.sub_(xhat).mul_(rstd).to(x.dtype, memory_format=torch.contiguous_format)
    return dx, dw.to(weight.dtype)


@torch.library.custom_op("vidtune::rope_fwd", mutates_args=())
def _rope_fwd_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_forward(x, cos, sin)


@_rope_fwd_op.register_fake
def _(x, cos, sin):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vidtune::rope_bwd", mutates_args=())
def _rope_bwd_op(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_backward(grad, cos, sin)


@_rope_bwd_op.register_fake
def _(grad, cos, sin):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


@torch.library.custom_op("vidtune::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                         sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_forward(x, weight, eps, cos, sin, heads)


@_qk_norm_rope_fwd_op.register_fake
def _(x, weight, eps, cos, sin, heads):
    B, S, D = x.shape
    out = torch.empty((B, S, heads, D // heads), dtype=x.dtype, device=x.device)
    return out, torch.empty((B, S), dtype=torch.float32, device=x.device)


@torch.library.custom_op("vidtune::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, rstd: torch.Tensor,
                         compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_backward(grad, x, weight, cos, sin, rstd, compute_dw)


@_qk_norm_rope_bwd_op.register_fake
def _(grad, x, weight, cos, sin, rstd, compute_dw):
    dw = torch.empty(weight.shape if compute_dw else (0,), dtype=weight.dtype, device=weight.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dw


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.vidtune.rope_fwd(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return torch.ops.vidtune.rope_bwd(grad, cos, sin), None, None


class QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin, heads):
        out, rstd = torch.ops.vidtune.qk_norm_rope_fwd(x, weight, eps, cos, sin, heads)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        dx, dw = torch.ops.vidtune.qk_norm_rope_bwd(grad, x, weight, cos, sin, rstd,
                                                    ctx.needs_input_grad[1])
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, S, H, Dh) by fp32 tables (S, Dh/2) or (B, S, Dh/2)."""
    if x.dim() != 4:
        raise ValueError(f"rope expects x of shape (B, S, H, Dh), got {tuple(x.shape)}")
    _check_tables(x, cos, sin, x.shape[-1])
    return RopeFunction.apply(x, cos, sin)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, heads: int) -> torch.Tensor:
    """RMSNorm over the last dim of x (B, S, H*Dh) times weight, then RoPE: (B, S, H, Dh)."""
    if x.dim() != 3 or x.shape[-1] % heads or weight.shape != x.shape[-1:]:
        raise ValueError(f"qk_norm_rope expects x (B, S, heads*Dh) with heads={heads} and weight "
                         f"(heads*Dh,), got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    _check_tables(x, cos, sin, x.shape[-1] // heads)
    return QKNormRopeFunction.apply(x, weight, float(eps), cos, sin, int(heads))


def rope_freqs_at(head_dim: int, positions: torch.Tensor, theta: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact fp32 (cos, sin) of shape (S, head_dim // 2) for integer (frame, h, w) ``positions``
    (S, 3), in Wan's [t, h, w] split of the head dim; float64 angles, so a negative position is the
    conjugate rotation (Wan S2V places motion frames at negative times)."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    pos = positions.to(device=device, dtype=torch.float64)
    angles = [torch.outer(pos[:, i], 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
              for i, dim in enumerate((t_dim, h_dim, w_dim))]
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def wan_rope_freqs(head_dim: int, num_frames: int, height: int, width: int,
                   theta: float = 10000.0, max_seq_len: int = 1024,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact fp32 (cos, sin) of shape (F*H*W, head_dim // 2) for the post-patch grid.

    Same values as diffusers' WanRotaryPosEmbed (freqs_cos[..., 0::2], freqs_sin[..., 1::2]): per
    axis float64 frequencies, pairs ordered [t, h, w], tokens f-major then h then w.
    """
    if max(num_frames, height, width) > max_seq_len:
        raise ValueError(f"grid ({num_frames}, {height}, {width}) exceeds max_seq_len={max_seq_len}")
    axes = [torch.arange(n, device=device) for n in (num_frames, height, width)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)
    return rope_freqs_at(head_dim, grid, theta, device)


class Rope(nn.Module):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin)


class QKNormRope(nn.Module):
    """Drop-in for Wan's norm_q / norm_k (torch.nn.RMSNorm across heads) fused with RoPE."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return qk_norm_rope(x, self.weight, self.eps, cos, sin, self.heads)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, heads={self.heads}, eps={self.eps}"
