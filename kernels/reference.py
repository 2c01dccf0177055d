"""Pure-torch references: the spec every kernel is tested and benchmarked against.

Each function is written for clarity, computes in fp32 where the model does, and returns the
dtype the fused op returns. Autograd through these functions gives the reference gradients.
"""
from __future__ import annotations

import torch

# --- rope, qk_norm_rope, modulate, gated_residual, gelu_tanh (kernels/rope.py, modulate.py,
# --- residual.py, gelu.py) ---------------------------------------------------------------
def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (B, S, H, Dh) by cos/sin (S, Dh/2) or (B, S, Dh/2)."""
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def qk_norm_rope_ref(x, weight, eps, cos, sin, heads):
    """Wan q/k path: RMSNorm across all heads (torch.nn.RMSNorm math), cast to x.dtype, RoPE."""
    normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps).to(x.dtype)
    return rope_ref(normed.unflatten(-1, (heads, -1)), cos, sin)


def modulate_ref(x, shift, scale, eps=1e-6):
    """adaLN: LayerNorm without affine in fp32, then * (1 + scale) + shift, cast to x.dtype."""
    normed = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + scale) + shift).to(x.dtype)


def gated_residual_ref(x, y, gate):
    return (x.float() + y.float() * gate).to(x.dtype)


def gelu_tanh_ref(x):
    xf = x.float()
    inner = (2.0 / torch.pi) ** 0.5 * (xf + 0.044715 * xf.pow(3))
    return (0.5 * xf * (1.0 + torch.tanh(inner))).to(x.dtype)


def rms_norm_ref(x, weight, eps):
    """torch.nn.RMSNorm(D, eps) math (kernels/norm.py): fp32 stats, x upcast, x * rstd * weight in
    fp32, one cast to x.dtype (bit-equal to F.rms_norm on CPU for any x / weight dtypes)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight).to(x.dtype)



# --- tread gather/scatter, chunked feed-forward (kernels/tread.py, ffn.py) -------------------


def tread_gather_ref(x: torch.Tensor, idx: torch.Tensor, *, shared: bool = False) -> torch.Tensor:
    """x (B, S, *rest) -> (B, K, *rest) with row b = x[b, idx[b]]; ``shared``: x is (S, *rest)."""
    if shared:
        return x[idx]
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def tread_scatter_ref(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """base (B, S, *rest), y (B, K, *rest) -> base with rows idx[b] of sample b replaced by y[b]."""
    out = base.clone()
    out[torch.arange(base.shape[0], device=base.device)[:, None], idx] = y
    return out


# --- linear attention (kernels/linear_attention.py) ----------------------------------------------


def linear_attention_ref(q, k, v, cos, sin, eps=1e-15):
    """Sana's ReLU linear attention (diffusers' SanaLinearAttnProcessor3_0 math) on q, k, v
    (B, N, H, C) with RoPE tables (N, C/2) or (B, N, C/2): the normaliser from relu(q), relu(k),
    the numerator from their rotations; fp32, returned in q.dtype."""
    phi_q, phi_k = torch.relu(q.float()), torch.relu(k.float())
    qr, kr = rope_ref(phi_q, cos, sin), rope_ref(phi_k, cos, sin)
    # (B, H, C, N) layout, as diffusers computes it
    phi_q, phi_k, qr, kr, vf = (t.permute(0, 2, 3, 1) for t in (phi_q, phi_k, qr, kr, v.float()))
    z = 1 / (phi_k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ phi_q + eps)
    out = (vf @ kr.transpose(-1, -2)) @ qr * z
    return out.permute(0, 3, 1, 2).to(q.dtype)


# --- kernel vs reference: the rule the tests and the GPU check judge every op by ----------------

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _leaves(args, upcast):
    out = []
    for a in args:
        if torch.is_tensor(a):
            requires_grad, a = a.requires_grad, a.detach()
            # the kernel run keeps the input's layout: non-contiguous views stay non-contiguous
            t = a.float().clone() if upcast else torch.empty_strided(
                a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
            out.append(t.requires_grad_(requires_grad))
        else:
            out.append(a)
    return out


def _run(fn, args, upcast, grad_out=None):
    leaves = _leaves(args, upcast)
    out = fn(*leaves)
    if grad_out is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grad_out = g.to(out.device, out.dtype)
    out.backward(grad_out.float() if upcast else grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad], grad_out


def compare(fn, ref, args) -> list[dict]:
    """fn vs ref on ``args`` (low-precision or fp32 tensors), forward and every input grad.

    Low-precision results: the flash-attention rule, max|fn - ref_fp32| <= 2 * max|ref_lowp -
    ref_fp32| + 1e-6, where ref_lowp is the reference on the same low-precision inputs and ref_fp32
    on those inputs upcast. fp32 results: allclose (``FP32_TOL``, its atol times
    max(1, max|ref_fp32|)) to ref_fp32, or, when they come from low-precision inputs (a bf16
    block's fp32 grads), the same rule. One dict per result:
    name, err (max abs error), bound (None when allclose decided), ok, and a problem string when
    the result is missing or has the wrong shape or dtype."""
    got, grad_out = _run(fn, args, upcast=False)
    lowp, _ = _run(ref, args, upcast=False, grad_out=grad_out)
    fp32, _ = _run(ref, args, upcast=True, grad_out=grad_out)
    rows = []
    for i, (k, r, r32) in enumerate(zip(got, lowp, fp32)):
        row = dict(name="output" if i == 0 else f"grad {i - 1}", err=None, bound=None, ok=False, problem="")
        rows.append(row)
        if k is None:
            row["problem"] = "missing"
        elif k.shape != r.shape or k.dtype != r.dtype:
            row["problem"] = f"{tuple(k.shape)}/{k.dtype} vs {tuple(r.shape)}/{r.dtype}"
        elif not k.numel():
            row.update(err=0.0, ok=True)
        else:
            row["err"] = (k.float() - r32).abs().max().item()
            # atol scales with the result's size: a weight grad sums thousands of tokens, and a
            # different fp32 summation order moves it by ~1e-5 of its magnitude, not of 1.
            tol = dict(FP32_TOL, atol=FP32_TOL["atol"] * max(1.0, r32.abs().max().item()))
            if k.dtype == torch.float32 and torch.allclose(k, r32, **tol):
                row["ok"] = True
            else:
                row["bound"] = 2 * (r.float() - r32).abs().max().item() + 1e-6
                row["ok"] = row["err"] <= row["bound"]
    return rows
