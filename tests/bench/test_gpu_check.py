"""The GPU check without a GPU: the CPU dry run of every part (through the real command, since a
process per part and a bare-tree import path are the point), the wheel installer, the module
hiding that stands in for the bare GPU image, and the wheel script's pins."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vidtune.bench.gpu_check import PARTS
from vidtune.bench.gpu_check.runner import HIDDEN, install_wheels, render

ROOT = Path(__file__).resolve().parents[2]
OPS = ["rope", "rope per-sample", "qk_norm_rope", "rms_norm", "modulate", "modulate per-token", "gated_residual",
       "gated_residual per-token", "gelu_tanh", "tread_gather", "tread_gather shared", "tread_scatter",
       "chunked_feed_forward", "linear_attention", "linear_attention per-sample"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    no_wheels = tmp_path_factory.mktemp("no_wheels")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--wheels", str(no_wheels)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    return r, out


def test_dry_run_passes_and_prints_the_table_last(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert md == render(report)
    tail = r.stdout.strip().splitlines()
    assert tail[-1].startswith("wrote ") and "benchmarks/results/cpu-" in tail[-1]
    assert md.strip().splitlines()[-1] in tail  # the tables come last, just before that line
    assert report["env"]["torch"] and report["dry_run"] and report["isolate"] == "fork"


def test_dry_run_every_part_wrote_its_rows(dry_run):
    _, out = dry_run
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(parts) == [name for name, _, _ in PARTS]
    for name, p in parts.items():
        assert p["status"] == "ok" and p["rows"], (name, p["error"])
        assert json.loads((out / "parts" / f"{name}.json").read_text())["rows"] == p["rows"]
    rows = {name: {r["case"]: r for r in p["rows"]} for name, p in parts.items()}
    assert set(rows["kernels"]) >= {f"{op} {dt}" for op in OPS for dt in ("fp32", "bf16")}
    assert all(r["ok"] for r in rows["kernels"].values())
    assert rows["kernels"]["torch.compile fullgraph: Wan block in a TREAD route, bf16"]["values"]["checks"] == 3
    speed = rows["speed"]
    assert speed["device copy (the bandwidth reference)"]["values"]["GB_s"] > 0
    for op in ("rope", "qk_norm_rope", "rms_norm", "modulate", "gated_residual", "tread_scatter 0.5"):
        v = speed[op]["values"]
        assert v["fwd_ms"] > 0 and v["torch_fb_ms"] > 0 and v["fb_GB_s"] > 0, op
    assert [r["ok"] for r in rows["parity"].values()] == [True, True, True]
    step = rows["step"]
    assert list(step) == ["diffusers+peft", "vidtune", "vidtune+tread0.5", "vidtune+chunked_ff", "vidtune+compile"]
    assert all(r["values"]["s_step"] > 0 for r in step.values())
    assert step["vidtune"]["values"]["first_loss_rel_diff"] < 0.01  # same weights: the same loss
    assert step["vidtune"]["values"]["plan_GiB"] > 0 and "compile_s" in step["vidtune+compile"]["values"]
    off = rows["offload"]["offloaded == resident (output, LoRA grads)"]
    assert off["ok"] and off["values"]["bit_identical"]
    assert "native streamer: cmake build" in rows["offload"]
    int8 = rows["int8"]["int8 base"]
    assert int8["ok"] and int8["values"]["output_snr_db"] > 20
    assert int8["values"]["weights_GiB"] < rows["int8"]["bf16 base"]["values"]["weights_GiB"]


def test_a_part_past_its_time_box_is_killed_and_the_next_one_runs(tmp_path):
    """Spawned parts (the GPU mode) with boxes too short to even import torch: each is killed,
    recorded as a timeout, and the check goes on and still writes its report."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--isolate", "spawn",
                        "--parts", "kernels,parity", "--box-scale", "0.012", "--out", str(tmp_path / "out"),
                        "--wheels", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]
    parts = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]
    assert {n: p["status"] for n, p in parts.items()} == {"kernels": "timeout", "parity": "timeout"}
    assert "## parity: timeout" in (tmp_path / "out" / "gpu_check.md").read_text()


def _wheel(path: Path, name: str, version: str, files: dict) -> Path:
    whl = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return whl


def test_install_wheels_fills_gaps_and_never_shadows_newer(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "vt_fake_pkg", "1.0", {"vt_fake_pkg/__init__.py": "X = 1\n",
                                          "vt_fake_pkg-1.0.data/purelib/vt_fake_extra.py": "Y = 2\n"})
    _wheel(wheels, "pytest", "0.1", {"pytest/__init__.py": "raise ImportError('shadowed')\n"})
    used = {u["name"]: u["used"] for u in install_wheels(wheels, site)}
    assert used["vt_fake_pkg"] == "wheel"
    assert used["pytest"].startswith("machine's ")  # the machine's newer pytest wins
    assert (site / "vt_fake_pkg" / "__init__.py").exists() and (site / "vt_fake_extra.py").exists()
    assert not (site / "pytest").exists()
    _wheel(wheels, "torch", "99.0", {"torch/__init__.py": ""})
    with pytest.raises(SystemExit, match="never installs torch"):
        install_wheels(wheels, site)


def test_hidden_modules_are_neither_importable_nor_installed():
    code = ("import importlib.metadata as m, importlib.util as u\n"
            "from vidtune.bench.gpu_check.runner import hide_modules\n"
            "hide_modules({'pytest': 'pytest'})\n"
            "assert u.find_spec('pytest') is None\n"
            "try:\n    m.version('pytest')\nexcept m.PackageNotFoundError:\n    pass\nelse:\n    raise SystemExit(1)\n"
            "try:\n    import pytest\nexcept ModuleNotFoundError:\n    print('hidden')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "hidden", r.stderr


def test_wheel_script_pins_what_the_image_lacks_and_never_torch():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh"), "--list"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    pins = dict(line.split("==") for line in r.stdout.split())
    assert {"diffusers", "torchao", "pillow", "requests", "huggingface-hub"} <= set(pins)
    assert pins["diffusers"].startswith("0.42.")  # the numerical reference the tests use
    assert not any(n.startswith(("torch", "triton", "nvidia")) and n != "torchao" for n in pins)
    assert not set(pins) & set(HIDDEN.values())  # what the check must do without is never shipped
