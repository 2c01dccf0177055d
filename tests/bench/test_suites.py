"""Suites load with the run-config loader, carry the spec-sheet budgets the planner uses, and
use full-size 832x480 x 81-frame workloads on the GPU classes."""
import pytest

from vidtune.measure import devices as D
from vidtune.bench.suite import SUITES_DIR, load_suite
from vidtune.planner import train_shape


@pytest.mark.parametrize("name", ["rtx4090", "a6000", "mi300x", "h100", "cpu"])
def test_suite_loads_and_matches_device_table(name):
    s = load_suite(name)
    assert s.workloads
    for w in s.workloads:
        w.config()  # validated like a vidtune-train config
    if name != "cpu":
        ref = D.device(name)
        for f in ("memory_bytes", "bf16_flops", "fp32_flops", "mem_bw", "host_link_bw"):
            assert getattr(s.device, f) == pytest.approx(getattr(ref, f)), f
        for w in s.workloads:
            cfg = w.config()
            assert train_shape(cfg).tokens() == 32760
            assert cfg.model.flavour in ("t2v-480p-1.3b-2.1", "t2v-480p-14b-2.1", "2b-480p")
        assert any(w.config().model.family == "sana_video" for w in s.workloads)


def test_every_suite_file_is_listed():
    assert sorted(p.stem for p in SUITES_DIR.glob("*.toml")) == ["a6000", "cpu", "h100", "mi300x", "rtx4090"]
