"""A training run, top to bottom: prepare the data, build the model, resume, loop, export.

    prepared = prepare(cfg)        # discover -> buckets -> caches (latents, text, validation prompts)
    train(cfg, prepared)           # Run: setup -> resume -> loop -> finish

The model comes from ``vidtune.build`` (quantize -> adapter -> offload -> checkpointing ->
compile), the same path the planner and the benchmarks measure. Randomness comes from named
generators, all saved in checkpoints so a resumed run continues bit for bit: ``flow`` (noise and
timesteps, CPU), ``tread`` (token routing, on the device), the loader's (data order and caption
dropout) and torch's global RNG (LoRA init and dropout). Validation samples from its own seeded
generator, so it never shifts any of them.

A resume takes the state from the checkpoint (weights, optimizer moments, RNGs, data position) and
the hyperparameters from the config (``optim.RESUMED_FROM_CONFIG``), logging each that changed.
A broken state is never saved: a step with a non-finite loss or gradient (or a damaged cache
entry) never reaches the weights, a checkpoint falls due only after a good step, and weights
that are non-finite or whose largest |w| grew past ``DIVERGED_GROWTH`` x since the start are
neither checkpointed nor exported.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.export import export_adapter_files, trigger_words
from ..build import adapter_master_weights, build_from_config, expert_boundary, model_inputs
from ..config import Config, ConfigError
from ..data import CachedLoader, PreparedData
from ..data.cache import CacheEntryError
from ..distributed import (Parallel, gathered, load_optimizer_state, load_sharded, load_weights, model_state,
                           no_sync, optimizer_state, save_sharded, weights_peak, whole_sequence)
from ..models import family, save_pretrained
from ..runtime import DTYPES, resolve_device, seed_for
from ..sample import load_scheduler_config
from .checkpoint import SHARDED, resume_checkpoint, save_checkpoint
from .ema import Ema
from ..measure.mfu import mfu, peak_flops
from ..planner import Shape, step_model_flops
from .evaluate import eval_series, eval_trend
from .flow import expert_sigma_range, flow_loss, sample_sigmas
from .forward import supports, training_forward
from .hub import push
from .log import StepLog, loss_values, memory_bytes, read_losses, write_plot, write_plots, write_summary
from .optim import (RESUMED_FROM_CONFIG, build_optimizer, build_scheduler, clip_gradients, optimizer_hparams,
                    trains_in_bf16)

# Largest |w| of the trained weights past this multiple of its value at the start: diverged.
DIVERGED_GROWTH = 1e4


class TrainingStopped(RuntimeError):
    """The run stopped on a condition the user must look at (message says which and what to do)."""


def prepare(cfg: Config, log=print, par: Parallel | None = None) -> PreparedData:
    """Discover the datasets and fill the caches (each component gets its own section). The
    validation prompts are encoded with the captions, while the text encoder is loaded anyway.
    Under torchrun the ranks share the encoding (``par``). Evaluation samples (``[eval]``) are held
    out of what the loader draws; CREPA's encoder features are cached beside the latents."""
    from ..data import Encoders, prepare_data
    from ..data.features import FeatureEncoder, NoVaeEncoders, cache_features
    from .evaluate import hold_out
    from .validate import validation_texts

    t, ev, v = cfg.train, cfg.eval, cfg.validation
    held_id = ev.dataset if ev.every > 0 else None
    device = par.device if par is not None else resolve_device(t.device)
    kind = NoVaeEncoders if cfg.crepa.enabled and cfg.crepa.drop_vae_encoder else Encoders
    encoders = kind(cfg.model, device, cfg.memory.offload_during_startup)
    inputs = model_inputs(cfg.model)
    val = None
    if v.every > 0:
        w, h = (int(x) for x in v.resolution.lower().split("x"))
        side = getattr(inputs, "side_multiple", 16)  # VAE stride x patch: 32 for the Wan 2.2 VAE
        if w % side or h % side:
            raise ConfigError(f"validation.resolution = {v.resolution!r}: this model needs sides in multiples of "
                              f"{side}; use e.g. \"{max(side, w // side * side)}x{max(side, h // side * side)}\"")
        if v.dataset:  # image-to-video validation: first frames from an image dataset
            val = (next(d for d in cfg.dataset if d.id == v.dataset), w, h, v.num_frames)
    prepared = prepare_data(
        [d for d in cfg.datasets if d.id != held_id], cfg.cache, cfg.model,
        batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        encoders=encoders, log=log, share=par, release_encoders=held_id is None,
        extra_texts=validation_texts(cfg.validation) if cfg.validation.every > 0 else (),
        negative_texts=[cfg.validation.negative_prompt] if cfg.validation.every > 0 else (),
        inputs=inputs, validation=val,
    )
    if held_id:
        log(f"eval.dataset {held_id!r}: cached for the evaluation loss, never trained on")
        held = prepare_data([d for d in cfg.datasets if d.id == held_id], cfg.cache, cfg.model, encoders=encoders,
                            log=log)
        prepared.held_out = held.entries
    elif ev.every > 0:
        prepared = hold_out(prepared, ev, t.batch_size, t.gradient_accumulation_steps)
        log(f"eval.split_fraction {ev.split_fraction}: {len(prepared.held_out)} file(s) held out for the "
            f"evaluation loss, never trained on")
    if cfg.crepa.enabled:
        prepared = cache_features(prepared, cfg.datasets, cfg.cache, cfg.model,
                                  FeatureEncoder(cfg.crepa, resolve_device(t.device), cfg.model.revision), log)
    return prepared


def train(cfg: Config, prepared: PreparedData, log=print, par: Parallel | None = None) -> int:
    """Train; returns 0 when done, 128 + signal number when stopped by SIGTERM/SIGINT (after a
    checkpoint). Raises TrainingStopped after ``max_consecutive_nonfinite`` bad steps in a row.
    ``par``: this rank's place in a torchrun launch (rank 0 logs, checkpoints and exports)."""
    if cfg.model.experts == "both":
        if par is not None:
            raise ConfigError("model.experts = \"both\" does not run under torchrun yet: train each expert in "
                              "a run of its own (model.experts = \"high\", then \"low\"), or launch one process")
        from .experts import ExpertsRun

        run = ExpertsRun(cfg, prepared, log)
    else:
        run = Run(cfg, prepared, log, par)
    run.resume()
    rc = run.loop()
    if rc:
        return rc
    run.finish()
    return 0


def training_model(cfg: Config, device, log=print, par: Parallel | None = None):
    """The model a run trains: ``vidtune.build`` from the run config, weights from the checkpoint."""
    return build_from_config(cfg, device, log=log, parallel=par)


class _StopFlag:
    """SIGTERM / Ctrl-C set a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _quiet(*args) -> None:
    """The log of a rank other than 0 (rank 0 speaks for the run)."""


class _NoLog:
    """The step log of a rank other than 0: rank 0 writes the run's logs."""

    def step(self, *args) -> None: ...
    def images(self, *args) -> None: ...
    def scalars(self, *args) -> None: ...
    def preview(self, *args) -> None: ...
    def write(self, text: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    skipped: bool
    reason: str = ""  # why a skipped step was skipped
    shapes: tuple = ()  # latent (frames, height, width) of each micro-batch: the step's model FLOPs
    extra: dict = field(default_factory=dict)  # more scalars of the step (CREPA's)


class Run:
    """One training run's state: the model and what trains it, the RNGs, the counters."""

    def __init__(self, cfg: Config, prepared: PreparedData, log=print, par: Parallel | None = None):
        t = cfg.train
        self.par, self.main = par, par is None or par.is_main
        # FSDP2 full fine-tunes checkpoint in shards (no rank holds the whole state); LoRA states
        # are small, gathered to rank 0's usual files.
        self.sharded_checkpoints = par is not None and par.shards_model and cfg.adapter.type == "full"
        if not self.main:
            log = _quiet
        self.cfg, self.prepared, self.log = cfg, prepared, log
        self.run_dir = Path(t.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device = par.device if par is not None else resolve_device(t.device)
        self.dtype = DTYPES[cfg.model.dtype]
        self.autocast = DTYPES.get(t.mixed_precision) if self.device.type == "cuda" else None
        if self.device.type == "cpu" and t.mixed_precision != "no":
            log(f"train.mixed_precision = {t.mixed_precision!r} is ignored on CPU (no fast bf16 matmul): "
                f"computing in the weights' dtype {cfg.model.dtype}")

        built = training_model(cfg, self.device, log, par)
        self.model = built.model
        self.step_model = built.step_model  # the DDP wrapper, or the model (FSDP2 shards it in place)
        self.trainable = built.trainable
        self.routes = cfg.tread.resolve(len(self.model.blocks))
        self.forward = training_forward(cfg.model.family)
        self.crepa = self.rollout = None
        if par is not None and (cfg.crepa.enabled or cfg.rollout.max_step_offset > 0):
            raise ConfigError("crepa.enabled / rollout.max_step_offset > 0 do not run under torchrun yet (CREPA's "
                              "head is outside the data-parallel model, rollouts are untested with sharding); "
                              "set crepa.enabled = false and rollout.max_step_offset = 0, or launch one process")
        if cfg.rollout.max_step_offset > 0:
            from .rollout import Rollout

            if not supports(self.forward, "x_t"):
                raise ConfigError(f"rollout.max_step_offset > 0: the {cfg.model.family} training forward does not "
                                  f"take x_t yet; set rollout.max_step_offset = 0 for this family")
            self.rollout = Rollout(cfg.rollout, t.seed)
        if cfg.crepa.enabled:
            from .crepa import Crepa, encoder_width

            if not supports(self.forward, "capture_hidden"):
                raise ConfigError(f"crepa.enabled = true: the {cfg.model.family} training forward does not take "
                                  f"capture_hidden yet; set crepa.enabled = false for this family")
            self.crepa = Crepa(cfg.crepa, self.model, encoder_width(cfg.crepa.encoder, cfg.model.revision),
                               self.device, t.seed)
            self.trainable.update(self.crepa.named_parameters())  # trained and checkpointed, not exported
        # A two-expert checkpoint: each expert trains only on the noise levels it denoises.
        self.boundary = expert_boundary(cfg.model, log) if cfg.model.experts else None
        self.sigma_range = None
        if cfg.model.experts in ("high", "low"):
            self.sigma_range = expert_sigma_range(cfg.model.experts, self.boundary)
            log(f"experts: training the {cfg.model.experts}-noise expert on noise levels "
                f"[{self.sigma_range[0]:g}, {self.sigma_range[1]:g}) (boundary {self.boundary:g})")
        n_all = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trainable.values())
        log(f"model: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trained ({cfg.adapter.type}) on "
            f"{self.device}" + (f", {built.compiled} blocks compiled" if built.compiled else ""))
        if trains_in_bf16(t) and cfg.adapter.type == "full" and cfg.model.dtype != "bf16":
            log(f"train.optimizer = \"adamw_bf16\" with model.dtype = {cfg.model.dtype!r}: weights stay "
                f"{cfg.model.dtype}, so Kahan summation is off (it applies to bf16 weights)")

        self.optimizer = build_optimizer(self.trainable.values(), t, self.device, log,
                                         master_weights=adapter_master_weights(cfg))
        self.scheduler = build_scheduler(self.optimizer, t)
        self.ema = Ema(self.trainable.values(), cfg.ema) if cfg.ema.enabled else None
        self.validator = None
        if cfg.validation.every > 0 and self.main:
            from .validate import Validator

            self.validator = Validator(cfg, prepared, self.device, self.run_dir, log)
        fam = family(cfg.model.family)
        dp, dp_rank = (par.dp, par.dp_rank) if par is not None else (1, 0)
        self.loader = CachedLoader(prepared, t.batch_size, seed=t.seed, caption_dropout=t.caption_dropout,
                                   gradient_accumulation_steps=t.gradient_accumulation_steps,
                                   text_max_length=fam.TEXT_LEN, rank=dp_rank, world_size=dp)
        if par is not None:
            log(f"{par.world} ranks: {dp} data-parallel ({cfg.parallel.data}) x {par.sp} sequence-parallel; global "
                f"batch {t.batch_size * dp * t.gradient_accumulation_steps} = {t.batch_size} per rank x {dp} x "
                f"{t.gradient_accumulation_steps} accumulation steps")
        # A family with its own training schedule (Sana Video's canonical one) replaces timestep_sampling.
        self.family_sigmas = (fam.sigma_sampler(t, load_scheduler_config(cfg.model.resolved_path()), log)
                              if hasattr(fam, "sigma_sampler") else None)
        self.evaluator = None
        if cfg.eval.every > 0:
            if par is not None and (par.shards_model or par.sp > 1):
                raise ConfigError("eval.every > 0 runs on rank 0 alone, which needs the whole model: use "
                                  "parallel.data = \"ddp\" with parallel.sequence = 1, or eval.every = 0")
            if self.main:
                from .evaluate import Evaluator

                self.evaluator = Evaluator(cfg.eval, prepared, self.forward, self.device, self.dtype, t.batch_size,
                                           self.run_dir)
        # MFU: model FLOPs per latent shape (the planner's counted step) over the device's peak.
        compute = self.autocast or self.dtype
        self.peak_flops = peak_flops(self.device, torch.empty((), dtype=compute).element_size())
        self._flops: dict[tuple, int] = {}
        self.flow_gen = torch.Generator("cpu").manual_seed(seed_for(t.seed, "flow"))
        self.tread_gen = torch.Generator(self.device).manual_seed(seed_for(t.seed, "tread"))
        self.step = self.skipped = self.consecutive = 0
        self.start_max_abs = self.max_abs()  # for the divergence check; a resume restores the first run's
        self.seconds = {"caching": prepared.seconds, "training": 0.0, "validation": 0.0, "checkpointing": 0.0}
        if cfg.eval.every > 0:
            self.seconds["evaluation"] = 0.0
        self.logger: StepLog | None = None
        self.last_checkpoint: Path | None = None
        self.last_batch = None  # stands in for a damaged one under torchrun (every rank must step)

    # -- resume: weights, optimizer moments, every RNG and the data position; settings from the config
    def resume(self) -> None:
        t = self.cfg.train
        found = resume_checkpoint(self.ckpt_root, t.resume, self.log) if t.resume else None
        if found is None:
            if t.resume and t.resume != "latest":
                raise ConfigError(f"train.resume = {t.resume!r}: nothing to resume")
            return
        ckpt, weights, state, meta = found
        names = set(meta.get("tensors", [])) if weights is None else set(weights)
        if meta.get("adapter") != self.cfg.adapter.type or names != set(self.trainable):
            raise ConfigError(f"train.resume: {ckpt} holds a {meta.get('adapter')} run with "
                              f"{len(names)} tensors; this config trains {self.cfg.adapter.type} with "
                              f"{len(self.trainable)}: resume with the config it was saved with")
        saved = meta.get("hparams", {})
        if saved.get("optimizer", t.optimizer) != t.optimizer:
            raise ConfigError(f"train.optimizer = {t.optimizer!r}: {ckpt} holds the state of {saved['optimizer']!r}; "
                              f"resume with train.optimizer = {saved['optimizer']!r}")
        if weights is None:  # FSDP2's shards, resharded to this world size
            load_sharded(ckpt / SHARDED, self.model, self.optimizer, self.par)
        else:
            load_weights(self.trainable, weights)
            load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.par)
        self.loader.load_state_dict(state["loader"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"train.resume: {ckpt} was saved without EMA; resume with ema.enabled = false")
            self.ema.load_state_dict(state["ema"])
        self.seconds.update({k: v for k, v in state.get("seconds", {}).items() if k != "caching"})
        rng = state["rng"]
        self.flow_gen.set_state(rng["flow"])
        self.tread_gen.set_state(rng["tread"])
        if self.rollout is not None and "rollout" in rng:
            self.rollout.load_state_dict(rng["rollout"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.skipped, self.consecutive = meta["step"], state["skipped"], state["consecutive"]
        self.start_max_abs = state.get("start_max_abs", self.start_max_abs)
        self.last_checkpoint = ckpt
        # The config's hyperparameters, not the checkpoint's: optimizer settings, then the schedule
        # rebuilt at this step (peak, warmup, shape and length as configured now).
        for key, value in hparams(t).items():
            if key in saved and saved[key] != value:
                self.log(f"resume: train.{key} {_show(value)} (checkpoint had {_show(saved[key])})")
        self.apply_hparams()
        self.log(f"resumed from {ckpt} at step {self.step}")

    def apply_hparams(self) -> None:
        """The config's optimizer settings, and the schedule rebuilt at the current step."""
        optimizer_hparams(self.optimizer, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, step=self.step)

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        t = self.cfg.train
        t0 = time.perf_counter()
        patch = self.model.config.patch_size
        loss_sum = torch.zeros((), device=self.device)
        crepa_sum = torch.zeros((), device=self.device)
        sim_sum = torch.zeros((), device=self.device)
        tokens = 0
        shapes = []
        reason = ""
        par = self.par
        for k in range(t.gradient_accumulation_steps):
            scale = 1.0
            try:
                batch = next(self.loader).to(self.device, self.dtype)
                self.last_batch = batch
            except CacheEntryError as exc:  # damaged on disk since setup: this step is skipped
                reason = str(exc)
                if par is None or self.last_batch is None:
                    continue
                # The other ranks' collectives wait for this one: step on the last good batch at weight 0.
                batch, scale = self.last_batch, 0.0
            # Noise, timesteps and routing are drawn per batch of the shared data order: the same on
            # any number of ranks, and the same on every rank of a sequence group.
            self.flow_gen.manual_seed(seed_for(t.seed, "flow", self.loader.index))
            self.tread_gen.manual_seed(seed_for(t.seed, "tread", self.loader.index))
            x0 = batch.latents
            b, _, f, h, w = x0.shape
            tokens += b * (f // patch[0]) * (h // patch[1]) * (w // patch[2])
            shapes.append((f, h, w))
            # Noise and timesteps come from the CPU generator: the same draws on any device.
            noise = torch.randn(x0.shape, generator=self.flow_gen).to(self.device, x0.dtype)
            sigma = self.draw_sigmas(b, (h // patch[1]) * (w // patch[2])).to(self.device)
            with no_sync(self.step_model, k == t.gradient_accumulation_steps - 1):
                with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
                    extra = {}  # only what is on: with both off this is the plain step, bit for bit
                    if self.rollout is not None:
                        x_t = self.rollout.input(self.forward, self.model, batch, noise, sigma)
                        if x_t is not None:
                            extra["x_t"] = x_t
                    if self.crepa is None:
                        pred, target, weight = self.forward(self.step_model, batch, noise, sigma, routes=self.routes,
                                                            generator=self.tread_gen, **extra)
                    else:
                        (pred, hidden), target, weight = self.forward(
                            self.step_model, batch, noise, sigma, routes=self.routes, generator=self.tread_gen,
                            capture_hidden=(self.crepa.block,), **extra)
                        reg, sim = self.crepa.loss(hidden[self.crepa.block], x0, batch.cond["crepa"])
                loss = flow_loss(pred, target, weight) * (scale / t.gradient_accumulation_steps)
                if self.crepa is None:
                    loss.backward()
                else:
                    reg = reg * (scale / t.gradient_accumulation_steps)
                    (loss + reg).backward()
                    crepa_sum += reg.detach()
                    sim_sum += sim / t.gradient_accumulation_steps
            loss_sum += loss.detach()
        if par is not None:  # the logged loss is the global batch's; a damaged batch anywhere skips the step
            both = torch.stack([loss_sum.float(), torch.tensor(float(bool(reason)), device=self.device)])
            par.data_mean_(both)
            loss_sum = both[0]
            if both[1] > 0 and not reason:
                reason = "a damaged cache entry on another rank"
        grad_norm = clip_gradients(list(self.trainable.values()), t)
        # Host sync (the one per step): the loss and norm decide whether this step is applied.
        loss_val, norm_val = (loss_sum.item(), float(grad_norm)) if not reason else (math.nan, math.nan)
        scalars = {}
        if self.crepa is not None and not reason:
            scalars = {"train/crepa_loss": crepa_sum.item(), "train/crepa_similarity": sim_sum.item()}
            loss_val = loss_val if math.isfinite(scalars["train/crepa_loss"]) else math.nan
        if not reason and not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            reason = (f"non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'} (loss {loss_val}, "
                      f"grad norm {norm_val})")
        bad = bool(reason)
        if bad:
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
        else:
            self.optimizer.step()
            self.consecutive = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None and not bad:
            self.ema.maybe_update(self.step)
        return StepResult(loss_val, norm_val, tokens, time.perf_counter() - t0, bad, reason, tuple(shapes), scalars)

    def step_flops(self, shapes) -> int | None:
        """Model FLOPs of a step whose micro-batches had these latent shapes (None: not countable)."""
        try:
            for shape in shapes:
                if shape not in self._flops:
                    with torch.random.fork_rng(devices=[]):  # counting draws nothing from the run's RNG
                        self._flops[shape] = step_model_flops(self.cfg, self.model.config, Shape.of_latent(*shape))
            return sum(self._flops[s] for s in shapes)
        except Exception as exc:  # a metric never stops a run
            self.log(f"warning: no MFU for this run: counting the step's FLOPs failed ({type(exc).__name__}: {exc})")
            self.peak_flops = None
            return None

    def perf(self, r: StepResult) -> dict:
        """The step's model FLOPs and MFU (``measure.mfu.mfu``, the benchmarks' definition)."""
        if self.peak_flops is None or r.skipped:
            return {}
        flops = self.step_flops(r.shapes)
        return {} if flops is None else {"perf/flops": flops, "perf/mfu": mfu(flops, r.seconds, self.peak_flops)}

    def draw_sigmas(self, batch: int, tokens_per_frame: int) -> torch.Tensor:
        """Noise levels of one micro-batch, from the flow generator (an expert's own range when a
        two-expert checkpoint trains one expert; a family's own schedule, e.g. Sana Video's)."""
        if self.family_sigmas is not None:
            return self.family_sigmas(batch, self.flow_gen)
        t = self.cfg.train
        return sample_sigmas(batch, t.timestep_sampling, self.flow_gen, logit_mean=t.logit_mean,
                             logit_std=t.logit_std, shift=t.flow_shift, tokens_per_frame=tokens_per_frame,
                             sigma_range=self.sigma_range)

    # -- the loop -------------------------------------------------------------------------------------
    def loop(self) -> int:
        """Steps until ``max_train_steps``; returns 0, or 128 + signal number when stopped by one."""
        t = self.cfg.train
        self.logger = (StepLog(self.cfg.logging, self.run_dir, self.step, t.max_train_steps, self.device)
                       if self.main else _NoLog())
        every = self.cfg.validation.every  # every rank knows when rank 0 validates (they wait for it)
        eval_every = self.cfg.eval.every  # and when it evaluates
        if self.evaluator is not None:
            self.evaluator.open(self.step)
        saved_at = self.step
        due = False  # a periodic checkpoint waits for a good step
        try:
            with _StopFlag() as stop:
                if every > 0 and self.step == 0 and self.cfg.validation.baseline:
                    self.validate()
                if eval_every > 0 and self.step == 0:
                    self.evaluate()
                while self.step < t.max_train_steps:
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    with self.par.guard(f"step {self.step + 1}") if self.par else contextlib.nullcontext():
                        r = self.train_step()
                    self.seconds["training"] += r.seconds
                    self.logger.step(self.step, r.loss, lr, r.grad_norm, r.seconds, r.tokens,
                                     memory_bytes(self.device), r.skipped,
                                     {**r.extra, **self.perf(r)} if self.main else None)
                    if r.skipped:
                        self.logger.write(f"step {self.step}: {r.reason}; step skipped ({self.consecutive} in a "
                                          f"row, {self.skipped} in total)")
                    if t.max_consecutive_nonfinite and self.consecutive >= t.max_consecutive_nonfinite:
                        raise TrainingStopped(
                            f"stopped at step {self.step}: {self.consecutive} non-finite steps in a row "
                            f"(train.max_consecutive_nonfinite = {t.max_consecutive_nonfinite}). Lower "
                            f"train.learning_rate (now {t.learning_rate}; a resume takes the new value), keep "
                            f"train.max_grad_norm > 0, check the data (a corrupt cache entry: delete "
                            f"{self.cfg.cache.dir}), then resume from the last checkpoint "
                            f"({self.last_checkpoint or 'none yet'}) with train.resume = \"latest\"")
                    if every > 0 and self.step % every == 0:
                        self.validate()
                    if eval_every > 0 and self.step % eval_every == 0:
                        self.evaluate()
                    due = due or bool(t.checkpoint_every and self.step % t.checkpoint_every == 0)
                    if due and not r.skipped:
                        self.checkpoint()
                        saved_at, due = self.step, False
                    if stop.signum:
                        name = signal.Signals(stop.signum).name
                        if saved_at != self.step and not r.skipped:
                            self.checkpoint()
                            saved_at = self.step
                        self.logger.write(f"{name}: stopped at step {self.step}; resume from "
                                          f"{self.last_checkpoint or 'the start'} with train.resume = \"latest\"")
                        return 128 + stop.signum
                if saved_at != self.step and not r.skipped:
                    self.checkpoint()
        finally:
            self.logger.close()
        return 0

    def validate(self) -> None:
        t1 = time.perf_counter()
        if self.validator is not None:  # rank 0 samples the whole sequence alone; the others wait
            with whole_sequence(self.model):
                outputs = self.validator.run(self.model, self.step, self.ema, on_preview=self.logger.preview)
            self.logger.images(self.step, outputs)
        self.wait("validation")
        self.seconds["validation"] += time.perf_counter() - t1

    def evaluate(self) -> None:
        """The evaluation loss (rank 0 under DDP; the others wait)."""
        t1 = time.perf_counter()
        if self.evaluator is not None:
            row = self.evaluator.run(self.model, self.step, self.ema)
            self.logger.scalars(self.step, {f"eval/{k}": v for k, v in row.items() if k != "step"})
            ema = f" (EMA weights {row['ema_loss']:.4f})" if "ema_loss" in row else ""
            self.logger.write(f"eval: step {self.step} loss {row['loss']:.4f}{ema}")
        self.wait("evaluation")
        self.seconds["evaluation"] = self.seconds.get("evaluation", 0.0) + time.perf_counter() - t1

    def wait(self, what: str) -> None:
        if self.par is not None:
            self.par.wait(what)

    def plots(self) -> None:
        write_plots(self.run_dir)
        if self.evaluator is not None:
            write_plot(self.run_dir / "plots" / "eval_loss.png", eval_series(self.run_dir),
                       f"{self.run_dir.name}: evaluation loss (held-out samples, fixed timesteps and noise)",
                       "eval loss")

    def checkpoint(self) -> None:
        """Save the run's state, unless the weights are broken (then say so and keep the last one)."""
        problem = self.weights_problem()
        if problem:
            self.logger.write(f"warning: no checkpoint at step {self.step}: {problem}; the last one stays "
                              f"{self.last_checkpoint or '(none)'}")
            return
        t1 = time.perf_counter()
        if self.sharded_checkpoints:  # every rank writes its own shards into rank 0's temp directory
            def shards(tmp: Path | None) -> None:
                save_sharded(self.model, self.optimizer, tmp / SHARDED if tmp is not None else None, self.par)

            if self.main:
                self._save(None, None, t1, shards=shards)
            else:
                shards(None)
            self.wait("the checkpoint write")
            return
        sharded = self.par is not None and self.par.shards_model
        with gathered(self.model, self.par):  # whole weights on every rank under FSDP2, copied out by rank 0
            if sharded:
                weights = {n: p.detach().to("cpu", copy=True)
                           for n, p in self.model.named_parameters() if p.requires_grad and self.main}
            else:  # every trained tensor: both experts' of a two-expert run, CREPA's head
                weights = {n: p.detach() for n, p in self.trainable.items()} if self.main else {}
        optimizer = optimizer_state(self.model, self.optimizer, self.par)
        if self.main:
            self._save(weights, optimizer, t1)
        self.wait("the checkpoint write")

    def _save(self, weights: dict | None, optimizer: dict | None, t1: float, shards=None) -> None:
        rng = {"flow": self.flow_gen.get_state(), "tread": self.tread_gen.get_state(), "torch": torch.get_rng_state()}
        if self.rollout is not None:
            rng["rollout"] = self.rollout.state_dict()
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"loader": self.loader.state_dict(),
                 "skipped": self.skipped, "consecutive": self.consecutive, "start_max_abs": self.start_max_abs,
                 "seconds": dict(self.seconds), "rng": rng}
        if optimizer is not None:  # a sharded checkpoint keeps the optimizer's shards beside the weights'
            state["optimizer"] = optimizer
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        meta = {"adapter": self.cfg.adapter.type, "seed": self.cfg.train.seed,
                "hparams": {"optimizer": self.cfg.train.optimizer, **hparams(self.cfg.train)}}
        if shards is not None:
            meta["tensors"] = sorted(self.trainable)
        path = save_checkpoint(self.ckpt_root, self.step, weights, state, meta, keep=self.cfg.train.keep_checkpoints,
                               shards=shards)
        self.last_checkpoint = path
        self.plots()
        self.seconds["checkpointing"] += time.perf_counter() - t1
        write_summary(self.run_dir, self.summary())
        self.logger.write(f"checkpoint: {path}")
        if self.cfg.hub.repo_id and self.cfg.hub.push_every_checkpoint:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                files = export_final(self.cfg, self.model, Path(tmp), self.step, self.logger.write)
                push(self.cfg, self.run_dir, files, self.step, trigger_words(self.cfg), self.logger.write,
                     prefix=f"checkpoints/step-{self.step}/", root=Path(tmp))

    # -- health of the trained weights: what may be checkpointed and exported --------------------------
    @torch.no_grad()
    def max_abs(self) -> float:
        """Largest |w| over the trained weights (nan/inf when any is non-finite). One host sync."""
        return float(weights_peak(self.trainable.values(), self.par))

    def weights_problem(self) -> str:
        """Why the trained weights must not be saved ("" when they are healthy)."""
        peak = self.max_abs()
        if not math.isfinite(peak):
            return "the trained weights hold non-finite values"
        if self.start_max_abs > 0 and peak > DIVERGED_GROWTH * self.start_max_abs:
            return (f"the largest trained |w| grew {peak / self.start_max_abs:.3g}x since the start "
                    f"({self.start_max_abs:.3g} -> {peak:.3g}), past the {DIVERGED_GROWTH:.0e}x that means diverged")
        return ""

    def summary(self) -> dict:
        t = self.cfg.train
        dp = self.par.dp if self.par is not None else 1
        out = {"steps": self.step, "samples_seen": self.step * t.batch_size * dp * t.gradient_accumulation_steps,
               "skipped_files": len(self.prepared.skips.entries), "skipped_steps": self.skipped,
               "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        mfus = [r["mfu"] for r in read_losses(self.run_dir) if r.get("mfu") is not None]
        if mfus:
            out["mfu"] = {"mean": sum(mfus) / len(mfus), "peak_flops": self.peak_flops}
        if self.skipped:
            out["warning"] = self.skipped_warning()
        return out

    def skipped_warning(self) -> str:
        return (f"{self.skipped} of {self.step} steps were skipped (non-finite loss or gradient, or a damaged "
                f"cache entry) and did not train; \"skipped\": true in {self.run_dir / 'losses.jsonl'} marks them")

    # -- the run's end: exports, plots, summary ---------------------------------------------------------
    def finish(self) -> list[Path]:
        problem = self.weights_problem()
        files = []
        if not problem:
            # Rank 0 exports the whole weights; the others wait. A full model under FSDP2 is
            # gathered as a state dict, an adapter by unsharding the blocks.
            full = self.cfg.adapter.type == "full"
            whole = model_state(self.model, self.par) if full else None
            with contextlib.nullcontext() if full else gathered(self.model, self.par):
                if self.main:
                    files = self.exports(whole)
            self.wait("the export")
        if not self.main:
            return files
        self.plots()
        write_summary(self.run_dir, self.summary())
        losses = [x for x in loss_values(self.run_dir) if math.isfinite(x)]
        if len(losses) >= 20:
            first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
            self.log(f"loss: mean of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
        trend = eval_trend(self.run_dir) if self.evaluator is not None else ""
        if trend:
            self.log(trend)
        if self.skipped:
            self.log(f"warning: {self.skipped_warning()}")
        if problem:
            then = (f"resume from the last healthy checkpoint ({self.last_checkpoint}) with train.resume = "
                    f"\"latest\"" if self.last_checkpoint else "train again from the start")
            raise TrainingStopped(f"not exporting the weights of step {self.step}: {problem}. Lower "
                                  f"train.learning_rate (now {self.cfg.train.learning_rate}; a resume takes the new "
                                  f"value) and {then}")
        self.log(f"done: {self.step} steps ({self.skipped} skipped); saved {', '.join(str(f) for f in files)}")
        if self.cfg.hub.repo_id:
            push(self.cfg, self.run_dir, files, self.step, trigger_words(self.cfg), self.log)
        return files

    def exports(self, state_dict: dict | None = None) -> list[Path]:
        """The run's products: the trained weights (and the EMA's); ``state_dict``: the whole
        weights gathered from FSDP2 shards (None: the model's own)."""
        files = export_final(self.cfg, self.model, self.run_dir, self.step, self.log, state_dict=state_dict)
        if self.ema is not None:
            with self.ema.swapped_in():
                files += export_final(self.cfg, self.model, self.run_dir / "ema", self.step, self.log)
        return files


def hparams(t) -> dict:
    """The train settings a resume takes from the config (JSON values, as stored in meta.json)."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v
            for k, v in ((k, getattr(t, k)) for k in RESUMED_FROM_CONFIG)}


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def export_final(cfg: Config, model, run_dir: Path, step: int, log=print, expert: str | None = None,
                 state_dict: dict | None = None) -> list[Path]:
    """The run's product: the adapter file(s), or the full transformer in the diffusers layout
    (``state_dict``: its weights gathered from FSDP2 shards). ``expert`` (a run training both
    experts): files named for it (``*_high_noise`` / ``*_low_noise``; a full fine-tune's low-noise
    expert is ``transformer_2/``, as in the pipeline)."""
    if cfg.adapter.type == "full":
        return [save_pretrained(model, run_dir / ("transformer_2" if expert == "low" else "transformer"), state_dict)]
    return export_adapter_files(cfg, model, run_dir, step, log, expert=expert)
