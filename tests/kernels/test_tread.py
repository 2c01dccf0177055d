"""TREAD gather/scatter vs the reference (forward and grads, both paths), and select_tokens."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtune_kernels import TreadGather, TreadScatter, select_tokens, tread_gather, tread_scatter
from vidtune_kernels.reference import tread_gather_ref, tread_scatter_ref

PATHS = ["torch", "triton"]
# (B, S, rest, ratio): odd S and R, an extra trailing dim as in the (B, S, 6, D) modulation table
SHAPES = [(2, 37, (24,), 0.5), (1, 16, (6, 8), 0.25), (3, 9, (5,), 0.0)]


def _idx(B, S, ratio, seed=0):
    return select_tokens(B, S, ratio, generator=torch.Generator().manual_seed(seed))


def _grads(fn, *inputs, grad_out):
    """fn's output and the grads of the inputs that require grad."""
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,S,rest,ratio", SHAPES)
def test_gather_matches_reference(monkeypatch, path, B, S, rest, ratio):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    idx = _idx(B, S, ratio)
    x = torch.randn(B, S, *rest, requires_grad=True)
    g = torch.randn(*idx.shape, *rest)
    out, gx = _grads(tread_gather, x, idx, grad_out=g)
    out_ref, gx_ref = _grads(lambda x, i: tread_gather_ref(x, i), x, idx, grad_out=g)
    # pure data movement: exact
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,S,rest,ratio", SHAPES)
def test_scatter_matches_reference(monkeypatch, path, B, S, rest, ratio):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    idx = _idx(B, S, ratio, seed=1)
    base = torch.randn(B, S, *rest, requires_grad=True)
    y = torch.randn(*idx.shape, *rest, requires_grad=True)
    g = torch.randn(B, S, *rest)
    out, gb, gy = _grads(tread_scatter, base, y, idx, grad_out=g)
    out_ref, gb_ref, gy_ref = _grads(tread_scatter_ref, base, y, idx, grad_out=g)
    for got, want in ((out, out_ref), (gb, gb_ref), (gy, gy_ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_exact(monkeypatch, path):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    idx = _idx(2, 11, 0.5)
    base = torch.randn(2, 11, 6, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(*idx.shape, 6, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 11, 6, dtype=torch.bfloat16)
    got = _grads(lambda b, y: tread_scatter(b, tread_gather(b, idx) * y, idx), base, y, grad_out=g)
    want = _grads(
        lambda b, y: tread_scatter_ref(b, tread_gather_ref(b, idx) * y, idx), base, y, grad_out=g
    )
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_shared_table_gather(monkeypatch, path):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    # overlapping picks across samples: the table grad must add them up
    idx = torch.tensor([[0, 3, 4], [3, 4, 6]])
    table = torch.randn(7, 1, 10, requires_grad=True)
    g = torch.randn(2, 3, 1, 10)
    out, gt = _grads(lambda t, i: tread_gather(t, i, shared=True), table, idx, grad_out=g)
    out_ref, gt_ref = _grads(
        lambda t, i: tread_gather_ref(t, i, shared=True), table, idx, grad_out=g
    )
    assert out.shape == (2, 3, 1, 10)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(gt, gt_ref)


def test_modules_route_round_trip():
    """Route, transform the kept tokens, put back: untouched tokens pass through unchanged."""
    x = torch.randn(2, 20, 8)
    idx = _idx(2, 20, 0.5)
    out = TreadScatter()(x, TreadGather()(x, idx) * 2, idx)
    kept = torch.zeros(2, 20, dtype=torch.bool).scatter_(1, idx, True)
    torch.testing.assert_close(out[kept], x[kept] * 2)
    torch.testing.assert_close(out[~kept], x[~kept])


def test_fake_and_meta_shapes():
    with FakeTensorMode():
        x = torch.empty(2, 4096, 6, 32, requires_grad=True)
        idx = torch.empty(2, 1024, dtype=torch.int64)
        y = tread_gather(x, idx)
        out = tread_scatter(x, y * 2, idx)
        out.sum().backward()
        assert y.shape == (2, 1024, 6, 32) and out.shape == x.shape and x.grad.shape == x.shape
        assert tread_gather(torch.empty(4096, 1, 64), idx, shared=True).shape == (2, 1024, 1, 64)
    x = torch.empty(2, 4096, 32, device="meta")
    idx = torch.empty(2, 1024, dtype=torch.int64, device="meta")
    assert tread_scatter(x, tread_gather(x, idx), idx).shape == (2, 4096, 32)


@pytest.mark.parametrize(
    "op,args",
    [
        ("tread_gather_fwd", lambda x, i: (x, i, False)),
        ("tread_gather_bwd", lambda x, i: (x[:, : i.shape[1]], i, 9, False)),
        ("tread_scatter_fwd", lambda x, i: (x, x[:, : i.shape[1]] * 2, i)),
        ("tread_scatter_bwd", lambda x, i: (x, i)),
    ],
)
def test_custom_op_registration(op, args):
    """Schema, fake impl and dispatch of each custom op agree with the real one."""
    x = torch.randn(2, 9, 4)
    idx = _idx(2, 9, 0.6)
    torch.library.opcheck(getattr(torch.ops.vidtune, op).default, args(x, idx))


def test_compiles_fullgraph():
    x = torch.randn(2, 12, 4, requires_grad=True)
    idx = _idx(2, 12, 0.5)

    def route(x, idx):
        return tread_scatter(x, tread_gather(x, idx).sin(), idx)

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    g = torch.randn(2, 12, 4)
    for a, b in zip(_grads(compiled, x, idx, grad_out=g), _grads(route, x, idx, grad_out=g)):
        torch.testing.assert_close(a, b)


def test_bad_inputs_say_what_is_expected():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="int64"):
        tread_gather(x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(B=3, S, \*rest\)"):
        tread_gather(x, torch.zeros(3, 3, dtype=torch.int64))
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="cast y"):
        tread_scatter(x, torch.zeros(2, 3, 4, dtype=torch.bfloat16), idx)


# --- select_tokens --------------------------------------------------------------------------


def test_select_ratio_zero_is_every_token_in_order():
    assert torch.equal(select_tokens(3, 10, 0.0), torch.arange(10).expand(3, 10))


def test_select_seeded_sorted_unique_equal_k():
    a = _idx(4, 100, 0.7, seed=5)
    assert a.dtype == torch.int64 and a.shape == (4, 30)  # 100 - round(70)
    assert torch.equal(a, _idx(4, 100, 0.7, seed=5))
    assert not torch.equal(a, _idx(4, 100, 0.7, seed=6))
    assert (a.diff(dim=1) > 0).all() and a.min() >= 0 and a.max() < 100
    assert not torch.equal(a[0], a[1])  # each sample draws its own subset


def test_select_force_keep():
    force = torch.zeros(2, 50, dtype=torch.bool)
    force[0, :5] = True
    force[1, 40:] = True
    idx = select_tokens(2, 50, 0.8, generator=torch.Generator().manual_seed(0), force_keep=force)
    assert idx.shape == (2, 10)
    kept = torch.zeros_like(force).scatter_(1, idx, True)
    assert kept[force].all()


def test_select_force_keep_over_budget_keeps_more():
    force = torch.zeros(3, 40, dtype=torch.bool)
    force[1, ::2] = True  # 20 forced, budget is 40 - round(0.75 * 40) = 10
    force[2, 3] = True
    idx = select_tokens(3, 40, 0.75, generator=torch.Generator().manual_seed(0), force_keep=force)
    assert idx.shape == (3, 20)
    assert torch.equal(idx[1], torch.arange(0, 40, 2))
    assert (idx.diff(dim=1) > 0).all()
    assert (idx[2] == 3).any()


def test_select_rejects_bad_ratio():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_tokens(1, 10, 1.0)
