# Gated residual: out = x + y * gate, the adaLN gate of every Wan sub-block.
#
# Shapes / strides
#   x (B, S, D), y (B, S, D) of any float dtypes and strides (last stride 1 for the kernels);
#   out (B, S, D) contiguous in x.dtype.
#   gate fp32, broadcastable to x: per sample (B, 1, D) or per token (B, S, D), often a
#   non-contiguous chunk of a modulation table; read through its expanded strides (stride 0
#   over tokens for per-sample), never copied.
# Math (fp32, one rounding):  out = x + y * gate
#   backward:  dx = g (passed through, no kernel);  dy = g * gate in y.dtype;
#              dgate = sum_bcast(g * y), summed over the dims where gate broadcasts, in fp32.
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
    def _gated_residual_fwd_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, S, D,
                                   sx_b, sx_s, sy_b, sy_s, sgt_b, sgt_s,
                                   BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        s = row % S
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        x = tl.load(x_ptr + b * sx_b + s * sx_s + d, mask=mask).to(tl.float32)
        y = tl.load(y_ptr + b * sy_b + s * sy_s + d, mask=mask).to(tl.float32)
        gate = tl.load(gate_ptr + b * sgt_b + s * sgt_s + d, mask=mask).to(tl.float32)
        out = cast_out(x + y * gate, out_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(out_ptr + row * D + d, out, mask=mask)

    @triton.jit
    def _gated_residual_bwd_kernel(g_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr, S, D, rows_per_prog,
                                   sg_b, sg_s, sy_b, sy_s, sgt_b, sgt_s,
                                   PER_TOKEN: tl.constexpr, COMPUTE_DGATE: tl.constexpr,
                                   BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Grid (B, chunks): each program walks rows_per_prog tokens of one sample; per-sample
        # dgate is accumulated in fp32 registers and written as one partial per program.
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        s_end = tl.minimum(S, (chunk + 1) * rows_per_prog)
        for s in range(chunk * rows_per_prog, s_end):
            row = b * S + s
            g = tl.load(g_ptr + b * sg_b + s * sg_s + d, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + b * sgt_b + s * sgt_s + d, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + row * D + d, cast_out(g * gate, dy_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
            if COMPUTE_DGATE:
                y = tl.load(y_ptr + b * sy_b + s * sy_s + d, mask=mask, other=0.0).to(tl.float32)
                if PER_TOKEN:
                    tl.store(dgate_ptr + row * D + d, g * y, mask=mask)
                else:
                    acc += g * y
        if COMPUTE_DGATE and not PER_TOKEN:
            tl.store(dgate_ptr + (b * tl.num_programs(1) + chunk) * D + d, acc, mask=mask)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bs_strides(t: torch.Tensor, shape: torch.Size) -> tuple[int, int]:
    e = t.expand(shape)
    return e.stride(0), e.stride(1)


def gated_residual_forward(x, y, gate):
    B, S, D = x.shape
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    if use_triton(x):
        x, y, gate = _unit_stride(x), _unit_stride(y), _unit_stride(gate)
        _gated_residual_fwd_kernel[(B * S,)](x, y, gate, out, S, D, x.stride(0), x.stride(1),
                                             y.stride(0), y.stride(1), *_bs_strides(gate, x.shape),
                                             BLOCK_D=triton.next_power_of_2(D), ROUND_BF16=interpreting())
        return out
    # Type promotion makes addcmul compute in fp32 (gate is fp32); out= rounds once to x.dtype.
    return torch.addcmul(x, y, gate, out=out)


def gated_residual_backward(grad, y, gate, compute_dgate):
    """Returns (dy, dgate); dgate is summed to gate's shape, fp32, empty if not computed."""
    B, S, D = grad.shape
    per_token = gate.dim() >= 2 and gate.shape[-2] != 1
    dy = torch.empty((B, S, D), dtype=y.dtype, device=y.device)
    if use_triton(grad):
        grad, y, gate = _unit_stride(grad), _unit_stride(y), _unit_stride(gate)
        rows_per_prog = triton.cdiv(S, max(1, row_programs(B * S, grad.device) // B))
        chunks = triton.cdiv(S, rows_per_prog)
        shape = ((B, S, D) if per_token else (B, chunks, D)) if compute_dgate else (0,)
        dgate = torch.empty(shape, dtype=torch.float32, device=grad.device)
        _gated_residual_bwd_kernel[(B, chunks)](
            grad, y, gate, dy, dgate, S, D, rows_per_prog, grad.stride(0), grad.stride(1),
            y.stride(0), y.stride(1), *_bs_strides(gate, grad.shape),
            PER_TOKEN=per_token, COMPUTE_DGATE=compute_dgate, BLOCK_D=triton.next_power_of_2(D),
            ROUND_BF16=interpreting())
        if compute_dgate:
            dgate = (dgate if per_token else dgate.sum(1, keepdim=True)).sum_to_size(gate.shape)
        return dy, dgate
    torch.mul(grad, gate, out=dy)
    if not compute_dgate:
        return dy, dy.new_empty(0, dtype=torch.float32)
    # One fp32 buffer: the copy of grad takes the product in place (exact fp32 products).
    dgate = grad.to(torch.float32, copy=True).mul_(y).sum_to_size(gate.shape).contiguous()
    return dy, dgate


@torch.library.custom_op("vidtune::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, y, gate)


@_gated_residual_fwd_op.register_fake
def _(x, y, gate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vidtune::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(grad: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                           compute_dgate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(grad, y, gate, compute_dgate)


@_gated_residual_bwd_op.register_fake
def _(grad, y, gate, compute_dgate):
    dgate = torch.empty(gate.shape if compute_dgate else (0,), dtype=torch.float32, device=grad.device)
    return torch.empty(y.shape, dtype=y.dtype, device=y.device), dgate


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        # y is needed for dgate only: with a frozen gate (a LoRA run: the modulation does not
        # train) it is not kept, as autograd's own mul would not keep it.
        ctx.save_for_backward(y if ctx.needs_input_grad[2] else None, gate)
        ctx.y_dtype = y.dtype
        return torch.ops.vidtune.gated_residual_fwd(x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        if y is None:  # the kernels read y for dgate alone; grad gives dy its shape and dtype
            y = grad if grad.dtype == ctx.y_dtype else grad.to(ctx.y_dtype)
        dy, dgate = torch.ops.vidtune.gated_residual_bwd(grad, y, gate, ctx.needs_input_grad[2])
        return grad, dy, (dgate.to(gate.dtype) if ctx.needs_input_grad[2] else None)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate computed in fp32, returned in x.dtype; gate (B, 1, D) or (B, S, D)."""
    if x.dim() != 3 or y.shape != x.shape or gate.dim() != 3 \
            or torch.broadcast_shapes(gate.shape, x.shape) != x.shape:
        raise ValueError(f"gated_residual expects x, y (B, S, D) and gate (B, 1, D) or (B, S, D); "
                         f"got x {tuple(x.shape)}, y {tuple(y.shape)}, gate {tuple(gate.shape)}")
    return GatedResidualFunction.apply(x, y, gate)


class GatedResidual(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_residual(x, y, gate)
