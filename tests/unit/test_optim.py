"""fp32 master copies for bf16 adapter weights (``MasterWeights``): small updates accumulate where
stepping the bf16 weights directly rounds them away, and the state dict carries the copies."""
import copy

import pytest
import torch

from vidtune.build import adapter_master_weights
from vidtune.config import config_from_dict
from vidtune.train.optim import MasterWeights, build_optimizer, build_scheduler


def steps(opt, p, n=50):
    for _ in range(n):
        p.grad = torch.full_like(p, 1.0)
        opt.step()
        opt.zero_grad()


def test_master_copies_keep_updates_bf16_rounds_away():
    cfg = config_from_dict({"train": {"optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.0}}).train
    direct = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    steps(build_optimizer([direct], cfg), direct)
    # Each AdamW step moves the weight by ~lr = 1e-4, under half of bf16's 2^-7 spacing at 1.0.
    assert torch.equal(direct.detach(), torch.ones(4, dtype=torch.bfloat16))
    mastered = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = build_optimizer([mastered], cfg, master_weights=True)
    assert isinstance(opt, MasterWeights)
    steps(opt, mastered)
    assert opt.masters[0].dtype == torch.float32
    assert torch.allclose(opt.masters[0], torch.full((4,), 1 - 50e-4), atol=1e-5)
    assert torch.equal(mastered.detach(), opt.masters[0].to(torch.bfloat16))  # rounded into the bf16 weight
    assert (mastered < 1).all()


def test_state_dict_and_scheduler():
    cfg = config_from_dict({"train": {"optimizer": "adamw", "lr_scheduler": "cosine", "lr_warmup_steps": 2,
                                      "max_train_steps": 10}}).train
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = build_optimizer([p], cfg, master_weights=True)
    sched = build_scheduler(opt, cfg)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert opt.inner.param_groups[0]["lr"] == sched.get_last_lr()[0] > 0  # the schedule drives the inner one
    state = copy.deepcopy(opt.state_dict())  # as torch.save + load give it: no tensor shared with opt
    q = torch.nn.Parameter(p.detach().clone())
    again = build_optimizer([q], cfg, master_weights=True)
    again.load_state_dict(state)
    assert torch.equal(again.masters[0], opt.masters[0])
    for o, w in ((opt, p), (again, q)):
        w.grad = torch.ones_like(w)
        o.step()
    assert torch.equal(p, q) and torch.equal(opt.masters[0], again.masters[0])


@pytest.mark.parametrize("model_dtype, optimizer, adapter, expected", [
    ("bf16", "adamw", "lora", True), ("bf16", "adamw_8bit", "lora", True), ("bf16", "adamw_bf16", "lora", False),
    ("bf16", "lion", "lokr", False), ("fp32", "adamw", "lora", False), ("bf16", "adamw", "full", False),
])
def test_which_runs_use_master_copies(model_dtype, optimizer, adapter, expected):
    cfg = config_from_dict({"model": {"dtype": model_dtype}, "train": {"optimizer": optimizer},
                            "adapter": {"type": adapter}})
    assert adapter_master_weights(cfg) is expected
