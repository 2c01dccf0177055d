"""A stable evaluation loss: flow-matching MSE on held-out samples at fixed timesteps and fixed noise.

The training loss of one step depends on which clip, noise level and noise the step drew, so its
curve is noisy and two points of it never compare. The evaluation loss holds all three fixed
(the idea of "Demystifying SD fine-tuning", which SimpleTuner's EVAL_LOSS.md follows): the same
held-out samples, each scored at every timestep of ``eval.timesteps`` with noise drawn from a
generator seeded by (``eval.seed``, sample index), in eval mode (no TREAD routing, no dropout),
without autograd. Two evaluations of the same weights give the same number, so a falling curve
means the model got better on data it never trained on.

Held-out samples come from ``eval.dataset`` (a [[dataset]] cached but never trained on) or from
``eval.split_fraction`` of each training dataset's files (a seeded choice, the same on resume):
``hold_out`` moves them from ``PreparedData.entries`` (what the loader draws) to ``held_out``.
Results: ``<run>/eval.jsonl`` (one line per evaluation; cut back to the checkpoint on resume),
``plots/eval_loss.png`` and the ``eval/*`` scalars of the metrics backend.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from ..config import EvalConfig
from ..data import CachedLoader, DataError, PreparedData
from ..data.loader import Batch
from ..data.prepare import usable_samples
from ..fsutil import atomic_write_bytes
from ..runtime import seed_for
from .flow import flow_loss

EVAL_LOG = "eval.jsonl"


def hold_out(prepared: PreparedData, ev: EvalConfig, batch_size: int, grad_accum: int) -> PreparedData:
    """``prepared`` with ``ev.split_fraction`` of each dataset's files moved to ``held_out`` (a
    seeded choice per dataset, at least one file each). Raises DataError when what is left cannot
    fill one optimizer step."""
    by_ds = defaultdict(list)
    for e in prepared.entries:
        by_ds[e.dataset_id].append(e)
    train, held = [], []
    for ds, entries in sorted(by_ds.items()):
        entries = sorted(entries, key=lambda e: str(e.source))
        g = torch.Generator().manual_seed(seed_for(ev.seed, "eval-split", ds))
        order = torch.randperm(len(entries), generator=g).tolist()
        n = max(1, round(ev.split_fraction * len(entries)))
        held += [entries[i] for i in order[:n]]
        kept = [entries[i] for i in sorted(order[n:])]
        need = batch_size * grad_accum
        if usable_samples([e.bucket for e in kept], prepared.repeats.get(ds, 0), batch_size) < need:
            raise DataError(f"eval.split_fraction = {ev.split_fraction}: holding out {n} of {len(entries)} file(s) of "
                            f"dataset {ds!r} leaves too few to fill batch_size x gradient_accumulation_steps = "
                            f"{need}; lower eval.split_fraction, raise that dataset's repeats, or point "
                            f"eval.dataset at a separate [[dataset]]")
        train += kept
    return dataclasses.replace(prepared, entries=train, held_out=held)


def chosen(held_out: list, ev: EvalConfig) -> list:
    """The evaluation samples: at most ``max_samples`` of ``held_out``, a fixed seeded choice."""
    entries = sorted(held_out, key=lambda e: (e.dataset_id, str(e.source)))
    g = torch.Generator().manual_seed(seed_for(ev.seed, "eval-samples"))
    order = torch.randperm(len(entries), generator=g).tolist()[:ev.max_samples]
    return [entries[i] for i in sorted(order)]


def _repeat(b: Batch, n: int) -> Batch:
    rep = (lambda t: t.repeat_interleave(n, 0))
    return Batch(rep(b.latents), rep(b.prompt_embeds), rep(b.prompt_lengths), b.captions * n, rep(b.dropped),
                 b.dataset_ids * n, b.sources * n, {k: rep(v) for k, v in b.cond.items()})


class Evaluator:
    """The fixed evaluation set of a run and the loss of a model on it."""

    def __init__(self, ev: EvalConfig, prepared: PreparedData, forward, device, dtype, batch_size: int,
                 run_dir: Path):
        if not prepared.held_out:
            raise DataError("eval: no held-out samples (eval.dataset found no usable file, or nothing was held out)")
        self.ev, self.forward, self.device, self.dtype = ev, forward, device, dtype
        self.batch_size = batch_size
        self.entries = chosen(prepared.held_out, ev)
        # Only its batch_of is used: the held-out datasets' own entries, no repeats.
        self.loader = CachedLoader(dataclasses.replace(prepared, entries=self.entries, repeats={}, weights={}), 1)
        self.run_dir = Path(run_dir)

    def open(self, start_step: int) -> None:
        """Keep the evaluations up to the resumed step (a killed run may have logged past it); a run
        from step 0 starts the file again."""
        kept = [r for r in read_eval(self.run_dir) if 0 < start_step and r["step"] <= start_step]
        atomic_write_bytes(self.run_dir / EVAL_LOG, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def due(self, step: int) -> bool:
        return self.ev.every > 0 and step % self.ev.every == 0

    @torch.no_grad()
    def loss(self, model) -> dict[str, float]:
        """{"loss": mean over samples and timesteps, "t<timestep>": mean per timestep}: identical for
        identical weights (fixed samples, timesteps and noise; eval mode)."""
        steps = [float(t) for t in self.ev.timesteps]
        sigma_all = torch.tensor(steps, dtype=torch.float32) / 1000
        per_t = torch.zeros(len(steps), dtype=torch.float64)
        was_training = model.training
        model.eval()  # all tokens (no TREAD), no dropout
        try:
            for i, entry in enumerate(self.entries):
                one = self.loader.batch_of([entry]).to(self.device, self.dtype)
                g = torch.Generator().manual_seed(seed_for(self.ev.seed, "eval-noise", i))
                noise_all = torch.randn((len(steps), *one.latents.shape[1:]), generator=g)
                for s in range(0, len(steps), self.batch_size):
                    n = min(self.batch_size, len(steps) - s)
                    batch = _repeat(one, n)
                    noise = noise_all[s:s + n].to(self.device, batch.latents.dtype)
                    sigma = sigma_all[s:s + n].to(self.device)
                    pred, target, weight = self.forward(model, batch, noise, sigma, routes=(), generator=None)
                    for j in range(n):  # per sample: a batch-mean would weigh masked samples differently
                        w = None if weight is None else weight[j:j + 1]
                        per_t[s + j] += float(flow_loss(pred[j:j + 1], target[j:j + 1], w))
        finally:
            model.train(was_training)
        per_t /= len(self.entries)
        out = {"loss": float(per_t.mean())}
        out.update({f"t{t:g}": float(v) for t, v in zip(steps, per_t)})
        return out

    def run(self, model, step: int, ema=None) -> dict[str, float]:
        """Evaluate the live weights (and the EMA weights when EMA is on); append to eval.jsonl."""
        live = self.loss(model)
        row = {"step": step, **live}
        if ema is not None:
            with ema.swapped_in():
                row["ema_loss"] = self.loss(model)["loss"]
        with open(self.run_dir / EVAL_LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_eval(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVAL_LOG
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # torn by a kill mid-write
                break
    return rows


def eval_trend(run_dir: str | Path) -> str:
    """ "eval loss: step A x -> step B y" from eval.jsonl ("" with fewer than two evaluations)."""
    rows = [r for r in read_eval(run_dir) if math.isfinite(r["loss"])]
    if len(rows) < 2:
        return ""
    a, b = rows[0], rows[-1]
    ema = f" (EMA {b['ema_loss']:.4f})" if "ema_loss" in b else ""
    return f"eval loss: step {a['step']} {a['loss']:.4f} -> step {b['step']} {b['loss']:.4f}{ema}"


def eval_series(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The plotted curves: the live weights' loss and, with EMA, the EMA weights'."""
    rows = read_eval(run_dir)
    out = {"eval loss": [(r["step"], r["loss"]) for r in rows]}
    if any("ema_loss" in r for r in rows):
        out["eval loss (EMA)"] = [(r["step"], r["ema_loss"]) for r in rows if "ema_loss" in r]
    return out
