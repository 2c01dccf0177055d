"""gated_residual vs the reference (both paths, fp32/bf16, mixed x/y dtypes, per-sample and
per-token gates) and its custom ops on fake and meta tensors."""
import pytest
import torch
from _numerics import check_against_reference, check_fake_and_meta

from vidtune_kernels import GatedResidual, gated_residual
from vidtune_kernels.reference import gated_residual_ref

PATHS = ["torch", "triton"]
B, D = 2, 96


def _gate(table):
    return table[:, 2:3] if table.dim() == 3 else table[:, :, 2]  # non-contiguous chunk


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_matches_reference(monkeypatch, path, x_dtype, y_dtype, per_token):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    S = 37 if path == "torch" else 9
    x = (4 * torch.randn(B, S, D)).to(x_dtype).requires_grad_()
    y = torch.randn(B, S, D).to(y_dtype).requires_grad_()
    table = torch.randn((B, S, 6, D) if per_token else (B, 6, D)).requires_grad_()
    check_against_reference(lambda x, y, t: gated_residual(x, y, _gate(t)),
                            lambda x, y, t: gated_residual_ref(x, y, _gate(t)), [x, y, table])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_frozen_gate(monkeypatch, path, x_dtype, y_dtype):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    x = torch.randn(B, 5, D).to(x_dtype).requires_grad_()
    y = torch.randn(B, 5, D).to(y_dtype).requires_grad_()
    gate = _gate(torch.randn(B, 6, D))
    # A frozen gate needs no y in backward: y is not kept (a LoRA run's modulation is frozen).
    assert GatedResidual()(x, y, gate).grad_fn.saved_tensors[0] is None
    check_against_reference(lambda x, y: GatedResidual()(x, y, gate),
                            lambda x, y: gated_residual_ref(x, y, gate), [x, y])


def test_custom_ops_on_fake_and_meta():
    x = torch.randn(B, 5, D, dtype=torch.bfloat16)
    y = torch.randn(B, 5, D)
    for gate in (_gate(torch.randn(B, 6, D)), _gate(torch.randn(B, 5, 6, D))):
        check_fake_and_meta(torch.ops.vidtune.gated_residual_fwd, x, y, gate)
        for compute_dgate in (True, False):
            check_fake_and_meta(torch.ops.vidtune.gated_residual_bwd, x, y, gate, compute_dgate)
