"""EMA of the trained weights: diffusers' ``EMAModel`` (decay warmup ``(1+n)/(10+n)`` capped at
``decay``, the schedule SimpleTuner uses), updated every ``update_interval`` optimizer steps,
its shadow weights with the model or in CPU RAM (``device = "cpu"``: the update copies the
weights to the host, a device->host sync every ``update_interval`` steps)."""
from __future__ import annotations

import contextlib

import torch

from ..config import EmaConfig


class Ema:
    def __init__(self, params, cfg: EmaConfig):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.cfg = cfg
        self.device = torch.device("cpu") if cfg.device == "cpu" else self.params[0].device
        # fp32 shadows: with bf16 weights a 0.001 step of an average would round away.
        self.ema = EMAModel([p.detach().to(self.device, torch.float32) for p in self.params], decay=cfg.decay,
                            foreach=True)

    def _on_ema_device(self) -> list[torch.Tensor]:
        if all(p.device == self.device and p.dtype == torch.float32 for p in self.params):
            return self.params
        # EMAModel averages only tensors that require grad (it copies the others).
        return [p.detach().to(self.device, torch.float32).requires_grad_(True) for p in self.params]

    @torch.no_grad()
    def maybe_update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based)."""
        if step % self.cfg.update_interval == 0:
            self.ema.step(self._on_ema_device())

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the duration of the block; the live ones after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def to(self, device) -> None:
        """Move the shadow weights with the model (``device = "same"``; CPU ones stay)."""
        if self.cfg.device == "same":
            self.device = torch.device(device)
            self.ema.to(self.device)

    def shadow(self) -> list[torch.Tensor]:
        return self.ema.shadow_params

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.ema.to(self.device, torch.float32)
