"""gelu_tanh vs the reference and F.gelu(approximate="tanh") (both paths, fp32/bf16), and its
custom ops on fake and meta tensors."""
import pytest
import torch
import torch.nn.functional as F
from _numerics import check_against_reference, check_fake_and_meta

from vidtune_kernels import GeluTanh, gelu_tanh
from vidtune_kernels.reference import gelu_tanh_ref

PATHS = ["torch", "triton"]


def _x(dtype):
    x = 3 * torch.randn(3, 37, 41)
    x[0, 0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-4])  # tanh saturation and the origin
    return x.to(dtype).transpose(1, 2).requires_grad_()  # non-contiguous


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_matches_reference(monkeypatch, path, dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    check_against_reference(gelu_tanh, gelu_tanh_ref, [_x(dtype)])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_matches_torch_gelu(monkeypatch, path, dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    check_against_reference(GeluTanh(), lambda x: F.gelu(x, approximate="tanh"), [_x(dtype)])


def test_custom_ops_on_fake_and_meta():
    x = torch.randn(4, 7, 9, dtype=torch.bfloat16)
    check_fake_and_meta(torch.ops.vidtune.gelu_tanh_fwd, x)
    check_fake_and_meta(torch.ops.vidtune.gelu_tanh_bwd, x, x)
    check_fake_and_meta(torch.ops.vidtune.gelu_tanh_fwd, x.transpose(0, 2))
