# RMSNorm over the last dim with an elementwise weight: torch.nn.RMSNorm(dim, eps)(x).
#
# Shapes / strides
#   x (..., D), any strides that flatten to rows (a copy only when they do not); weight (D,);
#   out (..., D) contiguous in x.dtype; rstd x.shape[:-1] fp32, saved for backward.
# Math (all in fp32, one rounding to x.dtype, the rounding points of torch's rms_norm on CPU:
# x upcast, x * rstd * weight in fp32, cast to x.dtype; the output dtype is x.dtype whatever
# weight's dtype is):
#   rstd = 1 / sqrt(mean_D(x^2) + eps),  xh = x * rstd,  out = xh * w
#   backward:  dw = sum_rows(g * xh);  dn = g * w;  dx = rstd * (dn - xh * mean_D(dn * xh)).
# The torch path is written for bytes: forward materialises one fp32 (rows, D) buffer (+ the
# x.dtype output when x is low precision), backward one fp32 buffer reused for g*xh and dn (+ dx
# in x.dtype); mean_D(dn * xh) = (g * xh) @ w / D is a matrix-vector product on that buffer.
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import HAS_TRITON, mode, use_triton
from ._triton_common import interpreting, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import cast_out

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, n_rows, D, eps, sx_r, sx_d,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        # One [BLOCK_R, BLOCK_D] tile of rows per program: one load of x, one store of out.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        mask = rmask[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx_r + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        out = x * rstd[:, None] * w[None, :]
        tl.store(out_ptr + rows[:, None] * D + d[None, :],
                 cast_out(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, D, rows_per_prog,
                             sg_r, sg_d, sx_r, sx_d, COMPUTE_DW: tl.constexpr, NUM_STAGES: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Each program walks its own contiguous rows_per_prog rows (a multiple of BLOCK_R) in
        # [BLOCK_R, BLOCK_D] tiles and keeps a private fp32 dw partial in registers; the launcher
        # sums the (programs, D) partials on the device.
        pid = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        start = pid * rows_per_prog
        end = tl.minimum(start + rows_per_prog, n_rows)
        for r0 in tl.range(start, end, BLOCK_R, num_stages=NUM_STAGES):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < end
            mask = rmask[:, None] & dmask[None, :]
            g = tl.load(g_ptr + rows[:, None] * sg_r + d[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows[:, None] * sx_r + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xh = x * rstd[:, None]
            if COMPUTE_DW:
                dw += g * xh
            dn = g * w[None, :]
            m = tl.sum(dn * xh, axis=1) / D
            tl.store(dx_ptr + rows[:, None] * D + d[None, :],
                     cast_out(rstd[:, None] * (dn - xh * m[:, None]), dx_ptr.dtype.element_ty, ROUND_BF16),
                     mask=mask)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid * D + d, tl.sum(dw, axis=0), mask=dmask)


# Tile sizes, from ptxas on sm_90 at D = 1536 (BLOCK_D = 2048), bf16. The forward gives each
# program a [4, 2048] tile (8 warps, 32 elements a thread, 58 registers: 4 programs and 48 KiB of
# loads in flight per SM; 24 KiB moved a program). The backward keeps g, x, dx and the dw partial
# as [2, 2048] tiles (8 warps, ~106 registers: 2 programs per SM) and pipelines its row loop
# _BWD_STAGES deep (cp.async into shared memory, 48 KiB a program), so the next tiles' loads are in
# flight while one is reduced; 2 programs per SM then fill the machine in one wave. The
# interpreter pays ~3 ms per program instance whatever the tile, so it gets two-row tiles and at
# most two backward programs (still a masked tail and a multi-tile loop on the tests' 5 rows).
_FWD_TILE, _BWD_TILE, _BWD_STAGES, _BWD_PROGRAMS_PER_SM = 8192, 4096, 3, 2


def _tile(D: int, device: torch.device, elems: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of D elements: a tile of about elems, per_thread
    of them a thread."""
    block_d = triton.next_power_of_2(D)
    if device.type != "cuda":
        return 2, block_d, 4
    block_r = max(1, min(64, elems // block_d))
    return block_r, block_d, max(4, min(16, block_r * block_d // (32 * per_thread)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (rows, D): a view when the strides allow it, else a copy."""
    return t.reshape(-1, t.shape[-1])


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    if use_triton(x):
        x2 = _rows(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        n_rows = x2.shape[0]
        if n_rows:
            block_r, block_d, warps = _tile(D, x.device, _FWD_TILE, 32)
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
                x2, weight, out, rstd, n_rows, D, eps, *x2.stride(),
                BLOCK_R=block_r, BLOCK_D=block_d, ROUND_BF16=interpreting(), num_warps=warps)
        return out, rstd
    # vector_norm reads x in its own dtype (no fp32 copy of x); the (rows,) stats chain is in place.
    rstd = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).pow_(2).div_(D).add_(eps).rsqrt_()
    buf = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.mul(x, rstd.unsqueeze(-1), out=buf).mul_(weight)
    return buf.to(x.dtype), rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    if use_triton(x):
        g2, x2 = _rows(grad), _rows(x)
        n_rows = x2.shape[0]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        block_r, block_d, warps = _tile(D, x.device, _BWD_TILE, 16)
        # Programs: 2 per SM on GPU (2 when interpreted), never more than there are tiles; each
        # takes a contiguous run of whole tiles, the last one the remainder.
        tiles = triton.cdiv(n_rows, block_r)
        n_prog = min(tiles, _BWD_PROGRAMS_PER_SM * sm_count(x.device))
        tiles_per_prog = triton.cdiv(tiles, n_prog) if n_rows else 0
        n_prog = triton.cdiv(tiles, tiles_per_prog) if n_rows else 0
        # (0, D) partials when there are no rows: their sum is the zero dw.
        dw = torch.empty((n_prog, D) if compute_dw else (0,), dtype=torch.float32, device=x.device)
        if n_rows:
            _rms_norm_bwd_kernel[(n_prog,)](
                g2, x2, weight, rstd, dx, dw, n_rows, D, tiles_per_prog * block_r,
                *g2.stride(), *x2.stride(), COMPUTE_DW=compute_dw, NUM_STAGES=_BWD_STAGES,
                BLOCK_R=block_r, BLOCK_D=block_d, ROUND_BF16=interpreting(), num_warps=warps)
        return dx, (dw.sum(0) if compute_dw else dw).to(weight.dtype)
    w = weight.float()  # (D,): the only copy besides the one fp32 buffer and dx
    r = rstd.unsqueeze(-1)
    buf = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.mul(x, r, out=buf).mul_(grad)  # g * xh
    dw = buf.sum(tuple(range(buf.dim() - 1))) if compute_dw else weight.new_empty(0)
    c = torch.matmul(buf, w).div_(D).mul_(rstd).unsqueeze_(-1)  # rstd * mean_D(dn * xh)
    torch.mul(grad, w, out=buf).addcmul_(x, c, value=-1).mul_(r)  # rstd * (dn - xh * mean)
    return buf.to(x.dtype), dw.to(weight.dtype)


@torch.library.custom_op("vidtune::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


@torch.library.custom_op("vidtune::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(grad, x, weight, rstd, compute_dw)


@_rms_norm_bwd_op.register_fake
def _(grad, x, weight, rstd, compute_dw):
    dw = torch.empty(weight.shape if compute_dw else (0,), dtype=weight.dtype, device=weight.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = torch.ops.vidtune.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.vidtune.rms_norm_bwd(grad, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x times weight (D,); equals torch.nn.RMSNorm(D, eps)(x)."""
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm expects x (..., D) and weight (D,), got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if x.is_cuda and weight.dtype == x.dtype and mode() == "auto":
        # torch's fused CUDA RMSNorm (the op diffusers calls) beat our Triton kernel on an H200:
        # 32,760 x 1536 bf16, 0.063 ms forward / 0.145 ms fwd+bwd vs 0.18 / 0.45 (benchmarks/README.md).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm(dim, eps) with an elementwise affine weight."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
