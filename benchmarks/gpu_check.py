"""GPU truth in one command: measure vidtune on this CUDA device in under 8 minutes.

    python benchmarks/gpu_check.py --out DIR            # on a GPU: every part, time-boxed
    python benchmarks/gpu_check.py --out DIR --dry-run  # on a CPU: every part's setup at toy sizes (CI)

Runs from a bare copy of the repository (no ``pip install``): this checkout's ``vidtune`` and
``kernels/`` (as ``vidtune_kernels``) are put on the path, the wheels ``benchmarks/gpu_wheels.sh``
fetched go into ``DIR/.env/site``, and the native streamer is built with cmake into
``DIR/.build``. Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` and prints the tables last.
Exit status 0 when every part ran and passed. The parts live in ``vidtune/bench/gpu_check/``; how to
read the tables: benchmarks/README.md.
"""
import argparse
import sys
from pathlib import Path

# The repository, so that `vidtune` imports from this checkout; the runner adds the rest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidtune.bench.gpu_check import BUDGET_S, DRY_RUN_BUDGET_S, PARTS  # noqa: E402  (standard library only)
from vidtune.bench.gpu_check.runner import WHEELS, child, hide_modules, render, result_name, run  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Measure vidtune on this GPU: kernels, kernel speed, model parity, the full-size "
                    "training step, offload and int8, each part time-boxed; writes DIR/gpu_check.json and "
                    "DIR/gpu_check.md and prints the table last (see benchmarks/README.md).")
    ap.add_argument("--out", required=True, help="output directory (also holds the unpacked wheels and builds)")
    ap.add_argument("--dry-run", action="store_true",
                    help="rehearse every part on the CPU at toy sizes (CI): setup and result rows, no GPU numbers")
    ap.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(n for n, _, _ in PARTS)}")
    ap.add_argument("--device", default="cuda", help="CUDA device of a GPU run (default: cuda)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole check (default {BUDGET_S}; {DRY_RUN_BUDGET_S} for the dry run)")
    ap.add_argument("--box-scale", type=float, default=1.0,
                    help="multiply every part's time box (a slower GPU than an H100/H200 may need 2-3)")
    ap.add_argument("--wheels", default=str(WHEELS), help="wheels from benchmarks/gpu_wheels.sh (default: benchmarks/wheels)")
    ap.add_argument("--isolate", choices=["fork", "spawn"], default=None,
                    help="how a part gets its process (default: spawn on a GPU, fork for the dry run)")
    ap.add_argument("--build-native", action="store_true",
                    help="dry run: build the native streamer with cmake instead of configuring only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a spawned part
    ap.add_argument("--size", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:  # a spawned part: the parent set PYTHONPATH
        hide_modules()
        return child(args.child, Path(args.out), args.device, args.size)
    report = run(args)
    print("\n" + render(report), flush=True)
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md; a measured run is committed as "
          f"benchmarks/results/{result_name(report['env'])}", flush=True)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
