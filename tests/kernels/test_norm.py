"""rms_norm vs the reference and torch.nn.RMSNorm (both paths, fp32 and bf16, odd shapes), the
custom ops on fake and meta tensors, and the torch path's bytes against F.rms_norm's."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from _numerics import check_against_reference, check_fake_and_meta

from vidtune.measure.counters import count
from vidtune_kernels import RMSNorm, rms_norm
from vidtune_kernels.norm import rms_norm_backward, rms_norm_forward
from vidtune_kernels.reference import rms_norm_ref

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
D = 96  # not a power of two: exercises the kernel masks
EPS = 1e-6


def _rows(path):
    return 37 if path == "torch" else 5  # the interpreter pays per program: fewer rows


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("w_dtype", ["same", "fp32"])
def test_rms_norm_2d_matches_reference(monkeypatch, path, dtype, train_weight, w_dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    x = (3 * torch.randn(_rows(path), D)).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(D)).to(dtype if w_dtype == "same" else torch.float32)
    w.requires_grad_(train_weight)
    check_against_reference(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_ref(x, w, EPS), [x, w])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_3d_strided_matches_reference(monkeypatch, path, dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    S = _rows(path)
    x = (3 * torch.randn(2, S, 2 * D)).to(dtype)[..., D:].requires_grad_()  # a chunk view
    w = (1 + 0.5 * torch.randn(D)).to(dtype).requires_grad_()
    check_against_reference(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_ref(x, w, EPS), [x, w])


@pytest.mark.parametrize("path", PATHS)
def test_rms_norm_transposed_input(monkeypatch, path):
    """A layout whose rows do not flatten to a view (reshape copies)."""
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    x = torch.randn(2, D, 3).transpose(1, 2).requires_grad_()
    w = (1 + 0.5 * torch.randn(D)).requires_grad_()
    check_against_reference(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_ref(x, w, EPS), [x, w])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_module_equals_torch_rmsnorm(monkeypatch, path, w_dtype):
    """Same output dtype and values as torch.nn.RMSNorm on bf16 input (bf16 or fp32 weight)."""
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    torch.manual_seed(0)
    want_mod = torch.nn.RMSNorm(D, eps=EPS).to(w_dtype)
    with torch.no_grad():
        want_mod.weight.normal_(1, 0.3)
    mod = RMSNorm(D, eps=EPS).to(w_dtype)
    mod.load_state_dict(want_mod.state_dict())
    x = (3 * torch.randn(2, _rows(path), D)).bfloat16()
    xw, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():  # torch warns (once) that mixed dtypes miss its fused kernel
        warnings.simplefilter("ignore", UserWarning)
        want = want_mod(xw)
    got = mod(xm)
    assert got.dtype == want.dtype == torch.bfloat16
    # one rounding of the same fp32 value: at most one bf16 ulp apart, almost always equal
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)
    assert (got != want).float().mean() < 0.02
    g = torch.randn_like(got)
    want.backward(g)
    got.backward(g)
    assert mod.weight.grad.dtype == w_dtype
    torch.testing.assert_close(xm.grad.float(), xw.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mod.weight.grad.float(), want_mod.weight.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", PATHS)
def test_backward_without_weight_grad(monkeypatch, path):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    x = torch.randn(_rows(path), D)
    w = 1 + 0.5 * torch.randn(D)
    _, rstd = torch.ops.vidtune.rms_norm_fwd(x, w, EPS)
    g = torch.randn_like(x)
    dx, dw = torch.ops.vidtune.rms_norm_bwd(g, x, w, rstd, False)
    dx_full, _ = torch.ops.vidtune.rms_norm_bwd(g, x, w, rstd, True)
    assert dw.numel() == 0 and torch.equal(dx, dx_full)
    xr = x.clone().requires_grad_()
    out = rms_norm(xr, w, EPS)
    assert out.grad_fn is not None and not w.requires_grad
    out.backward(g)
    xf = x.clone().requires_grad_()
    rms_norm_ref(xf, w, EPS).backward(g)
    torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-5, atol=1e-5)


def test_rejects_bad_weight():
    with pytest.raises(ValueError, match="rms_norm expects"):
        rms_norm(torch.randn(3, D), torch.ones(D + 1))


def test_custom_ops_on_fake_and_meta():
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    w = torch.randn(D, dtype=torch.bfloat16)
    _, rstd = torch.ops.vidtune.rms_norm_fwd(x, w, EPS)
    assert rstd.shape == (2, 5) and rstd.dtype == torch.float32
    check_fake_and_meta(torch.ops.vidtune.rms_norm_fwd, x, w, EPS)
    for compute_dw in (True, False):
        check_fake_and_meta(torch.ops.vidtune.rms_norm_bwd, x, x, w, rstd, compute_dw)
    check_fake_and_meta(torch.ops.vidtune.rms_norm_fwd, x.float(), w.float(), EPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_materialises_fewer_bytes_than_f_rms_norm(monkeypatch, dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", "torch")
    x0 = torch.randn(4, 64, D).to(dtype)
    w0 = (1 + 0.5 * torch.randn(D)).to(dtype)
    g = torch.randn(x0.shape).to(dtype)

    def fwd_bwd(fn):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()

        def step():
            fn(x, w).backward(g)

        counts, _ = count(step, existing=(x, w, g))
        return counts.materialized_bytes

    # as the block counter sees it: the custom ops' outputs (out, rstd, dx, dw)
    ours = fwd_bwd(lambda x, w: rms_norm(x, w, EPS))
    theirs = fwd_bwd(lambda x, w: F.rms_norm(x, (D,), w, EPS))
    assert ours < theirs / 5, (ours, theirs)
    # inside the ops: forward one fp32 buffer (+ the cast to a low-precision x.dtype), backward
    # the same, plus (rows,)-sized stats and (D,)-sized weight copies and dw
    n, rows, elt = x0.numel(), x0.numel() // D, x0.element_size()
    per_pass = n * (4 + (elt if elt < 4 else 0)) + 4 * rows + 12 * D
    c_fwd, (_, rstd) = count(rms_norm_forward, x0, w0, EPS, existing=(x0, w0))
    c_bwd, _ = count(rms_norm_backward, g, x0, w0, rstd, True, existing=(x0, w0, g, rstd))
    assert c_fwd.materialized_bytes <= per_pass, c_fwd.materialized_by_op
    assert c_bwd.materialized_bytes <= per_pass, c_bwd.materialized_by_op
    assert c_fwd.materialized_bytes + c_bwd.materialized_bytes < theirs / 4
