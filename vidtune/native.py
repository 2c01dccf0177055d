"""The one place that imports the compiled streamer (csrc/streamer). Never fails at import.

``HAS_NATIVE`` says whether ``vidtune._native`` (CPU backend) loaded, ``NATIVE_REASON`` why not.
The CUDA backend lives in its own module, ``vidtune._native_cuda``, imported only on request
(:func:`native_module` with ``cuda=True``) so machines without a CUDA driver never touch it.
"""
from __future__ import annotations

import importlib

REBUILD = 'pip install -e ".[dev]" --no-build-isolation  (or: VIDTUNE_SKIP_CUDA=1 to build the CPU core only)'

_native = None
try:
    _native = importlib.import_module("vidtune._native")
    HAS_NATIVE = True
    NATIVE_REASON = ""
except Exception as e:  # ImportError, or a broken build: report, never raise at import
    HAS_NATIVE = False
    NATIVE_REASON = f"vidtune._native did not load ({type(e).__name__}: {e})"

_native_cuda = None
_cuda_reason = ""


def native_module(cuda: bool = False):
    """The compiled module, or RuntimeError naming the rebuild command."""
    global _native_cuda, _cuda_reason
    if not cuda:
        if _native is None:
            raise RuntimeError(f"{NATIVE_REASON}. Rebuild it with: {REBUILD}")
        return _native
    if _native_cuda is None and not _cuda_reason:
        try:
            _native_cuda = importlib.import_module("vidtune._native_cuda")
        except Exception as e:
            _cuda_reason = (f"vidtune._native_cuda did not load ({type(e).__name__}: {e}); it is built "
                            "only where nvcc is found, with the toolkit matching torch.version.cuda")
    if _native_cuda is None:
        raise RuntimeError(f"{_cuda_reason}. Rebuild it with: {REBUILD}")
    return _native_cuda


def native_cuda_available() -> tuple[bool, str]:
    """(available, reason): whether the CUDA streamer module loads here."""
    try:
        native_module(cuda=True)
        return True, ""
    except RuntimeError as e:
        return False, str(e)
