"""Run by tests/integration/test_distributed.py under torchrun: the tiny Wan model under each
parallel layout against the same model on one rank (fp32): forward output and gradients.

    torchrun --nproc_per_node=W dist_model_check.py OUT_DIR data:sequence [data:sequence ...]

Every rank builds the same weights and the same whole batch; data-parallel rank ``d`` of ``D``
feeds samples ``d, d + D, ...`` one by one (its sequence group splits their tokens), so the
data-parallel average of the ranks' losses is the one-rank loss over the whole batch. Each rank writes its largest
relative errors to OUT_DIR/<layout>-rank<r>.json.
"""
import copy
import json
import sys
from pathlib import Path

import torch

from vidtune.config import ParallelConfig
from vidtune.distributed import apply_data_parallel, apply_sequence_parallel, init_parallel, shutdown
from vidtune.testing import tiny_wan_inputs, tiny_wan_transformer

ROUTES = [(0.5, 1, 2)]  # TREAD: the routing must be identical on every rank of a sequence group


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def forward_backward(model, x, t, ctx, weight, samples) -> dict[int, torch.Tensor]:
    """Each sample on its own (TREAD draws per call), the loss the mean over ``samples``."""
    outs = {}
    for i in samples:
        out = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], routes=ROUTES, generator=torch.Generator().manual_seed(7))
        ((out * weight[i:i + 1]).mean() / len(samples)).backward()
        outs[i] = out.detach()
    return outs


def main(out_dir: str, layouts: list[str]) -> None:
    base = tiny_wan_transformer(seed=0)
    x, t, ctx = tiny_wan_inputs(b=2, f=3, h=2, w=6)  # 3 x 1 x 3 = 9 tokens: an uneven split
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(base)
    ref_out = forward_backward(ref, x, t, ctx, weight, range(len(x)))
    for layout in layouts:
        data, sequence = layout.split(":")
        par = init_parallel(ParallelConfig(data=data, sequence=int(sequence), timeout_s=120))
        model = copy.deepcopy(base)
        apply_sequence_parallel(model, par)
        step = apply_data_parallel(model, par)
        outs = forward_backward(step, x, t, ctx, weight, range(par.dp_rank, len(x), par.dp))
        errors = {"output": max(rel(o, ref_out[i]) for i, o in outs.items())}
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errors[n] = rel(g, q.grad)
        worst = max(errors, key=errors.get)
        Path(out_dir, f"{data}-{sequence}-rank{par.rank}.json").write_text(
            json.dumps({"worst": worst, "error": errors[worst], "grads": len(errors) - 1}))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
