"""CPU demo of the Wan transformer: parity with diffusers and what the fused path saves.

Builds a small random Wan checkpoint with diffusers, saves it in the diffusers layout, loads it
with ``vidtune.models.from_pretrained`` and runs forward + backward on both, then with a TREAD
route and with chunked feed-forward. No downloads; about a minute on 2 CPU cores.

    vidtune-demo [--out DIR]        (or: vidtune demo, python -m vidtune.cli.demo)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vidtune.config import resolve_routes
from vidtune.measure.counters import count

ROUTE = [{"selection_ratio": 0.5, "start_layer": 1, "end_layer": -2}]

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=256, freq_dim=256, ffn_dim=1536, num_layers=6,
)


def _step(model, fn):
    out = fn()
    out.float().pow(2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the tiny checkpoint is written (default: a temp dir)")
    args = ap.parse_args(argv)

    from diffusers import WanTransformer3DModel

    from vidtune.models import from_pretrained

    torch.manual_seed(0)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="vidtune-demo-"))
    ref = WanTransformer3DModel(**CONFIG).train()
    ref.save_pretrained(out_dir / "transformer")
    ours = from_pretrained(out_dir).train()
    print(f"checkpoint: {out_dir / 'transformer'} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params)")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 5, 32, 48, generator=g)  # 5 x 16 x 24 = 1,920 video tokens
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 512, CONFIG["text_dim"], generator=g)
    runs = {
        "diffusers": (ref, lambda: ref(x, t, ctx, return_dict=False)[0]),
        "vidtune": (ours, lambda: ours(x, t, ctx)),
        "vidtune + TREAD 0.5 (layers 1..-2)": (
            ours, lambda: ours(x, t, ctx, routes=resolve_routes(ROUTE, len(ours.blocks)),
                               generator=torch.Generator().manual_seed(0))),
    }
    results = {}
    print(f"{'run':<36}{'seconds':>9}{'GFLOP':>9}{'peak MiB':>10}{'materialised MiB':>18}")
    for name, (model, fn) in runs.items():
        c, _ = count(lambda: _step(model, fn), existing=[*model.parameters(), x, t, ctx])
        t0 = time.perf_counter()
        results[name] = _step(model, fn)
        dt = time.perf_counter() - t0
        print(f"{name:<36}{dt:9.2f}{c.flops / 1e9:9.1f}{c.peak_live_bytes / 2**20:10.1f}{c.materialized_bytes / 2**20:18.1f}")
    (o_ref, g_ref), (o_ours, g_ours) = results["diffusers"], results["vidtune"]
    rel_out = ((o_ours - o_ref).norm() / o_ref.norm()).item()
    rel_grad = ((g_ours - g_ref).norm() / g_ref.norm()).item()
    print(f"vidtune vs diffusers: output rel. error {rel_out:.2e}, parameter-gradient rel. error {rel_grad:.2e}")
    ok = rel_out < 1e-4 and rel_grad < 1e-4
    print("parity OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
