"""Markdown report with plots (matplotlib when installed; otherwise the plots are skipped with a
note). Per suite: memory per phase and workload against the usable budget, projected (GPU) or
measured (CPU) step time per workload; across suites: projected step time per GPU class."""
from __future__ import annotations

from pathlib import Path

GiB = 1 << 30


def _get(rows, bench, mode, metric, provider="vidtune"):
    for r in rows:
        if r["bench"] == bench and r["mode"] == mode and r["metric"] == metric and r["provider"] == provider:
            return r["p50"]
    return None


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def write_report(out: Path, results: dict) -> Path:
    plt = _plt()
    lines = ["# vidtune-bench report", ""]
    if plt is None:
        lines += ["_matplotlib is not installed: plots skipped (`pip install matplotlib`)._", ""]
    for name, (suite, rows) in results.items():
        dev = suite.device
        wls = [w.name for w in suite.workloads]
        cpu = dev.name == "cpu"
        lines += [f"## {name}: {dev.label}", "",
                  f"Budget: {dev.memory_bytes / GiB:.0f} GiB ({dev.usable_bytes / GiB:.1f} GiB usable)"
                  + ("" if cpu else f", {dev.bf16_flops / 1e12:.1f} TFLOP/s bf16, {dev.mem_bw / 1e9:.0f} GB/s, "
                                    f"host link {dev.host_link_bw / 1e9:.0f} GB/s (spec-sheet values)"), ""]
        head = "| workload | fits | caching GiB | step GiB | validation GiB | fwd+bwd TFLOP |"
        sep = "|---|---|---|---|---|---|"
        if cpu:
            head += " measured step GiB | plan/measured |"
            sep += "---|---|"
        else:
            head += " projected step s | projected tokens/s | projected MFU |"
            sep += "---|---|---|"
        lines += [head, sep]
        for w in wls:
            g = lambda mode, metric: _get(rows, w, mode, metric)  # noqa: E731
            val = g("plan", "validation_peak_bytes")
            cells = [w, "yes" if g("plan", "fits") else "**no**", f"{g('plan', 'caching_peak_bytes') / GiB:.2f}",
                     f"{g('plan', 'training_step_peak_bytes') / GiB:.2f}",
                     f"{val / GiB:.2f}" if val is not None else "off",
                     f"{(g('counters', 'fwd_flops') + g('counters', 'bwd_flops')) / 1e12:.3f}"]
            if cpu:
                ratio = g("plan", "step_peak_over_measured")
                cells += [f"{g('measured', 'step_peak_bytes') / GiB:.4f}",
                          f"{ratio:.3f}" if ratio is not None else "n/a (offload: the real step runs without it)"]
            else:
                cells += [f"{g('projection', 'step_time_s'):.2f}", f"{g('projection', 'tokens_per_s'):.0f}",
                          f"{g('projection', 'mfu'):.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if cpu:
            t = [r for r in rows if r["bench"] == "wan-lora-fwd-bwd" and r["metric"] == "step_time_s"]
            if t:
                lines += ["Timed (wall clock, medians of interleaved repeats; not gated):", "",
                          "| provider | step s (p20 / p50 / p80) | ratio vs diffusers+peft | MFU | peak MiB |",
                          "|---|---|---|---|---|"]
                for r in t:
                    pv = r["provider"]
                    lines.append(f"| {pv} | {r['p20']:.3f} / {r['p50']:.3f} / {r['p80']:.3f} | "
                                 f"{_get(rows, r['bench'], 'timed', 'ratio_vs_diffusers', pv):.3f} | "
                                 f"{_get(rows, r['bench'], 'timed', 'mfu', pv):.1%} | "
                                 f"{_get(rows, r['bench'], 'counters', 'peak_bytes', pv) / 2**20:.0f} |")
                lines.append("")
        else:
            lines += ["Step times, tokens/s and MFU above are **projections** (per-op roofline at spec-sheet peaks, "
                      "a lower bound on time), not measurements.", ""]
        if plt is not None:
            fig, ax = plt.subplots(figsize=(9, 4))
            xs = range(len(wls))
            if cpu:  # the small configs: the planner's step peak against the real step's
                for i, (mode, metric, label) in enumerate((("plan", "training_step_peak_bytes", "planner"),
                                                           ("measured", "step_peak_bytes", "measured (real step)"))):
                    ys = [(_get(rows, w, mode, metric) or 0) / 2**20 for w in wls]
                    ax.bar([x + (i - 0.5) * 0.4 for x in xs], ys, width=0.4, label=label)
                ax.set_ylabel("MiB")
                ax.set_title(f"{name}: training-step peak, planner vs measured")
            else:
                for i, (metric, label) in enumerate((("caching_peak_bytes", "caching"),
                                                     ("training_step_peak_bytes", "step"),
                                                     ("validation_peak_bytes", "validation"))):
                    ys = [(_get(rows, w, "plan", metric) or 0) / GiB for w in wls]
                    ax.bar([x + (i - 1) * 0.27 for x in xs], ys, width=0.27, label=label)
                ax.axhline(dev.usable_bytes / GiB, color="k", ls="--", lw=1, label="usable")
                ax.set_ylabel("GiB (planner)")
                ax.set_title(f"{name}: predicted peak memory per phase")
            ax.set_xticks(list(xs), wls, rotation=25, ha="right", fontsize=7)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"memory_{name}.png", dpi=110)
            plt.close(fig)
            lines += [f"![memory {name}](memory_{name}.png)", ""]
            if not cpu:
                fig, ax = plt.subplots(figsize=(9, 4))
                bars = ax.bar(list(xs), [_get(rows, w, "projection", "step_time_s") for w in wls])
                for bar, w in zip(bars, wls):  # a plan that does not fit: pale and hatched
                    if not _get(rows, w, "plan", "fits"):
                        bar.set_alpha(0.35)
                        bar.set_hatch("//")
                ax.set_xticks(list(xs), wls, rotation=25, ha="right", fontsize=7)
                ax.set_ylabel("s / step (projection)")
                ax.set_title(f"{name}: projected step time (roofline, spec-sheet peaks)")
                fig.tight_layout()
                fig.savefig(out / f"step_time_{name}.png", dpi=110)
                plt.close(fig)
                lines += [f"![step time {name}](step_time_{name}.png)", ""]
    gpu = {n: v for n, v in results.items() if v[0].device.name != "cpu"}
    if plt is not None and len(gpu) > 1:
        wls = sorted({w.name for s, _ in gpu.values() for w in s.workloads})
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(gpu)
        for i, (n, (s, rows)) in enumerate(gpu.items()):
            ys = [_get(rows, w, "projection", "step_time_s") or 0 for w in wls]
            bars = ax.bar([x + i * width for x in range(len(wls))], ys, width=width, label=n)
            for bar, w in zip(bars, wls):
                if _get(rows, w, "plan", "fits") == 0:
                    bar.set_alpha(0.35)
                    bar.set_hatch("//")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(wls))], wls, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("s / step (projection)")
        ax.set_yscale("log")
        ax.set_title("projected step time per GPU class (hatched: does not fit)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "step_time_by_gpu.png", dpi=110)
        plt.close(fig)
        lines += ["## Projected step time per GPU class", "", "![by gpu](step_time_by_gpu.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
