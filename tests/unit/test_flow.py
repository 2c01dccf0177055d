"""Flow-matching pieces against diffusers' FlowMatchEulerDiscreteScheduler and the schedule helpers."""
import math

import pytest
import torch

from vidtune.config import TrainConfig
from vidtune.train.flow import auto_shift, flow_loss, noisy_input, sample_sigmas, shift_sigmas
from vidtune.train.optim import build_optimizer, build_scheduler


def test_noisy_input_matches_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    sigma = torch.tensor([sched.sigmas[100].item()])
    x_t, target, timestep = noisy_input(x0, noise, sigma)
    torch.testing.assert_close(timestep, sched.timesteps[100:101].float())
    torch.testing.assert_close(x_t, sched.scale_noise(x0, sched.timesteps[100:101], noise))
    torch.testing.assert_close(target, noise - x0)
    assert flow_loss(target, target) == 0


def test_shift_matches_diffusers_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[:-1]
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas[:-1]
    torch.testing.assert_close(shift_sigmas(plain, 3.0), shifted)


def test_sigma_sampling_methods():
    for method in ("logit_norm", "uniform", "shift", "auto_shift"):
        s = sample_sigmas(4096, method, torch.Generator().manual_seed(0), tokens_per_frame=1560)
        assert s.shape == (4096,) and 0 < s.min() and s.max() < 1
    assert abs(sample_sigmas(20000, "logit_norm", torch.Generator().manual_seed(0)).median() - 0.5) < 0.02
    shifted = sample_sigmas(20000, "shift", torch.Generator().manual_seed(0), shift=3.0)
    assert shifted.mean() > 0.6  # shift > 1 spends more steps at high noise
    # auto_shift grows with resolution: 832x480 (52x30 tokens per frame) ~ 2.06, 256 tokens -> e^0.5.
    assert auto_shift(1560) == pytest.approx(2.06, abs=0.01) and auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(3600) > auto_shift(1560)


def test_cosine_warmup_schedule():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(learning_rate=1.0, lr_scheduler="cosine", lr_warmup_steps=2, max_train_steps=10)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] < 0.05 and lrs[2:] == sorted(lrs[2:], reverse=True)


def test_weighted_flow_loss_is_the_mean_over_the_weighted_elements():
    pred, target = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    mask = torch.zeros(1, 1, 3, 1, 1)
    mask[:, :, 1:] = 1  # leave out frame 0
    expected = torch.nn.functional.mse_loss(pred[:, :, 1:], target[:, :, 1:])
    torch.testing.assert_close(flow_loss(pred, target, mask), expected)
    torch.testing.assert_close(flow_loss(pred, target, torch.ones(1)), flow_loss(pred, target))
