"""modulate vs the reference (both paths, fp32/bf16, per-sample and per-token tables) and its
custom ops on fake and meta tensors."""
import pytest
import torch
from _numerics import check_against_reference, check_fake_and_meta

from vidtune_kernels import Modulate, modulate
from vidtune_kernels.reference import modulate_ref

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
B, D = 2, 96


def _split(table):
    """shift, scale as Wan takes them: non-contiguous chunks of the modulation table."""
    if table.dim() == 3:  # (B, 6, D) -> (B, 1, D) views
        return table[:, 0:1], table[:, 1:2]
    return table[:, :, 0], table[:, :, 1]  # (B, S, 6, D) -> (B, S, D) views


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_modulate_matches_reference(monkeypatch, path, dtype, per_token):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    S = 37 if path == "torch" else 9
    x = (2 + 3 * torch.randn(B, S, D)).to(dtype).requires_grad_()
    table = (0.5 * torch.randn((B, S, 6, D) if per_token else (B, 6, D))).requires_grad_()
    check_against_reference(lambda x, t: modulate(x, *_split(t), 1e-6),
                            lambda x, t: modulate_ref(x, *_split(t), 1e-6), [x, table])


@pytest.mark.parametrize("path", PATHS)
def test_frozen_modulation_gives_only_dx(monkeypatch, path):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    x = torch.randn(B, 5, D, requires_grad=True)
    shift, scale = _split(torch.randn(B, 6, D))
    check_against_reference(lambda x: Modulate()(x, shift, scale), lambda x: modulate_ref(x, shift, scale), [x])


def test_custom_ops_on_fake_and_meta():
    x = torch.randn(B, 5, D, dtype=torch.bfloat16)
    for table in (torch.randn(B, 6, D), torch.randn(B, 5, 6, D)):
        shift, scale = _split(table)
        _, mean, rstd = torch.ops.vidtune.modulate_fwd(x, shift, scale, 1e-6)
        check_fake_and_meta(torch.ops.vidtune.modulate_fwd, x, shift, scale, 1e-6)
        for compute_dscale in (True, False):
            check_fake_and_meta(torch.ops.vidtune.modulate_bwd, x, x, scale, mean, rstd, compute_dscale)
