"""CREPA's regulariser against a direct transcription of the paper's formula, and its gradient
reaching only the blocks up to the chosen one."""
import math

import pytest
import torch
import torch.nn.functional as F

from vidtune.config import CrepaConfig
from vidtune.testing import tiny_wan_inputs, tiny_wan_transformer
from vidtune.train.crepa import Crepa, crepa_loss


def direct(p, y, d, tau, lam):
    """lambda * L_align = -lambda * mean_b (1/F) sum_f [sim(y^f, p^f) + sum_{k in {f-d, f+d}} e^{-|k-f|/tau}
    sim(y^k, p^f)], sim = mean over patches of the cosine similarity; loops, no vectorisation."""
    B, Fr, N, _ = p.shape
    total = 0.0
    for b in range(B):
        per = 0.0
        for f in range(Fr):
            def sim(k):
                return sum(F.cosine_similarity(y[b, k, n], p[b, f, n], dim=0) for n in range(N)) / N
            s = sim(f)
            for k in (f - d, f + d) if d else ():
                if 0 <= k < Fr:
                    s = s + math.exp(-abs(k - f) / tau) * sim(k)
            per = per + s
        total = total + per / Fr
    return -lam * total / B


@pytest.mark.parametrize("d,tau", [(0, 1.0), (1, 0.7), (2, 3.0)])
def test_loss_is_the_papers_formula(d, tau):
    g = torch.Generator().manual_seed(d)
    p, y = torch.randn(2, 5, 3, 6, generator=g), torch.randn(2, 5, 3, 6, generator=g)
    got, _ = crepa_loss(p, y, d, tau, 0.5)
    assert got.item() == pytest.approx(direct(p, y, d, tau, 0.5).item(), rel=1e-5)


def test_gradient_reaches_the_blocks_up_to_the_chosen_one_only():
    model = tiny_wan_transformer()
    x, t, ctx = tiny_wan_inputs()
    crepa = Crepa(CrepaConfig(enabled=True, block_index=1, head_dim=8), model, 12, "cpu", seed=0)
    out, hidden = model(x, t, ctx, capture_hidden=(crepa.block,))
    f, h, w = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
    features = torch.randn(x.shape[0], f, 4, 12)  # a 2x2 encoder grid, resampled to the 2x3 tokens
    loss, _ = crepa.loss(hidden[crepa.block], x, features)
    loss.backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert touched(model.blocks[0]) and touched(model.blocks[1]) and touched(model.patch_embedding)
    assert not touched(model.blocks[2]) and not touched(model.blocks[3]) and not touched(model.proj_out)
    assert all(p.grad is not None for p in crepa.head.parameters())
    assert out.shape == x.shape and hidden[1].shape == (x.shape[0], f * h * w, model.config.inner_dim)
