"""Optimizers (torch, torch-optimi, bitsandbytes) and LR schedules (diffusers' get_scheduler).

- ``adamw``: torch AdamW (fused/foreach as torch picks).
- ``adamw_bf16``: torch-optimi AdamW with Kahan summation. The trained weights are kept in bf16
  (``trains_in_bf16``) and optimi's compensation buffer carries the low bits each update would
  lose, so bf16 weights and states train like fp32 ones at half the memory.
- ``lion``: torch-optimi Lion (32-bit state; Kahan summation too when the weights are bf16).
- ``adamw_8bit`` / ``lion_8bit`` and their ``paged_`` variants: bitsandbytes blockwise 8-bit
  states. Paging needs CUDA unified memory; elsewhere bitsandbytes keeps the states in ordinary
  memory (said once in the log).

bf16 adapter weights (``adapter.dtype``): optimi's optimizers keep the bits a bf16 update would
round away with Kahan summation (2 bytes per weight); torch AdamW and bitsandbytes have no such
thing, so they step fp32 master copies (``MasterWeights``, 4 bytes per weight) that are rounded
into the bf16 weights after each step. Adapters are ~0.1% of a model's weights, so either costs
megabytes, while the bf16 weights themselves save the fp32 activation copies peft makes for fp32
adapters on a bf16 model.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..config import ConfigError, TrainConfig

_BNB = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
        "lion_8bit": "Lion8bit", "paged_lion_8bit": "PagedLion8bit"}
_OPTIMI = {"adamw_bf16": "AdamW", "lion": "Lion"}  # build.KAHAN_OPTIMIZERS
OPTIMIZERS = ("adamw", *_OPTIMI, *_BNB)


def trains_in_bf16(cfg: TrainConfig) -> bool:
    """Whether the trained weights are stored in bf16 (else LoRA weights are fp32)."""
    return cfg.optimizer == "adamw_bf16"


class MasterWeights(torch.optim.Optimizer):
    """``inner`` stepping fp32 copies of low-precision parameters: ``step`` hands it the gradients
    in fp32, then rounds the updated copies into the parameters. The copies are part of the state
    dict, so a resumed run continues from the exact fp32 values. Shares the inner optimizer's
    ``param_groups``, so LR schedulers drive it as usual."""

    def __init__(self, params, make):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.inner = make(self.masters)
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = OrderedDict(), OrderedDict()

    # The inner optimizer's, read through (its load_state_dict replaces them).
    param_groups = property(lambda self: self.inner.param_groups)
    state = property(lambda self: self.inner.state)
    defaults = property(lambda self: self.inner.defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad = None

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for m, saved in zip(self.masters, state["masters"]):
                m.copy_(saved)


def build_optimizer(params, cfg: TrainConfig, device: torch.device | None = None, log=print, *,
                    master_weights: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params``; clear errors for the ones not available.
    ``master_weights``: it steps fp32 copies of the params (``vidtune.build.adapter_master_weights``
    says when: bf16 adapters with an optimizer that has no Kahan summation)."""
    params = list(params)
    if master_weights:
        return MasterWeights(params, lambda ps: build_optimizer(ps, cfg, device, log))
    kw = dict(lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, eps=cfg.eps, **kw)
    if cfg.optimizer in _OPTIMI:
        try:
            import optimi
        except ImportError:
            raise ConfigError(f"train.optimizer = {cfg.optimizer!r} needs torch-optimi: pip install torch-optimi "
                              f"(or set train.optimizer = \"adamw\")") from None
        if cfg.optimizer == "lion":
            return optimi.Lion(params, **kw)
        # kahan_sum=None: optimi turns it on exactly for the low-precision (bf16) parameters.
        return optimi.AdamW(params, eps=cfg.eps, kahan_sum=None, **kw)
    if cfg.optimizer in _BNB:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"train.optimizer = {cfg.optimizer!r} needs bitsandbytes: pip install bitsandbytes "
                              f"(or set train.optimizer = \"adamw\")") from None
        if cfg.optimizer.startswith("paged_") and (device is None or device.type != "cuda"):
            log(f"train.optimizer = {cfg.optimizer!r}: paging needs CUDA; on {device} bitsandbytes keeps the "
                f"8-bit states in ordinary memory (same numbers as the unpaged optimizer)")
        cls = getattr(bnb.optim, _BNB[cfg.optimizer])
        # min_8bit_size=0: small adapter tensors get 8-bit states too (bnb's default keeps < 4096 in fp32).
        if "lion" in cfg.optimizer:
            return cls(params, min_8bit_size=0, **kw)
        return cls(params, eps=cfg.eps, min_8bit_size=0, **kw)
    raise ConfigError(f"train.optimizer = {cfg.optimizer!r} is not available; use one of {list(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int = 0):
    """Warmup then constant / cosine / linear / polynomial (to 1e-7, power ``lr_power``) decay,
    positioned after ``step`` optimizer steps. A resumed run builds it anew from its config (peak,
    schedule, warmup, length): the checkpoint's scheduler never overrides what the user set."""
    from diffusers.optimization import get_scheduler

    if step:
        for group in optimizer.param_groups:  # what LambdaLR scales when it starts past step 0
            group["initial_lr"] = cfg.learning_rate
    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    # last_epoch = step - 1: construction steps once, to last_epoch = step, the lr of step + 1.
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps, power=cfg.lr_power, last_epoch=step - 1)


# Train settings a resume takes from the config; each one that differs from the checkpoint's is logged.
RESUMED_FROM_CONFIG = ("learning_rate", "lr_scheduler", "lr_power", "lr_warmup_steps", "max_train_steps",
                       "max_grad_norm", "grad_clip_method", "weight_decay", "betas", "eps",
                       "max_consecutive_nonfinite")


def optimizer_hparams(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set the config's weight decay, betas and eps on every param group (after loading a
    checkpoint's optimizer state, which carries the old ones)."""
    for group in optimizer.param_groups:
        for key, value in (("weight_decay", cfg.weight_decay), ("betas", tuple(cfg.betas)), ("eps", cfg.eps)):
            if key in group:
                group[key] = value


def clip_gradients(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.Tensor:
    """Clip by global norm or by value (``max_grad_norm = 0``: no clipping); returns the total
    gradient norm before clipping, as a device tensor (no host sync here)."""
    if cfg.max_grad_norm > 0 and cfg.grad_clip_method == "norm":
        return torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_value_(params, cfg.max_grad_norm)
    return norm


def move_optimizer_state(optimizer: torch.optim.Optimizer, device) -> None:
    """Move an optimizer's per-parameter state tensors (and master weights) to ``device`` (an idle
    expert's state waits in host RAM). Step counters (0-dim) stay where the optimizer keeps them; bitsandbytes' paged
    optimizers page their states themselves and are left alone."""
    if getattr(optimizer, "is_paged", False):
        return
    for m in getattr(optimizer, "masters", ()):  # MasterWeights' fp32 copies (their state is keyed by them)
        if m.device != torch.device(device):
            m.data = m.data.to(device)
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.device != torch.device(device):
                state[k] = v.to(device)
