"""Benchmark suites: ``benchmarks/suites/<gpu_class>.toml``.

A suite has a ``[device]`` budget (spec-sheet values for GPUs), a ``[base]`` table of run-config
sections shared by its workloads, and ``[[workload]]`` entries whose ``config`` is merged over the
base and validated by the same loader as ``vidtune-train`` (so an unknown key is an error here
too). The cpu suite adds ``[arch]`` (a smaller Wan than the flavour's, so it runs for real) and
``[timed]`` (the vidtune vs diffusers + peft comparison).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from vidtune.measure import devices as D

SUITES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"
GiB = 1 << 30


@dataclass
class Workload:
    name: str
    data: dict  # the merged run-config dict

    def config(self):
        from vidtune.config import config_from_dict

        return config_from_dict(self.data, f"workload {self.name!r}")


@dataclass
class Suite:
    name: str
    path: Path
    device: D.Device
    workloads: list[Workload]
    arch: dict | None = None
    timed: dict = field(default_factory=dict)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    cand = SUITES_DIR / f"{name_or_path}.toml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in SUITES_DIR.glob("*.toml")) if SUITES_DIR.exists() else []
    raise FileNotFoundError(f"no suite {name_or_path!r}: pass a .toml path or one of {', '.join(known)}")


def device_from_table(t: dict) -> D.Device:
    cls = t["class"]
    if cls == "cpu":
        return D.device("cpu")
    base = D.device(cls)
    return replace(base, label=t.get("label", base.label), memory_bytes=int(t["memory_gib"] * GiB),
                   bf16_flops=t["bf16_tflops"] * 1e12, fp32_flops=t["fp32_tflops"] * 1e12,
                   mem_bw=t["mem_bw_gb_s"] * 1e9, host_link_bw=t["host_link_gb_s"] * 1e9,
                   match=tuple(t.get("match", base.match)))


def load_suite(name_or_path: str) -> Suite:
    path = suite_path(name_or_path)
    data = tomllib.loads(path.read_text())
    base = data.get("base", {})
    workloads = [Workload(w["name"], _merge(base, w.get("config", {}))) for w in data.get("workload", [])]
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate workload names")
    return Suite(data["suite"]["name"], path, device_from_table(data["device"]), workloads, data.get("arch"),
                 data.get("timed", {}))
