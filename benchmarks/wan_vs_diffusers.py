"""Wan transformer forward+backward: vidtune vs diffusers on the same weights, in the same run.

Bench config (documented in benchmarks/README.md): a Wan block stack big enough to be
compute-bound on a CPU — dim 512 (4 heads x 128), ffn 3072 (Wan's ~6x ratio), 8 layers,
text_dim 512 with 512 context tokens, latents 16 x 7 x 24 x 40 -> 1,680 video tokens, batch 1, fp32.

Reports, per variant: median step time (and the ratio to diffusers), FLOPs, peak live bytes of
the step, and bytes materialised by one block (fwd+bwd). Variants: diffusers, vidtune,
vidtune + TREAD route 0.5 over layers 2..-2, vidtune + chunked FF (512 tokens per chunk).

    python benchmarks/wan_vs_diffusers.py [--repeats 7] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vidtune.bench.counters import count, count_train_step
from vidtune.models.wan import WanConfig, WanTransformer

BENCH = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=512, freq_dim=256, ffn_dim=3072, num_layers=8, cross_attn_norm=True,
)
LATENT = (1, 16, 7, 24, 40)
TEXT_LEN = 512
ROUTE = [{"selection_ratio": 0.5, "start_layer": 2, "end_layer": -2}]
CHUNK = 512


def build(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**BENCH).train()
    ours = WanTransformer(WanConfig(**BENCH)).train()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*LATENT, generator=g), torch.tensor([500.0]),
            torch.randn(1, TEXT_LEN, BENCH["text_dim"], generator=g))


def variants(ref, ours):
    def diffusers_step(x, t, ctx):
        return ref(x, t, ctx, return_dict=False)[0]

    def ours_step(x, t, ctx):
        return ours(x, t, ctx)

    def tread_step(x, t, ctx):
        return ours(x, t, ctx, routes=ROUTE, generator=torch.Generator().manual_seed(0))

    def chunked_step(x, t, ctx):
        ours.set_ff_chunk_size(CHUNK)
        try:
            return ours(x, t, ctx)
        finally:
            ours.set_ff_chunk_size(None)

    return {"diffusers": (ref, diffusers_step), "vidtune": (ours, ours_step),
            "vidtune+tread0.5": (ours, tread_step), "vidtune+chunked_ff": (ours, chunked_step)}


def step(model, fn, inputs):
    out = fn(*inputs)
    out.float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def block_bytes(ref, ours, inputs):
    """Bytes materialised by block 1's fwd+bwd, both implementations, same block inputs."""
    captured = {}

    def grab(name):
        def hook(mod, args, kwargs):
            captured[name] = (args, kwargs)
        return hook

    h1 = ref.blocks[1].register_forward_pre_hook(grab("diffusers"), with_kwargs=True)
    h2 = ours.blocks[1].register_forward_pre_hook(grab("vidtune"), with_kwargs=True)
    with torch.no_grad():
        ref(*inputs, return_dict=False)
        ours(*inputs)
    h1.remove(), h2.remove()
    out = {}
    for name, model in (("diffusers", ref), ("vidtune", ours)):
        args, kwargs = captured[name]
        x = args[0].detach().clone().requires_grad_(True)
        rest = args[1:]
        block = model.blocks[1]
        existing = [x, *block.parameters(), *[a for a in rest if isinstance(a, torch.Tensor)]]
        existing += [a for r in rest if isinstance(r, tuple) for a in r]

        def run():
            block(x, *rest, **kwargs).float().pow(2).mean().backward()

        c, _ = count(run, existing=existing)
        block.zero_grad(set_to_none=True)
        out[name] = c
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref, ours = build()
    inputs = make_inputs()
    vs = variants(ref, ours)

    rows = {}
    for name, (model, fn) in vs.items():
        c, _ = count(lambda: step(model, fn, inputs), existing=[*model.parameters(), *inputs])
        rows[name] = {"flops": c.flops, "peak_live_bytes": c.peak_live_bytes, "materialized_bytes": c.materialized_bytes}

    for model, fn in vs.values():  # warm-up
        step(model, fn, inputs)
    times = {name: [] for name in vs}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, (model, fn) in vs.items():
            t0 = time.perf_counter()
            step(model, fn, inputs)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["diffusers"])
    for name in vs:
        med = statistics.median(times[name])
        rows[name].update(step_s=med, ratio_vs_diffusers=med / base)

    blk = block_bytes(ref, ours, inputs)
    rows["diffusers"]["block_materialized_bytes"] = blk["diffusers"].materialized_bytes
    rows["vidtune"]["block_materialized_bytes"] = blk["vidtune"].materialized_bytes

    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    print(f"bench config: dim 512, 8 layers, ffn 3072, {tokens} video tokens, {TEXT_LEN} text tokens, fp32, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'variant':<22}{'step s':>9}{'ratio':>8}{'GFLOP':>10}{'peak MiB':>10}{'mat. MiB':>10}{'block mat. MiB':>16}")
    for name, r in rows.items():
        blk_s = f"{r['block_materialized_bytes'] / 2**20:16.1f}" if "block_materialized_bytes" in r else f"{'':>16}"
        print(f"{name:<22}{r['step_s']:9.3f}{r['ratio_vs_diffusers']:8.3f}{r['flops'] / 1e9:10.1f}"
              f"{r['peak_live_bytes'] / 2**20:10.1f}{r['materialized_bytes'] / 2**20:10.1f}{blk_s}")
    print(f"block bytes materialised, vidtune / diffusers: "
          f"{rows['vidtune']['block_materialized_bytes'] / rows['diffusers']['block_materialized_bytes']:.3f}")
    print(f"FLOPs with TREAD 0.5 over layers 2..-2 / without: "
          f"{rows['vidtune+tread0.5']['flops'] / rows['vidtune']['flops']:.3f}")
    print("by op, one block (MiB): diffusers",
          {k: round(v / 2**20, 1) for k, v in sorted(blk["diffusers"].materialized_by_op.items(), key=lambda kv: -kv[1])})
    print("by op, one block (MiB): vidtune",
          {k: round(v / 2**20, 1) for k, v in sorted(blk["vidtune"].materialized_by_op.items(), key=lambda kv: -kv[1])})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
