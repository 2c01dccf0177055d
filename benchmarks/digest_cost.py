"""What verifying cache entries and checkpoints costs, against the demo's step time.

    python benchmarks/digest_cost.py [--dir demo-digest] [--steps 40]

Builds the CPU demo (``vidtune.testing demo-setup``) in ``--dir`` if it is not there, trains
``examples/quickstart.toml`` for ``--steps`` steps into it, then times the digest work one step
adds: the loader checks every entry it reads (``batch_size`` latent and text entries per
micro-step) and each checkpoint hashes its files (amortised over ``checkpoint_every``). The
step time is the run's own (``summary.json``: training seconds / steps). Medians of repeated
timings; the machine's load shows in the step time, so run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="demo-digest", help="demo directory (model, videos, cache, run)")
    p.add_argument("--steps", type=int, default=40, help="training steps to time")
    p.add_argument("--reps", type=int, default=200, help="repetitions of each digest timing")
    p.add_argument("--reuse", action="store_true", help="time the run already in --dir instead of training")
    args = p.parse_args()

    from vidtune.cli.train import main as train
    from vidtune.config import load_config
    from vidtune.integrity import stream_digest, tensors_digest
    from vidtune.testing import demo_setup
    from vidtune.train.checkpoint import STATE, WEIGHTS, checkpoint_dirs

    root = Path(args.dir).resolve()
    demo_setup(root)
    sets = {"model.path": root / "model", "cache.dir": root / "cache", "train.output_dir": root / "run",
            "dataset.clips.path": root / "videos", "train.max_train_steps": args.steps,
            "logging.report_to": "none", "logging.progress_bar": "false"}
    overrides = [f"{k}={json.dumps(str(v)) if isinstance(v, Path) else v}" for k, v in sets.items()]
    if not (args.reuse and (root / "run" / "summary.json").is_file()) and \
            train([str(REPO / "examples" / "quickstart.toml"), *[a for o in overrides for a in ("--set", o)]]):
        raise SystemExit("the demo run failed")
    cfg = load_config(REPO / "examples" / "quickstart.toml", overrides)
    summary = json.loads((root / "run" / "summary.json").read_text())
    step_s = summary["seconds"]["training"] / summary["steps"]

    from safetensors.torch import load

    from vidtune.data.cache import CacheStore

    per_kind, reads = {}, {}
    for kind in ("latents", "text"):
        files = sorted((root / "cache" / kind).rglob("*.safetensors"))
        entries = [CacheStore.read(f) for f in files]
        per_kind[kind] = statistics.mean(median_seconds(lambda e=e: tensors_digest(e), args.reps) for e in entries)
        # The whole read path, verified (what the loader does) and plain (safetensors alone).
        reads[kind] = [statistics.mean(median_seconds(lambda f=f: fn(f), args.reps) for f in files)
                       for fn in (CacheStore.read, lambda f: load(f.read_bytes()))]
    samples = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    loader_s = samples * (per_kind["latents"] + per_kind["text"])
    extra_s = samples * sum(v - p for v, p in reads.values())
    ckpt = checkpoint_dirs(root / "run" / "checkpoints")[-1]
    ckpt_s = sum(median_seconds(lambda f=ckpt / n: stream_digest(f), args.reps) for n in (WEIGHTS, STATE))
    ckpt_bytes = sum((ckpt / n).stat().st_size for n in (WEIGHTS, STATE))
    amortised = ckpt_s / cfg.train.checkpoint_every
    print(f"step time (demo, {summary['steps']} steps): {step_s * 1e3:.1f} ms")
    print(f"digest per entry: latents {per_kind['latents'] * 1e6:.1f} us, text {per_kind['text'] * 1e6:.1f} us; "
          f"{samples} sample(s) per step: {loader_s * 1e6:.1f} us/step")
    print(f"checkpoint digests: {ckpt_s * 1e3:.2f} ms for {ckpt_bytes / 2**20:.1f} MiB, every "
          f"{cfg.train.checkpoint_every} steps: {amortised * 1e6:.1f} us/step")
    print("read per entry, verified vs plain safetensors: " + ", ".join(
        f"{k} {v * 1e6:.1f} vs {p * 1e6:.1f} us" for k, (v, p) in reads.items())
        + f"; {samples} sample(s) per step: +{extra_s * 1e6:.1f} us/step")
    print(f"hashing / step time: {(loader_s + amortised) / step_s * 100:.3f} %; verified reads + checkpoint "
          f"digests / step time: {(extra_s + amortised) / step_s * 100:.3f} %")


if __name__ == "__main__":
    main()
