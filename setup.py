"""Package layout and the optional native build. Metadata lives in pyproject.toml.

`kernels/` installs under the import name `vidtune_kernels` so the fused ops can be used without
the trainer. The native streamer (csrc/streamer) is pybind11-only: no torch headers and no torch
in the build requirements. VIDTUNE_SKIP_NATIVE=1 skips it entirely.
"""
import os
import shutil
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError


STREAMER = "csrc/streamer"


def _nvcc():
    if os.environ.get("VIDTUNE_SKIP_CUDA") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return cand if cand and os.path.exists(cand) else None


def _cuda_home(nvcc):
    """The toolkit root: CUDA_HOME, else next to nvcc, else /usr/local/cuda (nvcc may be a shim)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for c in filter(None, cands):
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return cands[2]


def _gencode_flags():
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6;9.0+PTX") -> nvcc -gencode flags; default sm_80 + PTX."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0+PTX").replace(",", ";").replace(" ", ";")
    flags = []
    for a in filter(None, archs.split(";")):
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def native_extensions():
    """vidtune._native (CPU backend, always) and vidtune._native_cuda (whenever nvcc is found).

    The CUDA backend is its own module, linked to the static cudart, so vidtune._native imports on
    machines without a CUDA driver; it is optional: a failed nvcc build leaves the CPU module.
    Build it with the toolkit that matches torch.version.cuda.
    """
    if os.environ.get("VIDTUNE_SKIP_NATIVE") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # only outside an isolated build; pyproject's build requires has pybind11
        print("vidtune: pybind11 not found, building without the native streamer")
        return []
    common = dict(include_dirs=[STREAMER], cxx_std=17, extra_compile_args=["-O2"])
    exts = [
        Pybind11Extension(
            "vidtune._native",
            [f"{STREAMER}/bindings.cpp", f"{STREAMER}/streamer.cpp"],
            define_macros=[("VIDTUNE_MODULE_NAME", "_native")],
            **common,
        )
    ]
    nvcc = _nvcc()
    if nvcc:
        cuda_home = _cuda_home(nvcc)
        ext = Pybind11Extension(
            "vidtune._native_cuda",
            [f"{STREAMER}/bindings.cpp", f"{STREAMER}/streamer.cpp"],
            define_macros=[("VIDTUNE_MODULE_NAME", "_native_cuda"), ("VIDTUNE_WITH_CUDA", None)],
            library_dirs=[os.path.join(cuda_home, "lib64")],
            libraries=["cudart_static", "dl", "rt"],
            **common,
        )
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        ext.cuda_sources = [f"{STREAMER}/streamer_cuda.cu"]
        ext.nvcc = nvcc
        ext.optional = True
        exts.append(ext)
    return exts


class BuildExt(build_ext):
    """build_ext that first compiles an extension's `cuda_sources` with nvcc."""

    def build_extension(self, ext):
        for src in getattr(ext, "cuda_sources", []):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            os.makedirs(self.build_temp, exist_ok=True)
            cmd = [ext.nvcc, "-c", src, "-o", obj, "-O2", "-std=c++17", "-Xcompiler", "-fPIC",
                   f"-I{STREAMER}"] + _gencode_flags()
            print(" ".join(cmd))
            if subprocess.call(cmd) != 0:
                raise CompileError(f"nvcc failed on {src} (VIDTUNE_SKIP_CUDA=1 skips the CUDA backend)")
            ext.extra_objects.append(obj)
        super().build_extension(ext)


setup(
    packages=find_packages(include=["vidtune", "vidtune.*"]) + ["vidtune_kernels"],
    package_dir={"vidtune_kernels": "kernels"},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": BuildExt},
)
