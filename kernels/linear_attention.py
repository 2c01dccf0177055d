# Linear attention with a ReLU kernel and RoPE on the kernel features: Sana Video's self-attention.
#
# Shapes / strides
#   q, k, v (B, N, H, C) of any float dtype and strides (usually head views of (B, N, H*C));
#   out (B, N, H, C) contiguous in q.dtype. cos, sin fp32 (N, C/2) shared by the batch (batch
#   stride 0) or (B, N, C/2) per sample (TREAD-gathered rows); pair p of every head uses column p.
#   Saved for backward: q, k, v and the per-(b, h) state kv (B*H, C, C), ks (B*H, C), fp32.
# Math (fp32; phi = relu, R = RoPE on adjacent pairs, as diffusers' SanaLinearAttnProcessor3_0):
#   qr = R(phi(q)),  kr = R(phi(k))
#   kv[i, j] = sum_n v[n, i] kr[n, j]          ks[j] = sum_n phi(k)[n, j]
#   den[n] = ks . phi(q)[n] + eps              out[n, i] = sum_j kv[i, j] qr[n, j] / den[n]
#   The normaliser uses the features before RoPE, the numerator after it (Sana's definition).
# Backward (g = dL/dout, z = 1 / den, R^T = rotation by -theta):
#   t[n] = kv^T g[n]                     dden[n] = -(qr[n] . t[n]) z[n]^2
#   dq = relu'(q) * (R^T(z t) + dden ks) dkv = sum_n z[n] g[n] (x) qr[n]    dks = sum_n dden[n] phi(q)[n]
#   dv[n] = dkv kr[n]                    dk = relu'(k) * (R^T(dkv^T v[n]) + dks)
# Passes: forward = reduce (kv, ks over tokens) + per-token output; backward = per-token dq (+ dden)
# + reduce (dkv, dks) + per-token dk, dv. Reductions run over token splits whose fp32 partials
# are summed on the host (deterministic, no atomics). RoPE pairs are split into even/odd halves,
# so every product is a tl.dot of (tokens x C/2) tiles and the rotation is elementwise. Loads are
# upcast to fp32 (the interpreter's bf16 dot is wrong); fp32 inputs use IEEE dots, 16-bit ones TF32.
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from ._dispatch import HAS_TRITON, use_triton
from ._triton_common import interpreting

DEFAULT_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor3_0

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import cast_out

    @triton.jit
    def _features(x_ptr, cos_ptr, sin_ptr, base, n, sn, sc, cbase, sc_n, P, BLOCK_P: tl.constexpr):
        """phi = relu(x) for tokens n (BLOCK_N,) of one (b, h), n = -1 masked: even/odd halves,
        their RoPE, and the cos/sin rows."""
        p = tl.arange(0, BLOCK_P)[None, :]
        m = (n[:, None] >= 0) & (p < P)
        ptr = x_ptr + base + n[:, None] * sn + 2 * p * sc
        xe = tl.maximum(tl.load(ptr, mask=m, other=0.0).to(tl.float32), 0.0)
        xo = tl.maximum(tl.load(ptr + sc, mask=m, other=0.0).to(tl.float32), 0.0)
        c = tl.load(cos_ptr + cbase + n[:, None] * sc_n + p, mask=m, other=0.0)
        s = tl.load(sin_ptr + cbase + n[:, None] * sc_n + p, mask=m, other=0.0)
        return xe, xo, xe * c - xo * s, xe * s + xo * c, c, s

    @triton.jit
    def _load_state(ptr, bh, i, p, C, P):
        """Rows i of a (C x C) per-(b, h) state, its even and odd columns."""
        m = (i[:, None] < C) & (p < P)[None, :]
        at = ptr + bh * C * C + i[:, None] * C + 2 * p[None, :]
        return tl.load(at, mask=m, other=0.0), tl.load(at + 1, mask=m, other=0.0)

    @triton.jit
    def _store_pairs(ptr, b, h, n, p, N, H, C, P, even, odd, ROUND_BF16: tl.constexpr):
        """even/odd halves of tokens n (-1 masked) of one (b, h) into a contiguous (B, N, H, C)."""
        m = (n[:, None] >= 0) & (p < P)[None, :]
        at = ptr + ((b * N + n[:, None]) * H + h) * C + 2 * p[None, :]
        tl.store(at, cast_out(even, ptr.dtype.element_ty, ROUND_BF16), mask=m)
        tl.store(at + 1, cast_out(odd, ptr.dtype.element_ty, ROUND_BF16), mask=m)

    @triton.jit
    def _load_cols(ptr, base, n, sn, i, sc, C):
        """fp32 tile [tokens n (-1 masked), columns i < C] of one (b, h)."""
        m = (n[:, None] >= 0) & (i[None, :] < C)
        return tl.load(ptr + base + n[:, None] * sn + i[None, :] * sc, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _token_tile(H, N, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        """(bh, b, h, tokens n with -1 past N, pair columns p) of a per-token program (grid axis 0:
        B*H, axis 1: token tiles)."""
        bh = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return bh, bh // H, bh % H, tl.where(n < N, n, -1), tl.arange(0, BLOCK_P)

    @triton.jit
    def _store_state(mat_ptr, vec_ptr, part, i, p, C, P, acc_e, acc_o, vec_e, vec_o, it):
        """A reduction program's partial (C x C rows i, even/odd columns) and, from row tile 0,
        its (C,) vector."""
        out = mat_ptr + part * C * C + i[:, None] * C + 2 * p[None, :]
        om = (i[:, None] < C) & (p < P)[None, :]
        tl.store(out, acc_e, mask=om)
        tl.store(out + 1, acc_o, mask=om)
        if it == 0:
            tl.store(vec_ptr + part * C + 2 * p, vec_e, mask=p < P)
            tl.store(vec_ptr + part * C + 2 * p + 1, vec_o, mask=p < P)

    @triton.jit
    def _la_state_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, kv_ptr, ks_ptr, N, H, C, P, tokens_per_split,
                         sk_b, sk_n, sk_h, sk_c, sv_b, sv_n, sv_h, sv_c, sc_b, sc_n,
                         BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                         PREC: tl.constexpr):
        # Grid (B*H, row tiles of kv, token splits): partial kv[rows, :] and ks over the split.
        bh, it, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h, i, p = bh // H, bh % H, it * BLOCK_I + tl.arange(0, BLOCK_I), tl.arange(0, BLOCK_P)
        acc_e = tl.zeros((BLOCK_I, BLOCK_P), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_I, BLOCK_P), dtype=tl.float32)
        ks_e = tl.zeros((BLOCK_P,), dtype=tl.float32)
        ks_o = tl.zeros((BLOCK_P,), dtype=tl.float32)
        n_end = tl.minimum(N, (sp + 1) * tokens_per_split)
        for n0 in range(sp * tokens_per_split, n_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n = tl.where(n < n_end, n, -1)  # -1: masked row
            ke, ko, kre, kro, _, _ = _features(k_ptr, cos_ptr, sin_ptr, b * sk_b + h * sk_h, n, sk_n, sk_c,
                                               b * sc_b, sc_n, P, BLOCK_P)
            v = _load_cols(v_ptr, b * sv_b + h * sv_h, n, sv_n, i, sv_c, C)
            vt = tl.trans(v)
            acc_e += tl.dot(vt, kre, input_precision=PREC)
            acc_o += tl.dot(vt, kro, input_precision=PREC)
            ks_e += tl.sum(ke, axis=0)
            ks_o += tl.sum(ko, axis=0)
        _store_state(kv_ptr, ks_ptr, bh * tl.num_programs(2) + sp, i, p, C, P, acc_e, acc_o, ks_e, ks_o, it)

    @triton.jit
    def _la_out_kernel(q_ptr, cos_ptr, sin_ptr, kv_ptr, ks_ptr, out_ptr, N, H, C, P, eps,
                       sq_b, sq_n, sq_h, sq_c, sc_b, sc_n,
                       BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                       PREC: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Grid (B*H, token tiles, row tiles): out[n, rows] = kv[rows, :] qr[n] / den[n].
        bh, b, h, n, p = _token_tile(H, N, BLOCK_N, BLOCK_P)
        i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
        qe, qo, qre, qro, _, _ = _features(q_ptr, cos_ptr, sin_ptr, b * sq_b + h * sq_h, n, sq_n, sq_c,
                                           b * sc_b, sc_n, P, BLOCK_P)
        kse = tl.load(ks_ptr + bh * C + 2 * p, mask=p < P, other=0.0)
        kso = tl.load(ks_ptr + bh * C + 2 * p + 1, mask=p < P, other=0.0)
        den = tl.sum(qe * kse[None, :] + qo * kso[None, :], axis=1) + eps
        kve, kvo = _load_state(kv_ptr, bh, i, p, C, P)
        num = tl.dot(qre, tl.trans(kve), input_precision=PREC) + tl.dot(qro, tl.trans(kvo), input_precision=PREC)
        out = num / den[:, None]
        om = (n[:, None] >= 0) & (i[None, :] < C)
        dst = out_ptr + ((b * N + n[:, None]) * H + h) * C + i[None, :]
        tl.store(dst, cast_out(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=om)

    @triton.jit
    def _la_bwd_q_kernel(g_ptr, q_ptr, cos_ptr, sin_ptr, kv_ptr, ks_ptr, dq_ptr, dden_ptr, N, H, C, P, eps,
                         sg_b, sg_n, sg_h, sg_c, sq_b, sq_n, sq_h, sq_c, sc_b, sc_n,
                         BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                         PREC: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Grid (B*H, token tiles): t = kv^T g over all rows, then dq and dden of these tokens.
        bh, b, h, n, p = _token_tile(H, N, BLOCK_N, BLOCK_P)
        te = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        to = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for i0 in range(0, C, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            g = _load_cols(g_ptr, b * sg_b + h * sg_h, n, sg_n, i, sg_c, C)
            kve, kvo = _load_state(kv_ptr, bh, i, p, C, P)
            te += tl.dot(g, kve, input_precision=PREC)
            to += tl.dot(g, kvo, input_precision=PREC)
        qe, qo, qre, qro, c, s = _features(q_ptr, cos_ptr, sin_ptr, b * sq_b + h * sq_h, n, sq_n, sq_c,
                                           b * sc_b, sc_n, P, BLOCK_P)
        kse = tl.load(ks_ptr + bh * C + 2 * p, mask=p < P, other=0.0)[None, :]
        kso = tl.load(ks_ptr + bh * C + 2 * p + 1, mask=p < P, other=0.0)[None, :]
        z = 1.0 / (tl.sum(qe * kse + qo * kso, axis=1) + eps)
        dden = -tl.sum(qre * te + qro * to, axis=1) * z * z
        ge, go = te * z[:, None], to * z[:, None]  # d(qr)
        dqe = ge * c + go * s + dden[:, None] * kse  # R^T, then the normaliser's term
        dqo = go * c - ge * s + dden[:, None] * kso
        dqe = tl.where(qe > 0, dqe, 0.0)
        dqo = tl.where(qo > 0, dqo, 0.0)
        _store_pairs(dq_ptr, b, h, n, p, N, H, C, P, dqe, dqo, ROUND_BF16)
        tl.store(dden_ptr + bh * N + n, dden, mask=n >= 0)

    @triton.jit
    def _la_bwd_state_kernel(g_ptr, q_ptr, cos_ptr, sin_ptr, ks_ptr, dden_ptr, dkv_ptr, dks_ptr,
                             N, H, C, P, eps, tokens_per_split,
                             sg_b, sg_n, sg_h, sg_c, sq_b, sq_n, sq_h, sq_c, sc_b, sc_n,
                             BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                             PREC: tl.constexpr):
        # Grid (B*H, row tiles, token splits): partial dkv[rows, :] = sum z g[rows] (x) qr, and dks.
        bh, it, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h, i, p = bh // H, bh % H, it * BLOCK_I + tl.arange(0, BLOCK_I), tl.arange(0, BLOCK_P)
        kse = tl.load(ks_ptr + bh * C + 2 * p, mask=p < P, other=0.0)[None, :]
        kso = tl.load(ks_ptr + bh * C + 2 * p + 1, mask=p < P, other=0.0)[None, :]
        acc_e = tl.zeros((BLOCK_I, BLOCK_P), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_I, BLOCK_P), dtype=tl.float32)
        dks_e = tl.zeros((BLOCK_P,), dtype=tl.float32)
        dks_o = tl.zeros((BLOCK_P,), dtype=tl.float32)
        n_end = tl.minimum(N, (sp + 1) * tokens_per_split)
        for n0 in range(sp * tokens_per_split, n_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n = tl.where(n < n_end, n, -1)
            qe, qo, qre, qro, _, _ = _features(q_ptr, cos_ptr, sin_ptr, b * sq_b + h * sq_h, n, sq_n, sq_c,
                                               b * sc_b, sc_n, P, BLOCK_P)
            z = 1.0 / (tl.sum(qe * kse + qo * kso, axis=1) + eps)
            g = _load_cols(g_ptr, b * sg_b + h * sg_h, n, sg_n, i, sg_c, C)
            gt = tl.trans(g * z[:, None])
            acc_e += tl.dot(gt, qre, input_precision=PREC)
            acc_o += tl.dot(gt, qro, input_precision=PREC)
            dden = tl.load(dden_ptr + bh * N + n, mask=n >= 0, other=0.0)[:, None]
            dks_e += tl.sum(dden * qe, axis=0)
            dks_o += tl.sum(dden * qo, axis=0)
        _store_state(dkv_ptr, dks_ptr, bh * tl.num_programs(2) + sp, i, p, C, P, acc_e, acc_o, dks_e, dks_o, it)

    @triton.jit
    def _la_bwd_kv_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, dkv_ptr, dks_ptr, dk_ptr, dv_ptr, N, H, C, P,
                          sk_b, sk_n, sk_h, sk_c, sv_b, sv_n, sv_h, sv_c, sc_b, sc_n,
                          BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                          PREC: tl.constexpr, ROUND_BF16: tl.constexpr):
        # Grid (B*H, token tiles): dv[n, rows] = dkv[rows, :] kr[n]; dk from dkv^T v over all rows.
        bh, b, h, n, p = _token_tile(H, N, BLOCK_N, BLOCK_P)
        ke, ko, kre, kro, c, s = _features(k_ptr, cos_ptr, sin_ptr, b * sk_b + h * sk_h, n, sk_n, sk_c,
                                           b * sc_b, sc_n, P, BLOCK_P)
        dkre = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        dkro = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for i0 in range(0, C, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            dkve, dkvo = _load_state(dkv_ptr, bh, i, p, C, P)
            v = _load_cols(v_ptr, b * sv_b + h * sv_h, n, sv_n, i, sv_c, C)
            dv = tl.dot(kre, tl.trans(dkve), input_precision=PREC) + tl.dot(kro, tl.trans(dkvo), input_precision=PREC)
            dst = dv_ptr + ((b * N + n[:, None]) * H + h) * C + i[None, :]
            tl.store(dst, cast_out(dv, dv_ptr.dtype.element_ty, ROUND_BF16), mask=(n[:, None] >= 0) & (i[None, :] < C))
            dkre += tl.dot(v, dkve, input_precision=PREC)
            dkro += tl.dot(v, dkvo, input_precision=PREC)
        dkse = tl.load(dks_ptr + bh * C + 2 * p, mask=p < P, other=0.0)[None, :]
        dkso = tl.load(dks_ptr + bh * C + 2 * p + 1, mask=p < P, other=0.0)[None, :]
        dke = tl.where(ke > 0, dkre * c + dkro * s + dkse, 0.0)
        dko = tl.where(ko > 0, dkro * c - dkre * s + dkso, 0.0)
        _store_pairs(dk_ptr, b, h, n, p, N, H, C, P, dke, dko, ROUND_BF16)


# --- launch geometry ---------------------------------------------------------------------------

def _blocks(N: int, C: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_I, BLOCK_P); tl.dot needs every tile side >= 16."""
    block_p = max(16, triton.next_power_of_2(C // 2))
    block_i = max(16, min(64, triton.next_power_of_2(C)))
    block_n = 64 if device.type == "cuda" else max(16, min(32, triton.next_power_of_2(N)))
    return block_n, block_i, block_p


def _splits(bh: int, row_tiles: int, N: int, block_n: int, device: torch.device) -> int:
    """Token splits of a reduction: enough programs to fill the GPU, one when interpreted."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(1, bh * row_tiles))
    return max(1, min(want, triton.cdiv(N, block_n)))


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _table_strides(cos: torch.Tensor) -> tuple[int, int]:
    return (cos.stride(0) if cos.dim() == 3 else 0), cos.stride(-2)


# --- torch path --------------------------------------------------------------------------------

def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous tensor of ``dtype`` in one copy (``.to(memory_format=)`` keeps a same-dtype view)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _features_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(B, N, H, C) -> fp32 (phi, R(phi)) as (B, H, N, C)."""
    from .rope import _rotate_torch, _rotation

    phi = torch.relu(x.float())
    rot = _rotate_torch(phi, _rotation(cos, sin, 1.0))
    return phi.transpose(1, 2), rot.transpose(1, 2)


def linear_attention_forward(q, k, v, cos, sin, eps):
    """Returns (out (B, N, H, C) in q.dtype, kv (B*H, C, C) fp32, ks (B*H, C) fp32)."""
    B, N, H, C = q.shape
    if use_triton(q):
        cos, sin = cos.contiguous(), sin.contiguous()
        block_n, block_i, block_p = _blocks(N, C, q.device)
        row_tiles = triton.cdiv(C, block_i)
        splits = _splits(B * H, row_tiles, N, block_n, q.device)
        per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
        kv = torch.empty((B * H, splits, C, C), dtype=torch.float32, device=q.device)
        ks = torch.empty((B * H, splits, C), dtype=torch.float32, device=q.device)
        _la_state_kernel[(B * H, row_tiles, splits)](
            k, v, cos, sin, kv, ks, N, H, C, C // 2, per_split, *k.stride(), *v.stride(), *_table_strides(cos),
            BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_P=block_p, PREC=_prec(q))
        kv, ks = (kv.sum(1), ks.sum(1)) if splits > 1 else (kv.squeeze(1), ks.squeeze(1))
        out = torch.empty((B, N, H, C), dtype=q.dtype, device=q.device)
        _la_out_kernel[(B * H, triton.cdiv(N, block_n), row_tiles)](
            q, cos, sin, kv, ks, out, N, H, C, C // 2, eps, *q.stride(), *_table_strides(cos),
            BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_P=block_p, PREC=_prec(q), ROUND_BF16=interpreting())
        return out, kv, ks
    phi_q, qr = _features_torch(q, cos, sin)
    phi_k, kr = _features_torch(k, cos, sin)
    vf = v.float().transpose(1, 2)  # (B, H, N, C)
    kv = torch.matmul(vf.transpose(-1, -2), kr)  # (B, H, C, C): kv[i, j] = sum_n v[n, i] kr[n, j]
    ks = phi_k.sum(2)  # (B, H, C)
    den = torch.matmul(phi_q, ks.unsqueeze(-1)).add_(eps)  # (B, H, N, 1)
    out = torch.matmul(qr, kv.transpose(-1, -2)).div_(den)
    out = _dense(out.transpose(1, 2), q.dtype)
    return out, kv.reshape(B * H, C, C), ks.reshape(B * H, C)


def linear_attention_backward(grad, q, k, v, cos, sin, kv, ks, eps, needs):
    """Returns (dq, dk, dv), None where ``needs`` (3 bools) is false; the Triton passes compute
    all three (dk and dv come from one pass), the torch path skips the unneeded products."""
    B, N, H, C = q.shape
    if use_triton(q):
        cos, sin = cos.contiguous(), sin.contiguous()
        block_n, block_i, block_p = _blocks(N, C, q.device)
        row_tiles = triton.cdiv(C, block_i)
        n_tiles = triton.cdiv(N, block_n)
        dq = torch.empty((B, N, H, C), dtype=q.dtype, device=q.device)
        dden = torch.empty((B * H, N), dtype=torch.float32, device=q.device)
        _la_bwd_q_kernel[(B * H, n_tiles)](
            grad, q, cos, sin, kv, ks, dq, dden, N, H, C, C // 2, eps, *grad.stride(), *q.stride(),
            *_table_strides(cos), BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_P=block_p, PREC=_prec(q),
            ROUND_BF16=interpreting())
        splits = _splits(B * H, row_tiles, N, block_n, q.device)
        per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
        dkv = torch.empty((B * H, splits, C, C), dtype=torch.float32, device=q.device)
        dks = torch.empty((B * H, splits, C), dtype=torch.float32, device=q.device)
        _la_bwd_state_kernel[(B * H, row_tiles, splits)](
            grad, q, cos, sin, ks, dden, dkv, dks, N, H, C, C // 2, eps, per_split, *grad.stride(), *q.stride(),
            *_table_strides(cos), BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_P=block_p, PREC=_prec(q))
        dkv, dks = (dkv.sum(1), dks.sum(1)) if splits > 1 else (dkv.squeeze(1), dks.squeeze(1))
        dk = torch.empty((B, N, H, C), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, N, H, C), dtype=v.dtype, device=v.device)
        _la_bwd_kv_kernel[(B * H, n_tiles)](
            k, v, cos, sin, dkv, dks, dk, dv, N, H, C, C // 2, *k.stride(), *v.stride(), *_table_strides(cos),
            BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_P=block_p, PREC=_prec(q), ROUND_BF16=interpreting())
        return tuple(d if n else None for d, n in zip((dq, dk, dv), needs))
    from .rope import _rotate_torch, _rotation

    kv = kv.view(B, H, C, C)
    ks = ks.view(B, H, 1, C)
    g = grad.to(torch.float32, copy=True).transpose(1, 2)  # (B, H, N, C), scaled in place below
    phi_q, qr = _features_torch(q, cos, sin)
    z = torch.matmul(phi_q, ks.transpose(-1, -2)).add_(eps).reciprocal_()  # (B, H, N, 1)
    t = torch.matmul(g, kv)  # kv^T g per token
    dden = (qr * t).sum(-1, keepdim=True).mul_(z).mul_(z).neg_()
    gz = g.mul_(z)
    dq = dk = dv = None
    if needs[0]:
        back = _rotation(cos, sin, -1.0)
        dqr = _rotate_torch(t.mul_(z).transpose(1, 2), back)  # (B, N, H, C)
        dq = dqr.add_(dden.transpose(1, 2) * ks.transpose(1, 2)).mul_(q > 0)
        dq = _dense(dq, q.dtype)
    if needs[1] or needs[2]:
        dkv = torch.matmul(gz.transpose(-1, -2), qr)  # (B, H, C, C)
        phi_k, kr = _features_torch(k, cos, sin)
        if needs[2]:
            dv = _dense(torch.matmul(kr, dkv.transpose(-1, -2)).transpose(1, 2), v.dtype)
        if needs[1]:
            dks = (dden * phi_q).sum(2, keepdim=True)  # (B, H, 1, C)
            dkr = torch.matmul(v.float().transpose(1, 2), dkv)  # dkv^T v per token
            dphi = _rotate_torch(dkr.transpose(1, 2), _rotation(cos, sin, -1.0)).add_(dks.transpose(1, 2))
            dk = _dense(dphi.mul_(k > 0), k.dtype)
    return dq, dk, dv


# --- custom ops, autograd, functional, module ---------------------------------------------------

@torch.library.custom_op("vidtune::linear_attention_fwd", mutates_args=())
def _linear_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_attention_forward(q, k, v, cos, sin, eps)


@_linear_attention_fwd_op.register_fake
def _(q, k, v, cos, sin, eps):
    B, N, H, C = q.shape
    return (torch.empty((B, N, H, C), dtype=q.dtype, device=q.device),
            torch.empty((B * H, C, C), dtype=torch.float32, device=q.device),
            torch.empty((B * H, C), dtype=torch.float32, device=q.device))


@torch.library.custom_op("vidtune::linear_attention_bwd", mutates_args=())
def _linear_attention_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, ks: torch.Tensor, eps: float,
                             needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = linear_attention_backward(grad, q, k, v, cos, sin, kv, ks, eps, needs)
    # custom ops return tensors: an unneeded grad comes back empty
    return tuple(d if d is not None else t.new_empty(0) for d, t in zip((dq, dk, dv), (q, k, v)))


@_linear_attention_bwd_op.register_fake
def _(grad, q, k, v, cos, sin, kv, ks, eps, needs):
    shape = tuple(q.shape)
    return tuple(torch.empty(shape if n else (0,), dtype=t.dtype, device=t.device)
                 for n, t in zip(needs, (q, k, v)))


# FLOPs for torch's flop counter (vidtune's counters, the planner): a custom op is one dispatch, its
# matmuls are invisible. Per (b, h): the state and the output are C x C x N products each (the
# normaliser adds 2 C N); backward: kv^T g, then dkv, dv and dk (each C x C x N) as needed.
@register_flop_formula(torch.ops.vidtune.linear_attention_fwd)
def _linear_attention_fwd_flop(q_shape, *args, **kwargs):
    B, N, H, C = q_shape
    return 4 * B * H * N * C * C + 2 * B * H * N * C


@register_flop_formula(torch.ops.vidtune.linear_attention_bwd)
def _linear_attention_bwd_flop(grad_shape, q_shape, k_shape, v_shape, cos_shape, sin_shape, kv_shape, ks_shape, eps,
                               needs, *args, **kwargs):
    B, N, H, C = q_shape
    products = 1 + (needs[1] or needs[2]) + needs[1] + needs[2]
    return 2 * products * B * H * N * C * C + 4 * B * H * N * C


class LinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, eps):
        out, kv, ks = torch.ops.vidtune.linear_attention_fwd(q, k, v, cos, sin, eps)
        ctx.save_for_backward(q, k, v, cos, sin, kv, ks)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cos, sin, kv, ks = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        dq, dk, dv = torch.ops.vidtune.linear_attention_bwd(grad, q, k, v, cos, sin, kv, ks, ctx.eps, needs)
        keep = ctx.needs_input_grad
        return (dq if keep[0] else None), (dk if keep[1] else None), (dv if keep[2] else None), None, None, None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Sana's ReLU linear attention with RoPE: q, k, v (B, N, H, C) -> (B, N, H, C) in q.dtype.

    cos, sin: fp32 tables (N, C/2) or (B, N, C/2) (``wan_rope_freqs``, the Wan video RoPE)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or q.shape[-1] % 2:
        raise ValueError(f"linear_attention expects q, k, v of one shape (B, N, H, C) with C even, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, N = q.shape[:2]
    P = q.shape[-1] // 2
    if cos.shape != sin.shape or cos.shape[-2:] != (N, P) or cos.dim() not in (2, 3) \
            or (cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(f"rope tables must be (N, C/2) = ({N}, {P}) or (B, N, C/2), got cos {tuple(cos.shape)} "
                         f"and sin {tuple(sin.shape)}; build them with wan_rope_freqs")
    return LinearAttentionFunction.apply(q, k, v, cos, sin, float(eps))


class LinearAttention(nn.Module):
    """``linear_attention`` as a module (no parameters)."""

    def __init__(self, eps: float = DEFAULT_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, q, k, v, cos, sin):
        return linear_attention(q, k, v, cos, sin, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
