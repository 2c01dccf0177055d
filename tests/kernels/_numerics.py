"""Kernel-vs-reference checks shared by the rope/modulate/residual/gelu tests.

fp32 outputs: tight allclose against the fp32 reference. Low-precision outputs: the flash-attn
rule, max|kernel - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + 1e-6, where ref_lowp is the torch
reference run on the same low-precision inputs and ref_fp32 the reference on those inputs upcast.
The rule itself is ``vidtune_kernels.reference.compare``, which the GPU check uses too.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtune_kernels.reference import FP32_TOL, compare


def check_against_reference(fn, ref, args):
    """Forward and every input grad of fn vs ref; args are the low-precision (or fp32) inputs."""
    for r in compare(fn, ref, args):
        assert not r["problem"], f"{r['name']}: {r['problem']}"
        if r["bound"] is None:
            assert r["ok"], f"{r['name']}: max error {r['err']:.3e} beyond fp32 tolerance {FP32_TOL}"
        else:
            assert r["ok"], f"{r['name']}: kernel error {r['err']:.3e} > flash-attn bound {r['bound']:.3e}"


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
