"""The native streamer: module import, the C++ unit tests (cmake + ctest), CUDA sources compile."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidtune import native
from vidtune.memory import streamer as st

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "native-tests"
SRC = ROOT / "csrc" / "streamer"


def test_native_module_built_and_imports():
    if os.environ.get("VIDTUNE_SKIP_NATIVE") == "1":
        pytest.skip("VIDTUNE_SKIP_NATIVE=1")
    assert native.HAS_NATIVE, native.NATIVE_REASON
    assert "cpu" in native.native_module().BACKENDS


@pytest.fixture(scope="session")
def cpp_build():
    """Configure once (cached in build/native-tests), rebuild only what changed."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    env = {**os.environ, "VIDTUNE_SKIP_CUDA": "1"}
    if not (BUILD / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), "-DVIDTUNE_BUILD_PYTHON=OFF",
                        f"-DPython_EXECUTABLE={sys.executable}"], check=True, env=env, capture_output=True)
    subprocess.run(["cmake", "--build", str(BUILD), "--target", "test_streamer", "-j2"], check=True, env=env,
                   capture_output=True)
    return BUILD


def test_cpp_core_unit_tests(cpp_build):
    r = subprocess.run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed" in r.stdout


def test_cuda_sources_compile():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    obj = BUILD / "streamer_cuda_ci.o"
    srcs = [SRC / "streamer_cuda.cu", SRC / "streamer_cuda.h", SRC / "streamer.h"]
    if obj.exists() and obj.stat().st_mtime > max(s.stat().st_mtime for s in srcs):
        return  # compiled from these sources already
    obj.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([nvcc, "-c", str(SRC / "streamer_cuda.cu"), "-o", str(obj), "-std=c++17",
                        "-Xcompiler", "-fPIC", f"-I{SRC}", "-gencode", "arch=compute_80,code=sm_80"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_explicit_native_missing_errors_with_rebuild_command(monkeypatch):
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "NATIVE_REASON", "vidtune._native did not load (test)")
    with pytest.raises(RuntimeError, match="pip install -e"):
        st.make_streamer("native", 2, 4096)


def test_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "NATIVE_REASON", "vidtune._native did not load (test)")
    with caplog.at_level(logging.INFO, logger="vidtune.offload"):
        s = st.make_streamer("auto", 2, 4096)
    assert s.backend == "python"
    assert len([r for r in caplog.records if r.name == "vidtune.offload"]) == 1


@pytest.mark.parametrize("backend", ["native", "python"])
def test_streamer_state_machine_and_disk_tier(backend, tmp_path):
    s = st.make_streamer(backend, 2, 10_000)
    a, b, c = s.add_group(10_000), s.add_group(3_000), s.add_group(5_000)
    for g in (a, b, c):
        s.host_tensor(g).copy_(torch.arange(s.host_tensor(g).numel()) * (g + 3) % 251)
    want = {g: s.host_tensor(g).clone() for g in (a, b, c)}
    s.spill(c, str(tmp_path / "c.bin"))
    assert s.state(a) == st.EVICTED
    assert s.load(a) and not s.load(a)
    assert s.state(a) in (st.IN_FLIGHT, st.RESIDENT)
    s.load(b)
    with pytest.raises(RuntimeError, match="no free slot"):
        s.load(c)
    assert torch.equal(s.wait(a)[:10_000], want[a]) and s.state(a) == st.RESIDENT
    s.evict(a)
    s.load(c)
    assert torch.equal(s.wait(c)[:5_000], want[c])
    assert torch.equal(s.wait(b)[:3_000], want[b])
    stats = s.stats()
    assert stats["bytes_copied"] == 18_000 and stats["bytes_read_disk"] == 5_000 and stats["loads"] == 3
    assert stats["peak_resident_bytes"] == 2 * s.slot_bytes


def test_cpu_and_cuda_modules_load_in_one_process():
    """Both modules are built from bindings.cpp; with global pybind11 types the second import
    failed ("GroupState is already registered"), as the first H200 run of the GPU check showed."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("vidtune._native_cuda") is None:
        pytest.skip("vidtune._native_cuda was not built (no nvcc at install)")
    cpu, cuda = importlib.import_module("vidtune._native"), importlib.import_module("vidtune._native_cuda")
    assert cpu.BACKENDS == ("cpu",) and "cuda" in cuda.BACKENDS
    assert cpu.GroupState is not cuda.GroupState  # each module owns its types
