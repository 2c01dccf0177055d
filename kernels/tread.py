"""TREAD token routing: gather the kept tokens before a span of blocks, scatter them back after.

Shapes (every tensor is made contiguous and its trailing dims flattened to one row of R elements):
  x     (B, S, R)  all tokens of a sample            | shared table: (S, R), batch stride 0
  idx   (B, K)     int64 kept-token indices per sample, unique within a row (any order)
  y     (B, K, R)  the kept tokens after the routed span
  base  (B, S, R)  the saved originals of all tokens
Each Triton program copies a [BLOCK_T, BLOCK_C] tile: BLOCK_T consecutive rows times one BLOCK_C
slice of them, grid (cdiv(rows, BLOCK_T), cdiv(R, BLOCK_C)). The forwards tile the B * K kept
tokens: a program loads its BLOCK_T indices as one vector, then all BLOCK_T rows at once, so it
pays the idx -> row dependent-load latency once per tile, not once per token. The backwards tile
all B * S tokens through pos (B, S) int32, the inverse of idx (k, or -1 for a routed token), so
each writes every output row once and reads every input row at most once: no zero-fill or clone
pass before them.
Forward and backward (both ops are pure data movement, so the grads are exact in any dtype):
  gather   out[b, k]      = x[b, idx[b, k]]
           grad_x         = 0 everywhere, grad_x[b, idx[b, k]] = grad_out[b, k]
           (shared table: grad_x[s] = sum over (b, k) with idx[b, k] == s of grad_out[b, k])
  scatter  out            = base, out[b, idx[b, k]] = y[b, k]
           grad_base      = grad_out with rows idx[b, k] set to 0 (those rows came from y)
           grad_y[b, k]   = grad_out[b, idx[b, k]]
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_offsets(idx_ptr, n, K, R, stride_b, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """(flat rows b * K + k, offsets of token idx[b, k]'s columns in a (B, S, R) tensor with
        batch stride stride_b, offsets of the same columns in a (B * K, R) tensor, tile mask)."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < n
        rows = rows.to(tl.int64)  # int64 so B * K * R may pass 2**31
        tok = tl.load(idx_ptr + rows, mask=rmask, other=0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < R)[None, :]
        full = ((rows // K) * stride_b + tok * R)[:, None] + cols[None, :]
        kept = (rows * R)[:, None] + cols[None, :]
        return full, kept, mask

    @triton.jit
    def _tread_gather_kernel(x_ptr, idx_ptr, out_ptr, n, K, R, stride_xb,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        full, kept, mask = _tile_offsets(idx_ptr, n, K, R, stride_xb, BLOCK_T, BLOCK_C)
        tl.store(out_ptr + kept, tl.load(x_ptr + full, mask=mask), mask=mask)

    @triton.jit
    def _tread_scatter_kernel(y_ptr, idx_ptr, out_ptr, n, K, R, stride_ob,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        full, kept, mask = _tile_offsets(idx_ptr, n, K, R, stride_ob, BLOCK_T, BLOCK_C)
        tl.store(out_ptr + full, tl.load(y_ptr + kept, mask=mask), mask=mask)

    @triton.jit
    def _tread_positions_kernel(idx_ptr, pos_ptr, n, K, S, BLOCK: tl.constexpr):
        # pos (B, S) arrives filled with -1: pos[b, idx[b, k]] = k.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        tok = tl.load(idx_ptr + i, mask=mask, other=0)
        tl.store(pos_ptr + (i // K).to(tl.int64) * S + tok, (i % K).to(tl.int32), mask=mask)

    @triton.jit
    def _full_tile(pos_ptr, n, S, K, R, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """A tile of the (B * S, R) view: (its offsets, the offsets of the same columns of y row
        b * K + pos, kept (pos >= 0) [BLOCK_T, 1], tile mask)."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < n
        rows = rows.to(tl.int64)  # int64 so B * S * R may pass 2**31
        k = tl.load(pos_ptr + rows, mask=rmask, other=-1)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < R)[None, :]
        full = (rows * R)[:, None] + cols[None, :]
        kept_offs = (((rows // S) * K + k) * R)[:, None] + cols[None, :]
        return full, kept_offs, (k >= 0)[:, None], mask

    @triton.jit
    def _tread_gather_bwd_kernel(grad_ptr, pos_ptr, grad_x_ptr, n, S, K, R,
                                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # Every row of grad_x written once: grad[b, pos] for a kept token, zeros otherwise.
        full, kept_offs, kept, mask = _full_tile(pos_ptr, n, S, K, R, BLOCK_T, BLOCK_C)
        vals = tl.load(grad_ptr + kept_offs, mask=mask & kept, other=0.0)
        tl.store(grad_x_ptr + full, vals, mask=mask)

    @triton.jit
    def _tread_scatter_bwd_kernel(grad_ptr, pos_ptr, grad_base_ptr, grad_y_ptr, n, S, K, R,
                                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # Every row of grad read once: a kept row goes to grad_y and leaves zeros in grad_base,
        # any other row is copied to grad_base.
        full, kept_offs, kept, mask = _full_tile(pos_ptr, n, S, K, R, BLOCK_T, BLOCK_C)
        vals = tl.load(grad_ptr + full, mask=mask)
        tl.store(grad_base_ptr + full, tl.where(kept, tl.zeros_like(vals), vals), mask=mask)
        tl.store(grad_y_ptr + kept_offs, vals, mask=mask & kept)


# A GPU program moves a [BLOCK_T, BLOCK_C] tile of _TILE elements (16 KiB in bf16) with 8 warps
# (32 elements, four 16-byte vectors, per thread); BLOCK_C <= 512 splits a 1536- or 5120-wide row
# into whole slices (no masked lanes). The interpreter pays ~3 ms per program instance whatever
# the tile: 8-token tiles keep the tests' grids to a few programs, with masked tails.
_TILE, _MAX_BLOCK_C = 8192, 512


def _grid(rows: int, R: int, device: torch.device) -> tuple[tuple[int, int], dict]:
    """(grid, launch kwargs) for tiles over rows of R elements."""
    if device.type != "cuda":
        block_c = triton.next_power_of_2(R)
        return (triton.cdiv(rows, 8), 1), dict(BLOCK_T=8, BLOCK_C=block_c)
    block_c = min(triton.next_power_of_2(R), _MAX_BLOCK_C)
    block_t = max(1, _TILE // block_c)
    grid = (triton.cdiv(rows, block_t), triton.cdiv(R, block_c))
    return grid, dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8 if block_t * block_c >= _TILE else 4)


def _positions(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """pos (B, num_tokens) int32: k where idx[b, k] == s, else -1 (the inverse of idx)."""
    B, K = idx.shape
    pos = torch.full((B, num_tokens), -1, dtype=torch.int32, device=idx.device)
    if B * K:
        block = 1024 if idx.device.type == "cuda" else 64
        _tread_positions_kernel[(triton.cdiv(B * K, block),)](idx.contiguous(), pos, B * K, K, num_tokens,
                                                              BLOCK=block)
    return pos


def _flat_rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row numbers of the kept tokens in the (B * S, R) view: idx[b, k] + b * S, flattened."""
    offsets = torch.arange(idx.shape[0], device=idx.device).mul_(num_tokens)
    return (idx + offsets[:, None]).reshape(-1)


def _check(x: torch.Tensor, idx: torch.Tensor, shared: bool) -> None:
    if idx.dtype != torch.int64 or idx.dim() != 2:
        raise ValueError(f"tread idx must be int64 (B, K), got {idx.dtype} {tuple(idx.shape)}")
    need = 1 if shared else 2
    if x.dim() < need or (not shared and x.shape[0] != idx.shape[0]):
        layout = "(S, *rest)" if shared else f"(B={idx.shape[0]}, S, *rest)"
        raise ValueError(f"tread x must be {layout}, got {tuple(x.shape)}")


# --- launchers --------------------------------------------------------------------------------


def tread_gather_forward(x: torch.Tensor, idx: torch.Tensor, shared: bool = False) -> torch.Tensor:
    B, K = idx.shape
    lead = 1 if shared else 2
    S, rest = x.shape[lead - 1], x.shape[lead:]
    R = math.prod(rest)
    x = x.contiguous()
    if use_triton(x):
        out = x.new_empty((B, K, *rest))
        grid, kw = _grid(B * K, R, x.device)
        stride_xb = 0 if shared else S * R
        if B * K:
            _tread_gather_kernel[grid](x, idx.contiguous(), out, B * K, K, R, stride_xb, **kw)
        return out
    rows = idx.reshape(-1) if shared else _flat_rows(idx, S)
    return x.view(-1, R).index_select(0, rows).view(B, K, *rest)


def tread_gather_backward(
    grad: torch.Tensor, idx: torch.Tensor, num_tokens: int, shared: bool = False
) -> torch.Tensor:
    B, K = idx.shape
    rest = grad.shape[2:]
    R = math.prod(rest)
    grad = grad.contiguous()
    if shared:
        # Several samples can keep the same table row, so the rows add up; tables are built
        # without grad in the model, so this index_add is off the hot path (no atomics kernel).
        grad_x = grad.new_zeros((num_tokens, R))
        return grad_x.index_add_(0, idx.reshape(-1), grad.view(-1, R)).view(num_tokens, *rest)
    if use_triton(grad):
        # One pass over grad_x (every row written once, kept rows read once): 3/4 of the bytes
        # of zero-filling it and then scattering the kept rows.
        grad_x = grad.new_empty((B, num_tokens, *rest))
        grid, kw = _grid(B * num_tokens, R, grad.device)
        if B * num_tokens:
            _tread_gather_bwd_kernel[grid](grad, _positions(idx, num_tokens), grad_x, B * num_tokens,
                                           num_tokens, K, R, **kw)
        return grad_x
    grad_x = grad.new_zeros((B, num_tokens, *rest))
    grad_x.view(-1, R).index_copy_(0, _flat_rows(idx, num_tokens), grad.view(-1, R))
    return grad_x


def tread_scatter_forward(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, K = idx.shape
    S, rest = base.shape[1], base.shape[2:]
    R = math.prod(rest)
    y = y.contiguous()
    if use_triton(base):
        out = base.clone(memory_format=torch.contiguous_format)
        grid, kw = _grid(B * K, R, base.device)
        if B * K:
            _tread_scatter_kernel[grid](y, idx.contiguous(), out, B * K, K, R, S * R, **kw)
        return out
    out = base.contiguous().view(-1, R).index_copy(0, _flat_rows(idx, S), y.view(-1, R))
    return out.view(base.shape)


def tread_scatter_backward(
    grad: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    B, K = idx.shape
    S, rest = grad.shape[1], grad.shape[2:]
    R = math.prod(rest)
    grad = grad.contiguous()
    if use_triton(grad):
        # One pass over grad (every row read once, written once to grad_base or grad_y): 5/7 of
        # the bytes of cloning grad and then moving the kept rows out.
        grad_base = torch.empty_like(grad)
        grad_y = grad.new_empty((B, K, *rest))
        grid, kw = _grid(B * S, R, grad.device)
        if B * S:
            _tread_scatter_bwd_kernel[grid](grad, _positions(idx, S), grad_base, grad_y, B * S, S, K, R,
                                            **kw)
        return grad_base, grad_y
    rows = _flat_rows(idx, S)
    flat = grad.view(-1, R)
    grad_y = flat.index_select(0, rows).view(B, K, *rest)
    return flat.index_fill(0, rows, 0).view(grad.shape), grad_y


# --- custom ops: opaque to torch.compile, shapes from the fake impls ----------------------------


@torch.library.custom_op("vidtune::tread_gather_fwd", mutates_args=())
def _tread_gather_fwd_op(x: torch.Tensor, idx: torch.Tensor, shared: bool) -> torch.Tensor:
    return tread_gather_forward(x, idx, shared)


@_tread_gather_fwd_op.register_fake
def _(x, idx, shared):
    return x.new_empty((*idx.shape, *x.shape[1 if shared else 2 :]))


@torch.library.custom_op("vidtune::tread_gather_bwd", mutates_args=())
def _tread_gather_bwd_op(
    grad: torch.Tensor, idx: torch.Tensor, num_tokens: int, shared: bool
) -> torch.Tensor:
    return tread_gather_backward(grad, idx, num_tokens, shared)


@_tread_gather_bwd_op.register_fake
def _(grad, idx, num_tokens, shared):
    lead = (num_tokens,) if shared else (idx.shape[0], num_tokens)
    return grad.new_empty((*lead, *grad.shape[2:]))


@torch.library.custom_op("vidtune::tread_scatter_fwd", mutates_args=())
def _tread_scatter_fwd_op(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return tread_scatter_forward(base, y, idx)


@_tread_scatter_fwd_op.register_fake
def _(base, y, idx):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("vidtune::tread_scatter_bwd", mutates_args=())
def _tread_scatter_bwd_op(
    grad: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return tread_scatter_backward(grad, idx)


@_tread_scatter_bwd_op.register_fake
def _(grad, idx):
    return torch.empty_like(grad, memory_format=torch.contiguous_format), grad.new_empty(
        (*idx.shape, *grad.shape[2:])
    )


# --- autograd -----------------------------------------------------------------------------------


class TreadGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, shared):
        ctx.save_for_backward(idx)
        ctx.num_tokens = x.shape[0 if shared else 1]
        ctx.shared = shared
        return torch.ops.vidtune.tread_gather_fwd(x, idx, shared)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return torch.ops.vidtune.tread_gather_bwd(grad, idx, ctx.num_tokens, ctx.shared), None, None


class TreadScatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, y, idx):
        ctx.save_for_backward(idx)
        return torch.ops.vidtune.tread_scatter_fwd(base, y, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad_base, grad_y = torch.ops.vidtune.tread_scatter_bwd(grad, idx)
        return grad_base, grad_y, None


# --- functional API and modules ---------------------------------------------------------------


def select_tokens(
    batch: int,
    num_tokens: int,
    selection_ratio: float,
    *,
    generator: torch.Generator | None = None,
    force_keep: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Kept-token indices (B, K) int64, sorted ascending: a uniform random subset per sample.

    ``selection_ratio`` is the routed (dropped) fraction: K = num_tokens - round(ratio *
    num_tokens), equal across the batch. ``force_keep`` (B, num_tokens) bool marks tokens that are
    always kept; when a sample forces more than K tokens, K grows to that count for the whole
    batch (keep more, never fewer). The draw uses ``generator`` (same state => same routing) on the
    generator's device; ``device`` (default: force_keep's, else the generator's) is where idx lives.
    """
    if not 0.0 <= selection_ratio < 1.0:
        raise ValueError(f"TREAD selection_ratio must be in [0, 1), got {selection_ratio}")
    if device is None:
        if force_keep is not None:
            device = force_keep.device
        else:
            device = generator.device if generator is not None else "cpu"
    keep = num_tokens - round(selection_ratio * num_tokens)
    if force_keep is not None:
        if force_keep.shape != (batch, num_tokens) or force_keep.dtype != torch.bool:
            raise ValueError(
                f"TREAD force_keep must be bool ({batch}, {num_tokens}), "
                f"got {force_keep.dtype} {tuple(force_keep.shape)}"
            )
        keep = max(keep, int(force_keep.sum(1).max()))  # host sync: K sets every shape downstream
    if keep >= num_tokens:
        return torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(batch, num_tokens, generator=generator, device=draw_device)
    if force_keep is not None:
        scores.masked_fill_(force_keep.to(scores.device), 2.0)  # above every uniform draw
    idx = scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    return idx.to(device)


def tread_gather(x: torch.Tensor, idx: torch.Tensor, *, shared: bool = False) -> torch.Tensor:
    """x (B, S, *rest) -> (B, K, *rest), row b = x[b, idx[b]].

    ``shared=True``: x is one table for the whole batch, (S, *rest) (e.g. RoPE frequencies).
    """
    _check(x, idx, shared)
    return TreadGatherFunction.apply(x, idx, shared)


def tread_scatter(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """base (B, S, *rest) with out[b, idx[b]] = y[b]; y (B, K, *rest) are the routed kept tokens."""
    _check(base, idx, False)
    want = (*idx.shape, *base.shape[2:])
    if y.shape != want or y.dtype != base.dtype:
        raise ValueError(
            f"tread_scatter y must be {base.dtype} {want} to match base and idx, "
            f"got {y.dtype} {tuple(y.shape)}; cast y to base.dtype"
        )
    return TreadScatterFunction.apply(base, y, idx)


class TreadGather(nn.Module):
    def __init__(self, shared: bool = False):
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return tread_gather(x, idx, shared=self.shared)

    def extra_repr(self) -> str:
        return f"shared={self.shared}"


class TreadScatter(nn.Module):
    def forward(self, base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return tread_scatter(base, y, idx)
