"""``vidtune-bench SUITE [SUITE ...]``: counters, memory plans, projections and timings per suite.

    vidtune-bench cpu                   # small real configs: deterministic counters + timed vs diffusers
    vidtune-bench rtx4090 h100          # full-size Wan: counters, plans, roofline projections
    vidtune-bench cpu --deterministic   # counters only (what CI gates, see benchmarks/compare.py)
    vidtune-bench rtx4090 --workloads sana2b-full sana2b-lora   # some workloads of a suite
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vidtune-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="+", help="suite names (rtx4090, a6000, mi300x, h100, cpu) or .toml paths")
    ap.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    ap.add_argument("--deterministic", action="store_true", help="counters and plans only: no timing")
    ap.add_argument("--no-search", action="store_true", help="do not search fixes for plans that do not fit")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default: the suite's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--workloads", nargs="+", default=None, metavar="NAME",
                    help="only these workloads of each suite (e.g. sana2b-full sana2b-lora)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    from vidtune.bench.report import write_report
    from vidtune.bench.run import run_suite, write_outputs
    from vidtune.bench.suite import load_suite
    from vidtune.bench.timing import gpu_matches

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    all_rows, all_reports, results = [], {}, {}
    for name in args.suites:
        suite = load_suite(name)
        if args.workloads:
            unknown = set(args.workloads) - {w.name for w in suite.workloads}
            if unknown:
                print(f"error: suite {suite.name} has no workload {sorted(unknown)}; it has "
                      f"{[w.name for w in suite.workloads]}", file=sys.stderr)
                return 2
            suite.workloads = [w for w in suite.workloads if w.name in args.workloads]
        where = "" if suite.device.name == "cpu" else (
            "" if gpu_matches(suite.device) else " (no matching GPU: counters, plans and projections)")
        print(f"suite {suite.name}: {len(suite.workloads)} workloads on {suite.device.label}{where}")
        rows, reports, _ = run_suite(suite, deterministic=args.deterministic, search=not args.no_search,
                                     repeats=args.repeats)
        all_rows += rows
        all_reports.update({f"{suite.name}/{k}": v for k, v in reports.items()})
        results[suite.name] = (suite, rows)
    write_outputs(out, all_rows, all_reports)
    write_report(out, results)
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'plans.txt'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
