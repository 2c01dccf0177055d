"""Running benchmark suites: counters, memory plans, projections and timings per workload.

``vidtune-bench`` (``vidtune.cli.bench``) calls ``run_suite`` per suite, then ``write_outputs``
and the report; ``benchmarks/compare.py`` calls ``run_suite`` for the CI gate. Outputs:
``<out>/results.csv`` and ``results.json`` (one row per measurement: bench, provider, mode,
metric, unit, x, p20, p50, p80, config, device_class, git_sha, versions), ``plans.txt`` (the
planner's report per workload) and ``report.md`` with plots. Modes: ``counters`` (deterministic,
fake-tensor probes), ``plan`` (planner peaks), ``measured`` (deterministic counters of a real CPU
step), ``projection`` (roofline at spec-sheet peaks: never a measurement), ``timed`` (wall clock).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ["bench", "provider", "mode", "metric", "unit", "x", "p20", "p50", "p80", "config", "device_class",
           "git_sha", "versions"]
REPO = Path(__file__).resolve().parents[2]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> str:
    import diffusers
    import peft
    import torch

    return f"torch {torch.__version__}; diffusers {diffusers.__version__}; peft {peft.__version__}; " \
           f"python {sys.version.split()[0]}"


def _compact(data: dict) -> str:
    keep = {k: v for k, v in data.items() if k in ("model", "adapter", "memory", "tread", "train")}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))


class Rows:
    def __init__(self, device_class: str, sha: str, vers: str):
        self.rows: list[dict] = []
        self.device_class, self.sha, self.vers = device_class, sha, vers

    def add(self, bench, provider, mode, metric, unit, x, value, config=""):
        p20, p50, p80 = value if isinstance(value, tuple) else (value, value, value)
        self.rows.append(dict(bench=bench, provider=provider, mode=mode, metric=metric, unit=unit, x=x,
                              p20=p20, p50=p50, p80=p80, config=config, device_class=self.device_class,
                              git_sha=self.sha, versions=self.vers))


def run_suite(suite, *, deterministic: bool = False, search: bool = True, repeats: int | None = None,
              log=print) -> tuple[list[dict], dict, dict]:
    """Rows of one suite, the planner reports by workload, and the timed results (cpu)."""
    from vidtune.bench.project import project_step
    from vidtune.bench.real_step import SAVED_TARGETS, lora_saved_vs_diffusers, real_step
    from vidtune.bench.timing import cpu_vs_diffusers, gpu_matches, gpu_window
    from vidtune.build import architecture
    from vidtune.models import family
    from vidtune.planner import plan

    dev = suite.device
    is_cpu = dev.name == "cpu"
    rows = Rows(dev.name, git_sha(), versions())
    reports, timed = {}, {}
    for wl in suite.workloads:
        t0 = time.perf_counter()
        cfg = wl.config()
        arch = family(cfg.model.family).CONFIG_CLASS(**suite.arch) if suite.arch else architecture(cfg.model)
        p = plan(cfg, dev.name, search=search and not is_cpu, arch=arch, device=dev)
        reports[wl.name] = p.report()
        c, conf, x = p.counters, _compact(wl.data), p.tokens
        add = lambda *a: rows.add(wl.name, "vidtune", *a[:-1], x, a[-1], conf)  # noqa: E731
        add("counters", "fwd_flops", "FLOP", c["fwd_flops"])
        add("counters", "bwd_flops", "FLOP", c["bwd_flops"])
        add("counters", "opt_flops", "FLOP", c["opt_flops"])
        add("counters", "materialized_bytes", "bytes", c["materialized_bytes"])
        add("counters", "offload_bytes", "bytes", c["offload_bytes"])
        add("counters", "act_peak_bytes", "bytes", c["act_peak_bytes"])
        for ph in p.phases:
            add("plan", ph.name.replace(" ", "_") + "_peak_bytes", "bytes", ph.peak)
        add("plan", "fits", "bool", int(p.fits))
        if is_cpu:
            m = real_step(cfg, arch, p.shape.latent)
            add("measured", "step_peak_bytes", "bytes", m["peak_bytes"])
            add("measured", "fwd_flops", "FLOP", m["fwd_flops"])
            add("measured", "bwd_flops", "FLOP", m["bwd_flops"])
            add("measured", "materialized_bytes", "bytes", m["materialized_bytes"])
            if cfg.memory.offload.type == "none":  # the real step runs without offload on the CPU
                add("plan", "step_peak_over_measured", "ratio", p.phase("training step").peak / m["peak_bytes"])
        else:
            pr = project_step(p, dev)
            for k, unit in (("step_time_s", "s"), ("tokens_per_s", "tokens/s"), ("mfu", "ratio"),
                            ("offload_transfer_s", "s"), ("offload_exposed_s", "s")):
                add("projection", k, unit, pr[k])
            if not deterministic and gpu_matches(dev) and p.fits:
                g = gpu_window(cfg, arch, p.shape, dev, p)
                add("timed", "step_time_s", "s", g["step_time_s"])
                add("timed", "tokens_per_s", "tokens/s", g["tokens_per_s"])
                add("timed", "mfu", "ratio", g["mfu"])
                add("timed", "peak_memory_bytes", "bytes", g["peak_memory_bytes"])
        log(f"  {wl.name:<34} {'fits' if p.fits else 'NO FIT':<7} step peak {p.phase('training step').peak / 2**30:7.2f} GiB"
            f"  fwd+bwd {(c['fwd_flops'] + c['bwd_flops']) / 1e12:9.3f} TFLOP  ({time.perf_counter() - t0:.1f} s)")
    if is_cpu and suite.timed:
        # Deterministic and gated: what a LoRA step keeps for backward, vidtune vs diffusers + peft
        # on the same weights (attention + feed-forward LoRA); vidtune must keep no more.
        saved = lora_saved_vs_diffusers(suite.timed)
        conf = json.dumps({**suite.timed, "lora_targets": SAVED_TARGETS}, sort_keys=True, separators=(",", ":"))
        f, h, w = suite.timed["latent"]
        tokens = f * (h // 2) * (w // 2)
        for prov, mark in saved.items():
            rows.add("wan-lora-saved", prov, "counters", "saved_bytes", "bytes", tokens, mark.live_bytes, conf)
        ours, theirs = saved["vidtune"].live_bytes, saved["diffusers+peft"].live_bytes
        rows.add("wan-lora-saved", "vidtune", "counters", "saved_within_diffusers_peft", "bool", tokens,
                 int(ours <= theirs), conf)
        log(f"  LoRA step keeps for backward: vidtune {ours / 2**20:.1f} MiB, diffusers+peft {theirs / 2**20:.1f} MiB")
    if is_cpu and not deterministic and suite.timed:
        log("  timed: vidtune vs diffusers+peft LoRA (same weights, interleaved repeats)...")
        timed = cpu_vs_diffusers(suite.timed, repeats)
        conf = json.dumps({k: v for k, v in suite.timed.items()}, sort_keys=True, separators=(",", ":"))
        for prov, r in timed["providers"].items():
            bench = "wan-lora-fwd-bwd"
            rows.add(bench, prov, "timed", "step_time_s", "s", timed["tokens"], (r["p20"], r["p50"], r["p80"]), conf)
            rows.add(bench, prov, "timed", "ratio_vs_diffusers", "ratio", timed["tokens"], r["ratio"], conf)
            rows.add(bench, prov, "timed", "mfu", "ratio", timed["tokens"], r["mfu"], conf)
            rows.add(bench, prov, "timed", "tokens_per_s", "tokens/s", timed["tokens"], r["tokens_per_s"], conf)
            rows.add(bench, prov, "counters", "flops", "FLOP", timed["tokens"], r["flops"], conf)
            rows.add(bench, prov, "counters", "peak_bytes", "bytes", timed["tokens"], r["peak_bytes"], conf)
        rows.add("wan-lora-fwd-bwd", "torch", "timed", "cpu_fp32_peak_flops", "FLOP/s", 0, timed["cpu_fp32_peak_flops"],
                 f"2048^3 fp32 matmul, {timed['threads']} threads")
        v = timed["providers"]
        log(f"  vidtune / diffusers+peft step time: {v['vidtune']['ratio']:.3f} (medians {v['vidtune']['p50']:.3f} s vs "
            f"{v['diffusers+peft']['p50']:.3f} s, {timed['repeats']} repeats, {timed['threads']} threads); "
            f"MFU {v['vidtune']['mfu']:.1%} vs {v['diffusers+peft']['mfu']:.1%} of the measured "
            f"{timed['cpu_fp32_peak_flops'] / 1e9:.0f} GFLOP/s fp32 peak")
    return rows.rows, reports, timed


def write_outputs(out: Path, rows: list[dict], reports: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "plans.txt").write_text("\n\n".join(f"=== {k}\n{v}" for k, v in reports.items()) + "\n")
