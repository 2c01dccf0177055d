"""Optimizers (torch, bitsandbytes) and LR schedules (diffusers.optimization.get_scheduler)."""
from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig

_BNB = {"lion": "Lion", "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
        "lion_8bit": "Lion8bit", "paged_lion_8bit": "PagedLion8bit"}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params``; clear errors for the ones not available."""
    params = list(params)
    kw = dict(lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, eps=cfg.eps, **kw)
    if cfg.optimizer in _BNB:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"train.optimizer = {cfg.optimizer!r} needs bitsandbytes: pip install bitsandbytes "
                              f"(or set train.optimizer = \"adamw\")") from None
        cls = getattr(bnb.optim, _BNB[cfg.optimizer])
        if "lion" in cfg.optimizer:
            return cls(params, **kw)
        # min_8bit_size=0: small adapter tensors get 8-bit states too (bnb's default keeps < 4096 in fp32).
        return cls(params, eps=cfg.eps, min_8bit_size=0, **kw)
    raise ConfigError(f"train.optimizer = {cfg.optimizer!r} is not available in this build; use \"adamw\" "
                      f"or one of {sorted(_BNB)} (bitsandbytes; \"lion\" keeps 32-bit states)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps)
