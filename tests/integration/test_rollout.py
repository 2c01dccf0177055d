"""Scheduled sampling ([rollout]): with probability 1 the model is fed exactly the latents that k
steps of diffusers' flow-matching Euler sampler produce from the higher noise level; with
probability 0 the run is bitwise the plain one."""
import shutil

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.config import RolloutConfig
from vidtune.data.loader import Batch
from vidtune.testing import tiny_run_toml, tiny_wan_inputs, tiny_wan_transformer, write_captioned_clips
from vidtune.train.flow import shift_sigmas
from vidtune.train.forward import wan_forward
from vidtune.train.log import read_losses
from vidtune.train.rollout import Rollout


def test_probability_one_feeds_the_samplers_latents():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_wan_transformer()
    x0, _, ctx = tiny_wan_inputs()
    b = x0.shape[0]
    batch = Batch(x0, ctx, torch.full((b,), ctx.shape[1]), ["a", "b"], torch.zeros(b, dtype=torch.bool),
                  ["d", "d"], ["s0", "s1"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    sigma = torch.tensor([0.35, 0.62])
    cfg = RolloutConfig(probability=1.0, max_step_offset=4, sampler_steps=10, shift=3.0)
    r = Rollout(cfg, seed=1)
    state = r.generator.get_state()
    got = r.input(wan_forward, model, batch, noise, sigma)
    assert model.training  # the rollout ran in eval mode and gave the mode back

    r.generator.set_state(state)
    on, steps = r.draw(b)
    assert on.all() and steps.tolist() != [1, 1]
    grid = shift_sigmas(torch.linspace(1.0, 0.0, cfg.sampler_steps + 1), cfg.shift)
    model.eval()
    with torch.no_grad():
        for i in range(b):
            above = grid[grid > sigma[i]]
            levels = above[len(above) - int(steps[i]):].tolist() + [float(sigma[i])]
            sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
            sched.set_timesteps(sigmas=levels[:-1], device="cpu")  # diffusers appends its own end (0)
            sched.sigmas[-1] = levels[-1]  # ... we stop at sigma instead
            x = (1 - levels[0]) * x0[i:i + 1] + levels[0] * noise[i:i + 1]
            for t in sched.timesteps:
                v = model(x, t.view(1), ctx[i:i + 1])
                x = sched.step(v, t, x).prev_sample
            torch.testing.assert_close(got[i:i + 1], x, rtol=1e-5, atol=1e-5)
    model.train()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg missing")
def test_probability_zero_is_the_plain_run(tmp_path, tiny_wan_dir):
    clips = write_captioned_clips(tmp_path / "clips")
    cfg = tmp_path / "r.toml"
    cfg.write_text(tiny_run_toml(tiny_wan_dir, tmp_path / "cache", {"clips": clips}, tmp_path / "unused",
                                 "max_train_steps = 3\nlearning_rate = 1e-2\ncheckpoint_every = 0"))

    def losses(name, *sets):
        out = tmp_path / name
        args = [str(cfg), "--set", f'train.output_dir="{out}"'] + [a for s in sets for a in ("--set", s)]
        assert cli_main(args) == 0
        return [float.hex(r["loss"]) for r in read_losses(out)]

    plain = losses("plain")
    assert losses("p0", "rollout.max_step_offset=3", "rollout.probability=0") == plain
    rolled = losses("p1", "rollout.max_step_offset=3", "rollout.probability=1")
    assert rolled[0] != plain[0] and len(rolled) == 3
