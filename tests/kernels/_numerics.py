"""Kernel-vs-reference checks shared by the rope/modulate/residual/gelu tests.

fp32 outputs: tight allclose against the fp32 reference. Low-precision outputs: the flash-attn
rule, max|kernel - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + 1e-6, where ref_lowp is the torch
reference run on the same low-precision inputs and ref_fp32 the reference on those inputs upcast.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _leaves(args, upcast):
    out = []
    for a in args:
        if torch.is_tensor(a):
            requires_grad, a = a.requires_grad, a.detach()
            # the kernel run keeps the input's layout: non-contiguous views stay non-contiguous
            t = a.float() if upcast else torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)
            t = t.copy_(a) if not upcast else t.clone()
            out.append(t.requires_grad_(requires_grad))
        else:
            out.append(a)
    return out


def _run(fn, args, upcast, grad_out=None):
    leaves = _leaves(args, upcast)
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out.float() if upcast else grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad], grad_out


def check_against_reference(fn, ref, args):
    """Forward and every input grad of fn vs ref; args are the low-precision (or fp32) inputs."""
    got, grad_out = _run(fn, args, upcast=False)
    lowp, _ = _run(ref, args, upcast=False, grad_out=grad_out)
    fp32, _ = _run(ref, args, upcast=True, grad_out=grad_out)
    for i, (k, r, r32) in enumerate(zip(got, lowp, fp32)):
        name = "output" if i == 0 else f"grad {i - 1}"
        assert k is not None, f"{name} missing"
        assert k.shape == r.shape and k.dtype == r.dtype, f"{name}: {k.shape}/{k.dtype} vs {r.shape}/{r.dtype}"
        if k.dtype == torch.float32:
            torch.testing.assert_close(k, r32, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        else:
            err = (k.float() - r32).abs().max().item()
            bound = 2 * (r.float() - r32).abs().max().item() + 1e-6
            assert err <= bound, f"{name}: kernel error {err:.3e} > flash-attn bound {bound:.3e}"


def check_fake_and_meta(op, *args):
    """op gives the same output shapes, dtypes and strides on real, fake and meta tensors."""
    real = op(*args)
    real = real if isinstance(real, tuple) else (real,)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if torch.is_tensor(a) else a for a in args])
    meta = op(*[a.to("meta") if torch.is_tensor(a) else a for a in args])
    for outs in (fake, meta):
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert len(outs) == len(real)
        for o, r in zip(outs, real):
            assert (o.shape, o.dtype, o.stride()) == (r.shape, r.dtype, r.stride())
