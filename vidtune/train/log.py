"""Per-step records: the progress bar, TensorBoard/wandb scalars and ``losses.jsonl``; the run
directory's plots (``plots/*.png``) and ``summary.json``.

``losses.jsonl`` holds one line per optimizer step: loss, lr, grad norm and memory as plain JSON
numbers (Python writes the shortest repr that reads back to the same float, so two runs still
compare bit for bit; a non-finite value is ``null``, as JSON has no NaN), and ``skipped``. On
resume it is cut back to the checkpoint's step. Plots are drawn from it (matplotlib, Agg) at every
checkpoint and at the end.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..config import ConfigError, LoggingConfig
from ..fsutil import DiskFullError, atomic_write_bytes, is_disk_full

LOSSES = "losses.jsonl"


def memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def memory_kind(device: torch.device) -> str:
    """What ``memory_bytes`` measures on ``device``, for the memory plot's axis."""
    return "device memory: peak allocated by torch" if device.type == "cuda" else "host memory: process RSS"


def read_losses(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOSSES
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            break
    return rows


def _number(value) -> float:
    """A logged value: a JSON number, null (non-finite), or the hex string older runs wrote."""
    if value is None:
        return math.nan
    return float.fromhex(value) if isinstance(value, str) else float(value)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def loss_values(run_dir: str | Path) -> list[float]:
    return [_number(r["loss"]) for r in read_losses(run_dir)]


class StepLog:
    """Writes each step's numbers to the bar, the metrics backend and ``losses.jsonl``."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, start_step: int, total_steps: int,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.mem_of = memory_kind(device) if device is not None else None
        path = run_dir / LOSSES
        # Keep the steps up to the resumed checkpoint: a killed run may have logged past it.
        kept = [r for r in read_losses(run_dir) if r["step"] <= start_step]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._losses = open(path, "a")
        self.writer = None
        self._wandb = None
        log_dir = cfg.log_dir or str(run_dir / "logs")
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir, purge_step=start_step + 1)
        elif cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("logging.report_to = \"wandb\" needs wandb: pip install wandb "
                                  "(or set logging.report_to = \"tensorboard\")") from None
            self._wandb = wandb.init(project=cfg.project, name=cfg.run_name or run_dir.name, dir=log_dir,
                                     resume="allow")
        self.bar = None
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, step_time: float, tokens: int,
             mem: int, skipped: bool, extra: dict[str, float] | None = None) -> None:
        """``extra``: more scalars by backend name (``perf/mfu``...); the row gets them under the
        last part of the name."""
        extra = {k: v for k, v in (extra or {}).items() if v is not None}
        row = {"step": step, "loss": _json_number(loss), "lr": lr, "grad_norm": _json_number(grad_norm),
               "mem": mem, "skipped": skipped, "step_s": step_time}
        if self.mem_of:
            row["mem_of"] = self.mem_of
        row.update({k.rsplit("/", 1)[-1]: _json_number(float(v)) for k, v in extra.items()})
        try:
            self._losses.write(json.dumps(row) + "\n")
            self._losses.flush()
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.run_dir) from exc
            raise
        tok_s = tokens / step_time if step_time > 0 else 0.0
        mfu = f" MFU {extra['perf/mfu']:.1%}" if "perf/mfu" in extra else ""
        text = (f"loss {loss:.4f}{' (skipped)' if skipped else ''} lr {lr:.2e} {step_time:.2f}s/step "
                f"{tok_s:,.0f} tok/s{mfu} mem {mem / 2**30:.2f} GiB")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif step % self.cfg.log_every == 0:
            print(f"step {step}: {text}", flush=True)
        if step % self.cfg.log_every:
            return
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/step_time_s": step_time, "perf/tokens_per_s": tok_s, "perf/memory_gib": mem / 2**30,
                   "train/skipped": float(skipped), **extra}
        self.scalars(step, scalars)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Named scalars (``section/name``) to the metrics backend."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def images(self, step: int, outputs: dict[str, tuple[Path, Path]]) -> None:
        """Validation contact sheets (tag -> (mp4, png)) to TensorBoard / wandb."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            for tag, (_, png) in outputs.items():
                with Image.open(png) as im:
                    self.writer.add_image(f"validation/{tag}", np.asarray(im.convert("RGB")), step,
                                          dataformats="HWC")
            self.writer.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"validation/{tag}": wandb.Image(str(png)) for tag, (_, png) in outputs.items()},
                            step=step)

    def preview(self, step: int, tag: str, sampling_step: int, png: Path) -> None:
        """A live preview of validation ``step`` after ``sampling_step`` steps (slider: sampling steps)."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(png) as im:
                self.writer.add_image(f"preview/{tag}/step_{step:06d}", np.asarray(im.convert("RGB")), sampling_step,
                                      dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"preview/{tag}": wandb.Image(str(png), caption=f"sampling step {sampling_step}")},
                            step=step)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._losses.flush()
        os.fsync(self._losses.fileno())
        self._losses.close()


# file name -> (losses.jsonl key, title, y axis)
PLOTS = {"loss": ("loss", "training loss", "loss"), "lr": ("lr", "learning rate", "learning rate"),
         "grad_norm": ("grad_norm", "gradient norm (before clipping)", "global L2 norm"),
         "memory": ("mem", "memory", "GiB")}


def plot_figure(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, *, from_zero: bool = False):
    """A matplotlib Figure of one or more (step, value) curves (label "" for an unlabelled first
    curve, drawn thin; the others thick)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(series.items()):
        if pts:
            ax.plot(*zip(*pts), lw=1 if i == 0 else 2, label=label or None)
    if any(label and pts for label, pts in series.items()):
        ax.legend()
    if from_zero:
        ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_figures(rows: list[dict], run_name: str) -> dict:
    """name -> matplotlib Figure of the ``losses.jsonl`` rows, titled with ``run_name``; the memory
    plot says which memory it shows and starts at 0, so a small change looks small."""
    figs = {}
    for name, (key, title, label) in PLOTS.items():
        pts = [(r["step"], _number(r[key])) for r in rows if key in r]
        if key == "mem":
            pts = [(s, v / 2**30) for s, v in pts]
        series = {"": pts}
        if key == "loss" and len(pts) >= 10:  # the trend under per-step noise
            w = max(5, len(pts) // 20)
            vals = [v for _, v in pts]
            series[f"mean of {w}"] = list(zip([s for s, _ in pts[w - 1:]],
                                              [sum(vals[i - w + 1:i + 1]) / w for i in range(w - 1, len(vals))]))
        if key == "mem":
            kind = next((r["mem_of"] for r in reversed(rows) if "mem_of" in r), "memory")
            title, label = kind, f"{kind.split(':')[0]} (GiB)"
        figs[name] = plot_figure(series, f"{run_name}: {title}", label, from_zero=key == "mem")
    return figs


def _save_figure(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_plots(run_dir: str | Path) -> list[Path]:
    """``<run>/plots/{loss,lr,grad_norm,memory}.png`` from ``losses.jsonl`` (atomic writes)."""
    return [_save_figure(fig, Path(run_dir) / "plots" / f"{name}.png")
            for name, fig in plot_figures(read_losses(run_dir), Path(run_dir).name).items()]


def write_plot(path: Path, series: dict[str, list[tuple[float, float]]], title: str, ylabel: str) -> Path:
    """A PNG of one or more (step, value) curves (label "" for an unlabelled first curve), atomically."""
    return _save_figure(plot_figure(series, title, ylabel), path)


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    return atomic_write_bytes(Path(run_dir) / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
