"""The training loop: cached batch -> flow matching -> forward -> loss -> backward -> clip -> step.

Setup applies the memory features as standalone functions in a fixed order (quantize -> LoRA ->
offload -> checkpointing), each with its own config section. The loop then reads straight down.
Randomness comes from named generators, all saved in checkpoints so a resumed run continues
bit for bit: ``flow`` (noise and timesteps, CPU), ``tread`` (token routing, on the device), the
loader's (data order and caption dropout) and torch's global RNG (LoRA init and dropout).
Validation samples from its own seeded generator, so it never shifts any of them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from pathlib import Path

import torch

from ..adapters import DIFFUSERS_FILE, WAN_FILE, apply_lora, export_lora, load_lora_into
from ..cli import resolve_device
from ..config import Config, ConfigError, ModelConfig
from ..data import CachedLoader, PreparedData
from ..fsutil import atomic_write_bytes
from ..memory.checkpointing import apply_activation_checkpointing
from ..memory.offload import apply_group_offload
from ..memory.quant import QuantConfig, apply_quantization
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .flow import flow_loss, noisy_input, sample_sigmas
from .ema import Ema
from .log import StepLog, loss_values, memory_bytes, write_plots, write_summary
from .optim import build_optimizer, build_scheduler, clip_gradients, trains_in_bf16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingStopped(RuntimeError):
    """The run stopped on a condition the user must look at (message says which and what to do)."""


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def load_transformer(m: ModelConfig):
    from ..models import from_pretrained

    sub = m.transformer_subfolder
    if sub is None and m.flavour.endswith("-2.2-low"):
        sub = "transformer_2"  # Wan 2.2 two-stage repos: transformer = high noise, transformer_2 = low
    return from_pretrained(m.transformer_path or m.resolved_path(), subfolder=sub or None,
                           torch_dtype=DTYPES[m.dtype], force_2_1_time_embedding=m.force_2_1_time_embedding)


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


def _trigger_words(cfg: Config) -> str:
    return ", ".join(sorted({d.caption_prefix.strip() for d in cfg.datasets if d.caption_prefix.strip()}))


def export_final(cfg: Config, model, run_dir: Path, step: int) -> list[Path]:
    """The run's product: the LoRA file(s), or the full transformer in the diffusers layout."""
    if cfg.adapter.type == "full":
        from safetensors.torch import save

        out = run_dir / "transformer"
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out / "diffusion_pytorch_model.safetensors", save(sd, metadata={"format": "pt"}))
        atomic_write_bytes(out / "config.json", json.dumps(model.config.to_dict(), indent=1).encode())
        return [out]
    meta = {"base_model": cfg.model.transformer_path or cfg.model.resolved_path(), "family": cfg.model.family,
            "flavour": cfg.model.flavour, "trigger_word": _trigger_words(cfg), "steps": step}
    fmt = cfg.adapter.export_format
    dtype = DTYPES[cfg.model.dtype]  # the LoRA is saved in the dtype the model trained in
    files = []
    if fmt in ("diffusers", "both"):
        files.append(export_lora(model, run_dir / DIFFUSERS_FILE, cfg.adapter, "diffusers", meta, dtype))
    if fmt in ("wan", "both"):
        files.append(export_lora(model, run_dir / WAN_FILE, cfg.adapter, "wan", meta, dtype))
    return files


def train(cfg: Config, prepared: PreparedData, log=print) -> int:
    """Train; returns 0 when done, 128 + signal number when stopped by SIGTERM/SIGINT (after a
    checkpoint). Raises TrainingStopped after ``max_consecutive_nonfinite`` bad steps in a row."""
    t, mem = cfg.train, cfg.memory
    run_dir = Path(t.output_dir)
    ckpt_root = run_dir / "checkpoints"
    device = resolve_device(t.device)
    autocast_dtype = DTYPES.get(t.mixed_precision) if device.type == "cuda" else None
    if device.type == "cpu" and t.mixed_precision != "no":
        log(f"train.mixed_precision = {t.mixed_precision!r} is ignored on CPU (no fast bf16 matmul): "
            f"computing in the weights' dtype {cfg.model.dtype}")

    # -- model and memory features, in order: quantize -> adapter -> offload -> checkpointing --
    torch.manual_seed(t.seed)  # LoRA init (and LoRA dropout) draw from the global RNG
    model = load_transformer(cfg.model)
    model.set_attention_backend(cfg.model.attention_backend)
    model.set_ff_chunk_size(mem.chunked_ff.chunk_size if mem.chunked_ff.enabled else None)
    apply_quantization(model, QuantConfig(cfg.model.base_precision, cfg.model.quantize_via), device)
    if cfg.adapter.type == "lora":
        params = apply_lora(model, cfg.adapter)
        # Adapter weights (and optimizer states) in fp32; in bf16 for adamw_bf16, whose Kahan
        # summation keeps the bits a bf16 update would round away.
        lora_dtype = torch.bfloat16 if trains_in_bf16(t) else torch.float32
        for p in params:
            p.data = p.data.to(lora_dtype)
        if cfg.adapter.init_from:
            n = load_lora_into(model, cfg.adapter.init_from, log=log)
            log(f"adapter: started from {cfg.adapter.init_from} ({n} modules)")
    elif cfg.adapter.type == "full":
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        raise ConfigError(f"adapter.type = {cfg.adapter.type!r} is not trainable in this build; use \"lora\" or \"full\"")
    if apply_group_offload(model, mem.offload, device, model_cpu_offload=mem.model_cpu_offload) is None:
        model.to(device)
    if mem.gradient_checkpointing:
        apply_activation_checkpointing(model.blocks, mem.gradient_checkpointing_every_n)
    model.train()
    routes = [{"selection_ratio": r, "start_layer": s, "end_layer": e}
              for r, s, e in cfg.tread.resolve(len(model.blocks))]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in trainable.values()) / 1e6:.3f}M trained ({cfg.adapter.type}) on {device}")

    if trains_in_bf16(t) and cfg.adapter.type == "full" and cfg.model.dtype != "bf16":
        log(f"train.optimizer = \"adamw_bf16\" with model.dtype = {cfg.model.dtype!r}: weights stay "
            f"{cfg.model.dtype}, so Kahan summation is off (it applies to bf16 weights)")
    optimizer = build_optimizer(trainable.values(), t, device, log)
    scheduler = build_scheduler(optimizer, t)
    ema = Ema(trainable.values(), cfg.ema) if cfg.ema.enabled else None
    validator = None
    if cfg.validation.every > 0:
        from .validate import Validator

        validator = Validator(cfg, prepared.store, device, run_dir, log)
    seconds = {"caching": prepared.seconds, "training": 0.0, "validation": 0.0, "checkpointing": 0.0}
    loader = CachedLoader(prepared, t.batch_size, seed=t.seed, caption_dropout=t.caption_dropout,
                          gradient_accumulation_steps=t.gradient_accumulation_steps)
    flow_gen = torch.Generator("cpu").manual_seed(_seed(t.seed, "flow"))
    tread_gen = torch.Generator(device).manual_seed(_seed(t.seed, "tread"))
    step, skipped, consecutive = 0, 0, 0

    # -- resume: weights, optimizer, scheduler, every RNG and the data position -----------------
    ckpt = find_checkpoint(ckpt_root, t.resume) if t.resume else None
    if ckpt is not None:
        weights, state, meta = load_checkpoint(ckpt)
        if meta.get("adapter") != cfg.adapter.type or set(weights) != set(trainable):
            raise ConfigError(f"train.resume: {ckpt} holds a {meta.get('adapter')} run with "
                              f"{len(weights)} tensors; this config trains {cfg.adapter.type} with "
                              f"{len(trainable)}: resume with the config it was saved with")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(weights[n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        if ema is not None:
            if "ema" not in state:
                raise ConfigError(f"train.resume: {ckpt} was saved without EMA; resume with ema.enabled = false")
            ema.load_state_dict(state["ema"])
        seconds.update({k: v for k, v in state.get("seconds", {}).items() if k != "caching"})
        flow_gen.set_state(state["rng"]["flow"])
        tread_gen.set_state(state["rng"]["tread"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, skipped, consecutive = meta["step"], state["skipped"], state["consecutive"]
        log(f"resumed from {ckpt} at step {step}")
    elif t.resume and t.resume != "latest":
        raise ConfigError(f"train.resume = {t.resume!r}: nothing to resume")

    def summary() -> dict:
        return {"steps": step, "samples_seen": step * t.batch_size * t.gradient_accumulation_steps,
                "skipped_files": len(prepared.skips.entries), "skipped_steps": skipped,
                "seconds": {k: round(v, 3) for k, v in seconds.items()}}

    def validate():
        t1 = time.perf_counter()
        outputs = validator.run(model, step, ema)
        logger.images(step, outputs)
        seconds["validation"] += time.perf_counter() - t1

    def checkpoint():
        t1 = time.perf_counter()
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "loader": loader.state_dict(), "skipped": skipped, "consecutive": consecutive,
                 **({"ema": ema.state_dict()} if ema is not None else {}),
                 "seconds": dict(seconds),
                 "rng": {"flow": flow_gen.get_state(), "tread": tread_gen.get_state(),
                         "torch": torch.get_rng_state(),
                         **({"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {})}}
        path = save_checkpoint(ckpt_root, step, {n: p.detach() for n, p in trainable.items()}, state,
                               {"adapter": cfg.adapter.type, "seed": t.seed}, keep=t.keep_checkpoints)
        write_plots(run_dir)
        seconds["checkpointing"] += time.perf_counter() - t1
        write_summary(run_dir, summary())
        logger.write(f"checkpoint: {path}")

    logger = StepLog(cfg.logging, run_dir, step, t.max_train_steps)
    patch = model.config.patch_size
    saved_at = step
    try:
        with _StopFlag() as stop:
            if validator is not None and step == 0 and cfg.validation.baseline:
                validate()
            while step < t.max_train_steps:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                tokens = 0
                for _ in range(t.gradient_accumulation_steps):
                    batch = next(loader).to(device, DTYPES[cfg.model.dtype])
                    x0 = batch.latents
                    b, _, f, h, w = x0.shape
                    tokens += b * (f // patch[0]) * (h // patch[1]) * (w // patch[2])
                    # Noise and timesteps come from the CPU generator: same draws on any device.
                    noise = torch.randn(x0.shape, generator=flow_gen).to(device, x0.dtype)
                    sigma = sample_sigmas(b, t.timestep_sampling, flow_gen, logit_mean=t.logit_mean,
                                          logit_std=t.logit_std, shift=t.flow_shift,
                                          tokens_per_frame=(h // patch[1]) * (w // patch[2])).to(device)
                    x_t, target, timestep = noisy_input(x0, noise, sigma)
                    with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                        pred = model(x_t, timestep, batch.prompt_embeds, routes=routes, generator=tread_gen)
                    loss = flow_loss(pred, target) / t.gradient_accumulation_steps
                    loss.backward()
                    loss_sum += loss.detach()
                grad_norm = clip_gradients(list(trainable.values()), t)
                # Host sync (one per step): the loss and norm decide whether this step is applied.
                loss_val, norm_val = loss_sum.item(), float(grad_norm)
                bad = not (math.isfinite(loss_val) and math.isfinite(norm_val))
                if bad:
                    skipped, consecutive = skipped + 1, consecutive + 1
                else:
                    optimizer.step()
                    consecutive = 0
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                if ema is not None and not bad:
                    ema.maybe_update(step)
                step_time = time.perf_counter() - t0
                seconds["training"] += step_time
                logger.step(step, loss_val, lr, norm_val, step_time, tokens, memory_bytes(device), bad)
                if bad:
                    logger.write(f"step {step}: non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'} "
                                 f"(loss {loss_val}, grad norm {norm_val}); step skipped "
                                 f"({consecutive} in a row, {skipped} in total)")
                if t.max_consecutive_nonfinite and consecutive >= t.max_consecutive_nonfinite:
                    raise TrainingStopped(
                        f"stopped at step {step}: {consecutive} non-finite steps in a row "
                        f"(train.max_consecutive_nonfinite = {t.max_consecutive_nonfinite}). Lower "
                        f"train.learning_rate (now {t.learning_rate}), keep train.max_grad_norm > 0, check the "
                        f"data (a corrupt cache entry: delete {cfg.cache.dir}), then resume from the last "
                        f"checkpoint with train.resume = \"latest\"")
                if validator is not None and validator.due(step):
                    validate()
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    checkpoint()
                    saved_at = step
                if stop.signum:
                    if saved_at != step:
                        checkpoint()
                    name = signal.Signals(stop.signum).name
                    logger.write(f"{name}: stopped at step {step} after writing a checkpoint; "
                                 f"resume with train.resume = \"latest\"")
                    return 128 + stop.signum
            if saved_at != step:
                checkpoint()
    finally:
        logger.close()
    files = export_final(cfg, model, run_dir, step)
    if ema is not None:
        with ema.swapped_in():
            files += export_final(cfg, model, run_dir / "ema", step)
    write_plots(run_dir)
    write_summary(run_dir, summary())
    losses = loss_values(run_dir)
    if len(losses) >= 20:
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        log(f"loss: mean of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    log(f"done: {step} steps ({skipped} skipped); saved {', '.join(str(f) for f in files)}")
    return 0
