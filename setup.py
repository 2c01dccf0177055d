"""Package layout and the optional native build. Metadata lives in pyproject.toml.

`kernels/` installs under the import name `vidtune_kernels` so the fused ops can be used without
the trainer. The native streamer (csrc/streamer) is pybind11-only: no torch headers and no torch
in the build requirements. VIDTUNE_SKIP_NATIVE=1 skips it entirely.
"""
import os

from setuptools import find_packages, setup


def native_extensions():
    if os.environ.get("VIDTUNE_SKIP_NATIVE") == "1":
        return []
    return []


setup(
    packages=find_packages(include=["vidtune", "vidtune.*"]) + ["vidtune_kernels"],
    package_dir={"vidtune_kernels": "kernels"},
    ext_modules=native_extensions(),
)
