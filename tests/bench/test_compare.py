"""The CI gate: a fresh deterministic cpu-suite run passes against the committed baseline, and an
injected regression (chunked FF turned off in a workload that enables it) fails it."""
import importlib.util
import json
from pathlib import Path

import torch

from vidtune.bench.suite import load_suite

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks" / "compare.py")
compare_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_mod)


def baseline():
    return json.loads(compare_mod.BASELINE.read_text())


def test_fresh_run_passes_the_gate():
    rows = compare_mod.fresh_rows(log=lambda *a: None)
    ok, problems = compare_mod.compare(rows, baseline())
    assert ok, compare_mod.table(problems)


def test_injected_regression_fails_the_gate():
    suite = load_suite("cpu")
    wl = next(w for w in suite.workloads if w.name == "small-lora-ckpt-chunked")
    assert wl.data["memory"]["chunked_ff"]["enabled"]
    wl.data["memory"]["chunked_ff"]["enabled"] = False  # the injected regression
    suite.workloads = [wl]
    rows = compare_mod.fresh_rows(suite, log=lambda *a: None)
    base = [r for r in baseline() if r["bench"] == wl.name]
    ok, problems = compare_mod.compare(rows, base)
    assert not ok
    worse = {(p[1], p[2]) for p in problems}
    assert ("plan", "training_step_peak_bytes") in worse or ("measured", "step_peak_bytes") in worse, \
        compare_mod.table(problems)
    assert "small-lora-ckpt-chunked" in compare_mod.table(problems)


def test_counts_do_not_depend_on_thread_count():
    suite = load_suite("cpu")
    suite.workloads = suite.workloads[:1]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compare_mod.fresh_rows(suite, log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    ok, problems = compare_mod.compare(one, [r for r in baseline() if r["bench"] == suite.workloads[0].name])
    assert ok, compare_mod.table(problems)
