"""Part "offload": the native streamer built on this machine, and block offload on a real device.

1. Build: cmake builds ``vidtune._native`` and, with nvcc, ``vidtune._native_cuda`` (pybind11 +
   the CUDA runtime, as CI compiles csrc/) for this GPU's architecture into ``DIR/.build/native``;
   the part imports them from there, ahead of any other build. The dry run only configures (the
   compile takes minutes on two cores) and uses the build pip made, unless ``--build-native``;
   without cmake or pybind11 it says so and goes on.
2. Offloaded == resident: a stack of Wan 14B blocks (full width, 4 blocks, frozen bf16 base, LoRA
   rank 16) built by ``vidtune.build`` twice with the same weights, resident and with block
   offload (1 block per group, prefetch 1, native streamer, pinned host RAM): output and LoRA grads
   must be bit-identical. Should the resident step itself differ from run to run (atomics in an
   attention backward), the offloaded difference must stay within that run-to-run difference.
3. Speed: steps of both interleaved and event-timed. The bytes the streamer copies per step over
   the measured pinned host -> device bandwidth give its copy time; overlap = 1 - (t_offloaded -
   t_resident) / copy time: 1 when every copy hides behind compute.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import built_on, copy_seconds, gib, median, peak_above, randn, spread, tensor_bytes, time_once

OFFLOAD = {
    "toy": dict(arch=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=32, freq_dim=16),
                blocks=4, latent=(1, 8, 14), text_len=16, reps=1),
    "full": dict(arch=None, blocks=4, latent=(21, 60, 104), text_len=512, reps=3),
}


def _run(cmd, env, timeout) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed:\n" + "\n".join(tail))
    return time.monotonic() - t0, r.stdout


def build_native(ctx) -> None:
    """Configure (and on a GPU build) the native modules with cmake; record one row."""
    import vidtune

    case = "native streamer: cmake build"
    if ctx.path is None:  # the cuda tests: use the modules pip built
        ctx.row(case, None, built="no (using the installed modules)")
        return
    cmake = shutil.which("cmake")
    missing = "cmake" if cmake is None else None
    if missing is None and importlib.util.find_spec("pybind11") is None:
        missing = "pybind11"
    build_all = ctx.full or os.environ.get("VIDTUNE_GPU_CHECK_BUILD_NATIVE") == "1"
    if missing:
        if build_all:
            raise RuntimeError(f"{missing} is missing: the native streamer cannot be built (pip install {missing})")
        ctx.row(case, None, built=f"skipped: {missing} is not installed")
        return
    repo = Path(vidtune.__file__).resolve().parents[1]
    build = ctx.path.parent.parent / ".build" / "native"
    env = dict(os.environ)
    args = [cmake, "-S", repo, "-B", build, f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
        args += ["-G", "Ninja"]
    if ctx.cuda:
        major, minor = torch.cuda.get_device_capability(ctx.device)
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}")
    else:
        env["VIDTUNE_SKIP_CUDA"] = "1"  # no device to run CUDA code on
    configure_s, _ = _run(args, env, 300)
    if not build_all:
        ctx.row(case, None, built="configured only (dry run)", configure_s=configure_s)
        return
    targets = ["_native"] + (["_native_cuda"] if ctx.cuda else [])
    build_s, _ = _run([cmake, "--build", build, "-j", str(os.cpu_count() or 2), "--target", *targets], env, 600)
    if "vidtune.native" in sys.modules:
        raise RuntimeError("vidtune.native was imported before the build: run this part in a process of its own")
    vidtune.__path__.insert(0, str(build))  # these modules, ahead of any pip build in the source tree
    from vidtune import native

    mod = native.native_module(cuda=ctx.cuda)
    if Path(mod.__file__).resolve().parent != build.resolve():
        raise RuntimeError(f"imported {mod.__file__}, not the module just built in {build}")
    ctx.row(case, True, built=", ".join(targets), configure_s=configure_s, build_s=build_s,
            backends=",".join(mod.BACKENDS), module=Path(mod.__file__).name)


def offload(ctx) -> None:
    with ctx.guard("native streamer: cmake build"):
        build_native(ctx)
    from vidtune.build import architecture, build_training_model
    from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig, OffloadConfig
    from vidtune.models.wan import WanConfig

    sz = OFFLOAD[ctx.size]
    model_cfg = ModelConfig(flavour="t2v-480p-14b-2.1", dtype="bf16")
    arch = WanConfig(**sz["arch"]) if sz["arch"] else architecture(model_cfg)
    adapter = AdapterConfig(type="lora", rank=16, alpha=16.0)
    backend = "native" if ctx.cuda or ctx.path is None else "auto"

    def build(offloaded: bool):
        memory = MemoryConfig(gradient_checkpointing=False, offload=OffloadConfig(
            type="block_level" if offloaded else "none", blocks_per_group=1, use_stream=True, prefetch_depth=1,
            backend=backend))
        torch.manual_seed(0)  # the same random weights for both
        with built_on(ctx.device):
            return build_training_model(model_cfg, adapter, memory, CompileConfig(enabled="off"), ctx.device,
                                        init="random", arch=arch, num_layers=sz["blocks"], seed=1)

    resident, offloaded = build(False), build(True)
    off = offloaded.offload
    f, h, w = sz["latent"]
    x = randn((1, arch.in_channels, f, h, w), ctx.device, torch.bfloat16, 1)
    t = torch.full((1,), 500.0, device=ctx.device)
    text = randn((1, sz["text_len"], arch.text_dim), ctx.device, torch.bfloat16, 2)

    def run(built):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            out = built.model(x, t, text)
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in built.trainable.items()}
        for p in built.params:
            p.grad = None
        return out.detach(), grads

    def diff(a, b) -> float:
        return max([(a[0].float() - b[0].float()).abs().max().item()]
                   + [(a[1][n].float() - b[1][n].float()).abs().max().item() for n in a[1]])

    r1, r2, o1 = run(resident), run(resident), run(offloaded)
    noise = diff(r1, r2)
    d = diff(r1, o1)
    exact = noise == 0 and d == 0
    ctx.row("offloaded == resident (output, LoRA grads)", exact or (noise > 0 and d <= noise),
            bit_identical=exact, max_abs_diff=d, resident_run_to_run=noise, backend=off.stats()["backend"],
            groups=len(off.groups), group_MiB=max(off.group_bytes) / 2**20)

    times = {"resident": [], "offloaded": []}
    peaks = {"resident": [], "offloaded": []}
    copied = []
    for _ in range(sz["reps"]):
        for name, built in (("resident", resident), ("offloaded", offloaded)):
            off.reset_stats()
            with peak_above(ctx.device, peaks[name]):
                s, _ = time_once(lambda: run(built), ctx.device)
            times[name].append(s)
            if name == "offloaded":
                copied.append(off.stats()["bytes_copied"])
    t_res, t_off = median(times["resident"]), median(times["offloaded"])
    bw = max(off.group_bytes) / copy_seconds(max(off.group_bytes), ctx.device, 5, from_host=True)
    io_s = median(copied) / bw
    for name, built in (("resident", resident), ("offloaded", offloaded)):
        held = tensor_bytes(p for p in built.model.parameters() if p.numel()) + sum(
            s.numel() for s in (off.streamer.slot_tensors() if name == "offloaded" else []))
        peak = max(peaks[name]) if peaks[name][0] is not None else None
        values = dict(s_step=median(times[name]), spread=spread(times[name]), weights_on_device_GiB=gib(held),
                      step_peak_GiB=gib(held + peak) if peak is not None else None)
        if name == "offloaded":
            values.update(vs_resident=t_off / t_res, copied_GiB_per_step=gib(median(copied)),
                          host_to_device_GB_s=bw / 1e9, copy_s=io_s, overlap=1 - max(t_off - t_res, 0.0) / io_s)
        ctx.row(f"{arch.num_attention_heads * arch.attention_head_dim}-wide blocks x{sz['blocks']}, {name}", None,
                tokens=f * (h // 2) * (w // 2), **values)
    off.remove()
