"""``model.experts = "both"``: the two experts of a Wan 2.2 A14B checkpoint trained in one run.

Which expert trains: each optimizer step draws one uniform number ``u`` from the flow generator
and the high-noise expert trains when ``u >= F(boundary)``, F being the configured timestep
distribution's CDF at the step's first micro-batch; the step's noise levels are then drawn from
that expert's range of the same distribution (truncated and renormalised). So every noise level
keeps the configured distribution and the expert that owns it (as WanPipeline switches) trains
on it; a step never mixes experts.

Each expert has its own adapter, optimizer state, EMA and LR schedule (both schedules follow the
global step, so warmup and decay end where the config says). The ``Run`` loop sees them through
small wrappers (``trainable`` with ``high.`` / ``low.`` prefixes, one ``optimizer``, one
``scheduler``, one ``ema``), so checkpoints hold both experts and resume bit for bit through the
same code as a single-expert run. Two adapter files come out, named for the expert.

Memory: only the active expert's weights are on the device. With block offload both experts'
frozen blocks wait in one streamer's host tier (RAM or disk) and take turns on its slot pool;
the idle expert's other weights, adapter, optimizer state and EMA wait in host RAM and move when
the expert changes. Without block offload the idle expert moves to host RAM whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build import adapter_master_weights, build_from_config, expert_config
from ..config import Config
from ..memory.offload import place_resident
from .ema import Ema
from .flow import draw_expert, expert_sigma_range
from .optim import build_optimizer, build_scheduler, move_optimizer_state, optimizer_hparams
from .trainer import Run, export_final

EXPERTS = ("high", "low")
CPU = torch.device("cpu")


@dataclass
class Expert:
    name: str
    model: torch.nn.Module
    trainable: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: Ema | None
    sigma_range: tuple[float, float]


class _PerExpert:
    """One part of both experts' training state (``attr``: optimizer, scheduler or ema), seen by
    the ``Run`` loop as one object; its state dict holds each expert's under its name."""

    attr = ""

    def __init__(self, run: "ExpertsRun"):
        self.run = run

    def each(self) -> dict:
        return {n: getattr(e, self.attr) for n, e in self.run.experts.items()}

    def state_dict(self):
        return {n: part.state_dict() for n, part in self.each().items()}

    def load_state_dict(self, state):
        for n, part in self.each().items():
            part.load_state_dict(state[n])


class _Optimizers(_PerExpert):
    attr = "optimizer"

    def step(self):
        self.run.active.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.each().values():
            opt.zero_grad(set_to_none=set_to_none)


class _Schedulers(_PerExpert):
    attr = "scheduler"

    def step(self):  # both follow the global step, also while an expert's optimizer has not stepped yet
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for sched in self.each().values():
                sched.step()

    def get_last_lr(self):
        return self.run.experts["high"].scheduler.get_last_lr()


class _Emas(_PerExpert):
    attr = "ema"

    def __init__(self, run: "ExpertsRun"):
        super().__init__(run)
        self.cfg = run.cfg.ema

    def maybe_update(self, step: int):
        self.run.active.ema.maybe_update(step)

    @contextlib.contextmanager
    def swapped_in(self):
        with contextlib.ExitStack() as stack:
            for ema in self.each().values():
                stack.enter_context(ema.swapped_in())
            yield


class ExpertsRun(Run):
    """A ``Run`` over both experts; the loop, checkpoints and resume are the base class's."""

    def __init__(self, cfg: Config, prepared, log=print):
        super().__init__(cfg, prepared, log)  # the high-noise expert (transformer/), the loader, the generators
        t = cfg.train
        first = Expert("high", self.model, self.trainable, self.optimizer, self.scheduler, self.ema,
                       expert_sigma_range("high", self.boundary))
        off = getattr(self.model, "_vidtune_group_offload", None)
        built = build_from_config(dataclasses.replace(cfg, model=expert_config(cfg.model, "low")), self.device,
                                  offload_share=off, log=log)
        low_opt = build_optimizer(built.trainable.values(), t, self.device, log,
                                  master_weights=adapter_master_weights(cfg))
        second = Expert("low", built.model, built.trainable, low_opt, build_scheduler(low_opt, t),
                        Ema(built.trainable.values(), cfg.ema) if cfg.ema.enabled else None,
                        expert_sigma_range("low", self.boundary))
        self.experts = {"high": first, "low": second}
        self.trainable = {f"{e.name}.{n}": p for e in self.experts.values() for n, p in e.trainable.items()}
        self.optimizer, self.scheduler = _Optimizers(self), _Schedulers(self)
        self.ema = _Emas(self) if cfg.ema.enabled else None
        self.start_max_abs = self.max_abs()  # over both experts' trained weights
        self.active = first
        self._park(second)
        self._choose = True
        log(f"experts: both in one run; the high-noise expert owns noise levels >= {self.boundary:g}, the "
            f"low-noise one the rest; the idle one waits in host RAM")

    # -- which expert trains --------------------------------------------------------------------
    def _park(self, e: Expert) -> None:
        place_resident(e.model, CPU)
        move_optimizer_state(e.optimizer, CPU)
        if e.ema is not None:
            e.ema.to(CPU)

    def _activate(self, name: str) -> None:
        e = self.experts[name]
        if e is self.active:
            return
        self._park(self.active)
        place_resident(e.model, self.device)
        move_optimizer_state(e.optimizer, self.device)
        if e.ema is not None:
            e.ema.to(self.device)
        self.active, self.model = e, e.model
        self.step_model = e.model  # one process (no torchrun): the step calls the model itself

    def draw_sigmas(self, batch: int, tokens_per_frame: int) -> torch.Tensor:
        t = self.cfg.train
        if self._choose:  # the step's first micro-batch picks the expert
            self._activate(draw_expert(self.flow_gen, self.boundary, t.timestep_sampling, logit_mean=t.logit_mean,
                                       logit_std=t.logit_std, shift=t.flow_shift, tokens_per_frame=tokens_per_frame))
            self._choose = False
        self.sigma_range = self.active.sigma_range
        return super().draw_sigmas(batch, tokens_per_frame)

    def apply_hparams(self) -> None:
        for e in self.experts.values():
            optimizer_hparams(e.optimizer, self.cfg.train)
            e.scheduler = build_scheduler(e.optimizer, self.cfg.train, step=self.step)

    def train_step(self):
        self._choose = True
        return super().train_step()

    # -- validation and exports: both experts ---------------------------------------------------
    def validate(self) -> None:
        """Sample with both experts, switching at the boundary like WanPipeline; their resident
        weights are on the device for it (the streamed blocks take turns on the slot pool)."""
        high, low = self.experts["high"], self.experts["low"]
        for e in (high, low):
            place_resident(e.model, self.device)
        self.validator.model_2 = low.model
        active, self.model = self.model, high.model
        try:
            super().validate()
        finally:
            self.model = active
            for e in (high, low):
                if e is not self.active:
                    place_resident(e.model, CPU)

    def exports(self, state_dict: dict | None = None) -> list[Path]:  # one process: nothing sharded
        files = []
        for e in self.experts.values():
            files += export_final(self.cfg, e.model, self.run_dir, self.step, self.log, expert=e.name)
            if e.ema is not None:
                with e.ema.swapped_in():
                    files += export_final(self.cfg, e.model, self.run_dir / "ema", self.step, self.log, expert=e.name)
        return files
