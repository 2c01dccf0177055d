"""linear_attention (Sana's ReLU linear attention with RoPE) vs the reference, forward and every
input grad, on the torch path and the Triton kernels (interpreter), fp32 and bf16; the custom ops
on fake and meta tensors."""
import pytest
import torch
from _numerics import check_against_reference, check_fake_and_meta

from vidtune_kernels import LinearAttention, linear_attention, wan_rope_freqs
from vidtune_kernels.reference import linear_attention_ref

B, H, C = 2, 3, 12  # 6 rope pairs per head: not a power of two, exercises the kernel masks


def _inputs(n, dtype, per_sample, seed=0):
    g = torch.Generator().manual_seed(seed)
    # +0.3: no token has every feature <= 0 (its normaliser would be the bare eps)
    q, k, v = ((torch.randn(B, n, 2 * H * C, generator=g) + 0.3).to(dtype)[..., H * C:].unflatten(-1, (H, C))
               for _ in range(3))
    cos, sin = wan_rope_freqs(C, 1, n, 1)
    if per_sample:  # TREAD-gathered rows: each sample keeps its own positions
        perm = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
        cos, sin = cos[perm], sin[perm]
    return [t.requires_grad_() for t in (q, k, v)], cos, sin


@pytest.mark.parametrize("path,n", [("torch", 41), ("triton", 37)])  # 37 > 32: two token tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_reference(monkeypatch, path, n, dtype, per_sample):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    qkv, cos, sin = _inputs(n, dtype, per_sample)
    assert not qkv[0].is_contiguous()  # head views of a wider projection, as in the model
    check_against_reference(lambda q, k, v: linear_attention(q, k, v, cos, sin),
                            lambda q, k, v: linear_attention_ref(q, k, v, cos, sin), qkv)


def test_paths_agree_and_partial_grads(monkeypatch):
    """Triton == torch path in fp32; a frozen v (or q) still gives the other grads."""
    qkv, cos, sin = _inputs(19, torch.float32, False, seed=3)
    outs = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("VIDTUNE_KERNELS", path)
        q, k, v = (t.detach().clone().requires_grad_(i != 2) for i, t in enumerate(qkv))
        out = LinearAttention()(q, k, v, cos, sin)
        out.square().sum().backward()
        assert v.grad is None
        outs[path] = (out, q.grad, k.grad)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes():
    qkv, cos, sin = _inputs(5, torch.float32, False)
    with pytest.raises(ValueError, match="rope tables"):
        linear_attention(*qkv, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="one shape"):
        linear_attention(qkv[0], qkv[1][:, :4], qkv[2], cos, sin)


def test_custom_ops_fake_and_meta():
    (q, k, v), cos, sin = _inputs(7, torch.float32, False)
    q, k, v = (t.detach() for t in (q, k, v))
    check_fake_and_meta(torch.ops.vidtune.linear_attention_fwd, q, k, v, cos, sin, 1e-15)
    out, kv, ks = torch.ops.vidtune.linear_attention_fwd(q, k, v, cos, sin, 1e-15)
    check_fake_and_meta(torch.ops.vidtune.linear_attention_bwd, torch.randn_like(out), q, k, v, cos, sin, kv, ks,
                        1e-15, [True, False, True])
