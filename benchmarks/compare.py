"""CI gate: a fresh deterministic run of the cpu suite against benchmarks/baselines/cpu.json.

    python benchmarks/compare.py            # exit 1 with a table of what got worse
    python benchmarks/compare.py --update   # rewrite the baseline from a fresh run (the one way to accept a change)
    python benchmarks/compare.py --timed    # also time vidtune vs diffusers+peft (recorded, never gated)

Gated: every deterministic row (modes counters, plan, measured). FLOPs must match exactly; bytes
may grow by at most 1% (less is fine: run --update to lock an improvement in); a plan that stops
fitting, or a row that disappears, fails. Wall-time rows are printed beside the baseline's, never
gated. The counts depend only on shapes and the op sequence (fake tensors and a real fp32 step
under the counters), so they are identical on any machine and thread count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "baselines" / "cpu.json"
GATED_MODES = ("counters", "plan", "measured")
BYTES_TOLERANCE = 0.01


def key(r: dict) -> tuple:
    return (r["bench"], r["provider"], r["mode"], r["metric"])


def fresh_rows(suite=None, *, timed: bool = False, log=print) -> list[dict]:
    from vidtune.bench.run import run_suite
    from vidtune.bench.suite import load_suite

    suite = suite or load_suite("cpu")
    rows, _, _ = run_suite(suite, deterministic=not timed, search=False, log=log)
    return rows


def compare(fresh: list[dict], baseline: list[dict]) -> tuple[bool, list[tuple]]:
    """(ok, problems): problems are (bench, mode, metric, unit, baseline, fresh, why)."""
    base = {key(r): r for r in baseline if r["mode"] in GATED_MODES}
    new = {key(r): r for r in fresh if r["mode"] in GATED_MODES}
    problems = []
    for k, b in base.items():
        bench, provider, mode, metric = k
        if k not in new:
            problems.append((bench, mode, metric, b["unit"], b["p50"], None, "missing from the fresh run"))
            continue
        bv, nv = b["p50"], new[k]["p50"]
        unit = b["unit"]
        if unit == "FLOP" and nv != bv:
            problems.append((bench, mode, metric, unit, bv, nv, "FLOPs changed (must match exactly)"))
        elif unit == "bytes" and nv > bv * (1 + BYTES_TOLERANCE):
            problems.append((bench, mode, metric, unit, bv, nv, f"+{(nv / bv - 1) * 100:.1f}% bytes (> 1%)"))
        elif unit == "bool" and nv < bv:
            problems.append((bench, mode, metric, unit, bv, nv, "no longer fits"))
    return not problems, problems


def table(problems: list[tuple]) -> str:
    lines = [f"{'workload':<28}{'mode':<10}{'metric':<34}{'baseline':>16}{'fresh':>16}  why", "-" * 120]
    for bench, mode, metric, unit, bv, nv, why in problems:
        fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 1 else f"{v}")  # noqa: E731
        lines.append(f"{bench:<28}{mode:<10}{metric:<34}{fmt(bv):>16}{fmt(nv):>16}  {why}")
    return "\n".join(lines)


def timed_table(fresh: list[dict], baseline: list[dict]) -> str:
    base = {key(r): r for r in baseline}
    lines = []
    for r in fresh:
        if r["mode"] == "timed" and r["metric"] == "ratio_vs_diffusers":
            b = base.get(key(r))
            lines.append(f"timed (not gated) {r['bench']} {r['provider']}: ratio vs diffusers+peft {r['p50']:.3f}"
                         + (f" (baseline {b['p50']:.3f})" if b else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help="write a fresh run to the baseline and exit 0")
    ap.add_argument("--timed", action="store_true", help="also run the timed part (recorded, not gated)")
    ap.add_argument("--baseline", default=str(BASELINE))
    args = ap.parse_args(argv)
    rows = fresh_rows(timed=args.timed)
    path = Path(args.baseline)
    if args.update:
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = [r for r in rows if r["mode"] in GATED_MODES or r["mode"] == "timed"]
        path.write_text(json.dumps(keep, indent=1) + "\n")
        print(f"baseline updated: {path} ({len(keep)} rows)")
        return 0
    baseline = json.loads(path.read_text())
    ok, problems = compare(rows, baseline)
    extra = timed_table(rows, baseline)
    if extra:
        print(extra)
    if ok:
        print(f"benchmark gate: OK ({sum(r['mode'] in GATED_MODES for r in rows)} deterministic rows match {path.name})")
        return 0
    print("benchmark gate: REGRESSION against " + str(path))
    print(table(problems))
    print("if the change is intended: python benchmarks/compare.py --update")
    return 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
