"""rope / qk_norm_rope vs the reference (both paths, fp32 and bf16), vs diffusers' Wan attention,
and the custom ops on fake and meta tensors and under torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from _numerics import check_against_reference, check_fake_and_meta

from vidtune_kernels import QKNormRope, qk_norm_rope, rope, wan_rope_freqs
from vidtune_kernels.reference import qk_norm_rope_ref, rope_ref

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
B, H, DH = 2, 3, 24  # P = 12 pairs per head: not a power of two, exercises the kernel masks


def _seq(path):
    return 37 if path == "torch" else 9  # the interpreter pays per program: fewer tokens


def _tables(S, per_sample):
    cos, sin = wan_rope_freqs(DH, 1, S, 1)
    if per_sample:  # after token routing each sample keeps different rows
        perm = torch.stack([torch.randperm(S, generator=torch.Generator().manual_seed(b)) for b in range(B)])
        cos, sin = cos[perm], sin[perm]
    return cos, sin


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_rope_matches_reference(monkeypatch, path, dtype, per_sample):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    S = _seq(path)
    cos, sin = _tables(S, per_sample)
    x = torch.randn(B, H, S, DH).to(dtype).transpose(1, 2).requires_grad_()  # non-contiguous
    check_against_reference(rope, rope_ref, [x, cos, sin])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_weight", [True, False])
def test_qk_norm_rope_matches_reference(monkeypatch, path, dtype, train_weight):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    S = _seq(path)
    cos, sin = _tables(S, per_sample=path == "triton")
    x = (3 * torch.randn(B, S, 2 * H * DH)).to(dtype)[..., H * DH:].requires_grad_()  # a chunk view
    w = (1 + 0.5 * torch.randn(H * DH)).to(dtype).requires_grad_(train_weight)
    check_against_reference(lambda x, w: qk_norm_rope(x, w, 1e-6, cos, sin, H),
                            lambda x, w: qk_norm_rope_ref(x, w, 1e-6, cos, sin, H), [x, w])


@pytest.mark.parametrize("head_dim,grid", [(128, (3, 4, 5)), (40, (2, 3, 7))])
def test_tables_equal_diffusers(head_dim, grid):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    F_, H_, W_ = grid
    emb = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
    full_cos, full_sin = emb(torch.zeros(1, 1, F_, 2 * H_, 2 * W_))
    cos, sin = wan_rope_freqs(head_dim, F_, H_, W_)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, full_cos[0, :, 0, 0::2]) and torch.equal(sin, full_sin[0, :, 0, 1::2])


def test_matches_diffusers_wan_attention():
    """Our q/k path inside diffusers' own WanAttention numerics: norm_q/norm_k + apply_rotary_emb."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

    torch.manual_seed(0)
    heads, head_dim, grid = 3, 40, (2, 3, 5)
    attn = WanAttention(heads * head_dim, heads, head_dim, eps=1e-6, processor=WanAttnProcessor()).eval()
    with torch.no_grad():
        attn.norm_q.weight.normal_(1, 0.3)
        attn.norm_k.weight.normal_(1, 0.3)
    x = torch.randn(2, grid[0] * grid[1] * grid[2], heads * head_dim)
    rotary = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
    cos, sin = wan_rope_freqs(head_dim, *grid)

    def ours(q, k):
        v = attn.to_v(x).unflatten(2, (heads, -1))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](o.transpose(1, 2).flatten(2))

    with torch.no_grad():
        want = attn(x, rotary_emb=rotary)
        fused = ours(qk_norm_rope(attn.to_q(x), attn.norm_q.weight, 1e-6, cos, sin, heads),
                     qk_norm_rope(attn.to_k(x), attn.norm_k.weight, 1e-6, cos, sin, heads))
        plain = ours(rope(attn.norm_q(attn.to_q(x)).unflatten(2, (heads, -1)), cos, sin),
                     rope(attn.norm_k(attn.to_k(x)).unflatten(2, (heads, -1)), cos, sin))
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


def test_custom_ops_on_fake_and_meta():
    S = 5
    cos, sin = wan_rope_freqs(DH, 1, S, 1)
    x = torch.randn(B, S, H, DH, dtype=torch.bfloat16)
    check_fake_and_meta(torch.ops.vidtune.rope_fwd, x, cos, sin)
    check_fake_and_meta(torch.ops.vidtune.rope_bwd, x, cos, sin)
    xf = x.flatten(2)
    w = torch.randn(H * DH, dtype=torch.bfloat16)
    _, rstd = torch.ops.vidtune.qk_norm_rope_fwd(xf, w, 1e-6, cos, sin, H)
    check_fake_and_meta(torch.ops.vidtune.qk_norm_rope_fwd, xf, w, 1e-6, cos, sin, H)
    for compute_dw in (True, False):
        check_fake_and_meta(torch.ops.vidtune.qk_norm_rope_bwd, x, xf, w, cos, sin, rstd, compute_dw)


def test_qk_norm_rope_module_compiles_fullgraph():
    S = 6
    cos, sin = wan_rope_freqs(DH, 1, 2, 3)
    module = QKNormRope(H * DH, H)
    x = torch.randn(B, S, H * DH, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    got = compiled(x, cos, sin)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    want = module(x, cos, sin)
    (wx,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
