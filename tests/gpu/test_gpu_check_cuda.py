"""The GPU check's assertions on a CUDA device, at the dry run's small sizes (seconds, not the
8-minute full check): Triton kernels vs the references and fullgraph compile through the custom
ops, model parity with diffusers, offloaded == resident with the native CUDA streamer, int8 SNR,
and the step part's variants all running. Skipped without a device.

    TRITON_INTERPRET=0 python -m pytest -m cuda tests/gpu

(tests/conftest.py turns the Triton interpreter on for the CPU tests unless told otherwise.)
"""
import os

import pytest
import torch

from vidtune.bench.gpu_check import kernels, model, offload
from vidtune.bench.gpu_check.common import Context

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: run with TRITON_INTERPRET=0"),
]


def _rows(part, fn):
    ctx = Context(part, "cuda", "toy")
    fn(ctx)
    return {r["case"]: r for r in ctx.rows}


def test_kernels_match_references_and_compile_fullgraph():
    rows = _rows("kernels", kernels.correctness)
    bad = {case: r["values"] for case, r in rows.items() if not r["ok"]}
    assert not bad, bad
    assert rows["torch.compile fullgraph: Wan block in a TREAD route, bf16"]["values"]["backend"] == "inductor"


def test_kernel_speed_rows():
    rows = _rows("speed", kernels.speed)
    assert all(r["ok"] is not False for r in rows.values()), rows
    assert rows["rope"]["values"]["fwd_ms"] > 0 and rows["device copy (the bandwidth reference)"]["values"]["GB_s"] > 1


def test_model_parity_with_diffusers():
    rows = _rows("parity", model.parity)
    assert all(r["ok"] for r in rows.values()), rows


def test_offloaded_equals_resident_with_the_cuda_streamer():
    rows = _rows("offload", offload.offload)
    eq = rows["offloaded == resident (output, LoRA grads)"]
    assert eq["ok"] and eq["values"]["backend"] == "native", eq


def test_step_variants_and_int8():
    rows = _rows("step", model.step)
    assert all(r["ok"] is not False for r in rows.values()), rows
    assert rows["vidtune"]["values"]["first_loss_rel_diff"] < 0.01
    assert rows["vidtune"]["values"]["peak_GiB"] > 0
    int8 = _rows("int8", model.int8)["int8 base"]
    assert int8["ok"], int8
