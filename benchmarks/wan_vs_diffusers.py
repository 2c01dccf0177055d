"""Wan transformer forward+backward: vidtune vs diffusers on the same weights, in the same run.

Bench config (documented in benchmarks/README.md): a Wan block stack big enough to be
compute-bound on a CPU — dim 512 (4 heads x 128), ffn 3072 (Wan's ~6x ratio), 8 layers,
text_dim 512 with 512 context tokens, latents 16 x 7 x 24 x 40 -> 1,680 video tokens, batch 1, fp32.

vidtune's models come from ``vidtune.build`` (the trainer's build path), with the diffusers
model's weights loaded into them. Variants, full fine-tune: diffusers, vidtune, vidtune + TREAD
route 0.5 over layers 2..-2, vidtune + chunked FF (512 tokens per chunk), vidtune + apply_compile
(inductor); LoRA rank 16 on q/k/v/out: diffusers + peft, vidtune, vidtune + apply_compile.

Reports, per variant: median step time and its ratio to the diffusers step of the same kind
(full or LoRA), FLOPs, peak live bytes of the step, bytes materialised (block 1, fwd+bwd, for the
two full baselines), and for compiled variants the compile seconds (first step minus a median
step). Steps of all variants are interleaved, so drift hits them alike.

    python benchmarks/wan_vs_diffusers.py [--repeats 7] [--threads 2] [--no-compile] [--json out.json]
    python benchmarks/wan_vs_diffusers.py --saved   # what each step keeps for backward, by op

``--saved``: the four steps (full and LoRA, vidtune and diffusers) at 4 x 12 x 32 = 1,536 video
tokens with the LoRA on q/k/v/out and both feed-forward linears: the counters' live bytes right
after the forward (what backward will read, plus the output), by the op that allocated them.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from vidtune.bench.timing import interleaved_times, peft_lora_copy
from vidtune.build import build_training_model
from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig, resolve_routes
from vidtune.measure.counters import count, counting
from vidtune.models.wan import WanConfig

BENCH = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=512, freq_dim=256, ffn_dim=3072, num_layers=8, cross_attn_norm=True,
)
LATENT = (1, 16, 7, 24, 40)
TEXT_LEN = 512
ROUTE = [{"selection_ratio": 0.5, "start_layer": 2, "end_layer": -2}]
CHUNK = 512
LORA = AdapterConfig(rank=16, alpha=16.0)


def ours(adapter: AdapterConfig, ref, compile_: bool = False):
    """vidtune's model of this config through the trainer's build path, with ``ref``'s weights."""
    built = build_training_model(ModelConfig(dtype="fp32"), adapter, MemoryConfig(gradient_checkpointing=False),
                                 CompileConfig(enabled="on" if compile_ else "off"), "cpu", init="random",
                                 arch=WanConfig(**BENCH))
    built.model.load_state_dict(ref.state_dict(), strict=True)
    return built.model


def build(seed=0, compile_=True, lora=LORA):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**BENCH).train()
    ref_lora = peft_lora_copy(ref, lora)
    models = {"diffusers": ref, "vidtune": ours(AdapterConfig(type="full"), ref),
              "diffusers+peft lora": ref_lora, "vidtune lora": ours(lora, ref_lora)}
    if compile_:
        models["vidtune+compile"] = ours(AdapterConfig(type="full"), ref, compile_=True)
        models["vidtune lora+compile"] = ours(lora, ref_lora, compile_=True)
    return models


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*LATENT, generator=g), torch.tensor([500.0]),
            torch.randn(1, TEXT_LEN, BENCH["text_dim"], generator=g))


def variants(models):
    routes = resolve_routes(ROUTE, BENCH["num_layers"])

    def diffusers_step(m):
        return lambda x, t, ctx: m(x, t, ctx, return_dict=False)[0]

    def plain(m):
        return lambda x, t, ctx: m(x, t, ctx)

    def tread_step(x, t, ctx):
        return models["vidtune"](x, t, ctx, routes=routes, generator=torch.Generator().manual_seed(0))

    def chunked_step(x, t, ctx):
        m = models["vidtune"]
        m.set_ff_chunk_size(CHUNK)
        try:
            return m(x, t, ctx)
        finally:
            m.set_ff_chunk_size(None)

    out = {"diffusers": (models["diffusers"], diffusers_step(models["diffusers"]), "diffusers"),
           "vidtune": (models["vidtune"], plain(models["vidtune"]), "diffusers"),
           "vidtune+tread0.5": (models["vidtune"], tread_step, "diffusers"),
           "vidtune+chunked_ff": (models["vidtune"], chunked_step, "diffusers"),
           "diffusers+peft lora": (models["diffusers+peft lora"], diffusers_step(models["diffusers+peft lora"]),
                                   "diffusers+peft lora"),
           "vidtune lora": (models["vidtune lora"], plain(models["vidtune lora"]), "diffusers+peft lora")}
    if "vidtune+compile" in models:
        out["vidtune+compile"] = (models["vidtune+compile"], plain(models["vidtune+compile"]), "diffusers")
        out["vidtune lora+compile"] = (models["vidtune lora+compile"], plain(models["vidtune lora+compile"]),
                                       "diffusers+peft lora")
    return out


def step(model, fn, inputs):
    out = fn(*inputs)
    out.float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def block_bytes(ref, ours_, inputs):
    """Bytes materialised by block 1's fwd+bwd, both implementations, same block inputs."""
    captured = {}

    def grab(name):
        def hook(mod, args, kwargs):
            captured[name] = (args, kwargs)
        return hook

    h1 = ref.blocks[1].register_forward_pre_hook(grab("diffusers"), with_kwargs=True)
    h2 = ours_.blocks[1].register_forward_pre_hook(grab("vidtune"), with_kwargs=True)
    with torch.no_grad():
        ref(*inputs, return_dict=False)
        ours_(*inputs)
    h1.remove(), h2.remove()
    out = {}
    for name, model in (("diffusers", ref), ("vidtune", ours_)):
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


SAVED_LATENT = (1, 16, 4, 24, 64)
SAVED_LORA = AdapterConfig(rank=16, alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj",
                                                                 "net.2"])


def saved_tables(threads: int) -> dict:
    """Live bytes after the forward of each step, total and by op (MB = 1e6 bytes)."""
    models = build(compile_=False, lora=SAVED_LORA)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(*SAVED_LATENT, generator=g), torch.tensor([500.0]), torch.randn(1, TEXT_LEN, 512, generator=g)
    out = {}
    for name, (model, fn, _) in variants(models).items():
        if name not in ("diffusers", "vidtune", "diffusers+peft lora", "vidtune lora"):
            continue
        with counting([*model.parameters(), *model.buffers(), x, t, ctx]) as c:
            y = fn(x, t, ctx)
            mark = c.mark("forward")
            y.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        out[name] = mark
    tokens = SAVED_LATENT[2] * (SAVED_LATENT[3] // 2) * (SAVED_LATENT[4] // 2)
    print(f"kept for backward (live after forward), dim 512, 8 layers, {tokens} video tokens, {TEXT_LEN} text "
          f"tokens, fp32, LoRA rank 16 on q/k/v/out + both FF linears, {threads} threads; MB = 1e6 bytes")
    ops = sorted({op for m in out.values() for op in m.live_by_op}, key=lambda op: -max(
        m.live_by_op.get(op, 0) for m in out.values()))
    print(f"{'op':<44}" + "".join(f"{n:>22}" for n in out))
    for op in ops:
        print(f"{op:<44}" + "".join(f"{m.live_by_op.get(op, 0) / 1e6:22.1f}" for m in out.values()))
    print(f"{'total':<44}" + "".join(f"{m.live_bytes / 1e6:22.1f}" for m in out.values()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="leave out the apply_compile variants")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--saved", action="store_true", help="only print what each step keeps for backward, by op")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.saved:
        return saved_tables(args.threads)
    models = build(compile_=not args.no_compile)
    inputs = make_inputs()
    vs = variants(models)

    rows = {}
    first = {}
    for name, (model, fn, _) in vs.items():
        t0 = time.perf_counter()
        step(model, fn, inputs)  # warm-up; for compiled variants, the compile
        first[name] = time.perf_counter() - t0
        if "compile" in name:
            continue  # the counters trace eager ops: they would see the compiled graph's internals only
        c, _ = count(lambda: step(model, fn, inputs), existing=[*model.parameters(), *inputs])
        rows[name] = {"flops": c.flops, "peak_live_bytes": c.peak_live_bytes, "materialized_bytes": c.materialized_bytes}
    for name in vs:
        rows.setdefault(name, {})
    times = interleaved_times({name: functools.partial(step, model, fn, inputs) for name, (model, fn, _) in vs.items()},
                              args.repeats)
    for name, (_, _, base) in vs.items():
        med = statistics.median(times[name])
        rows[name].update(step_s=med, ratio=med / statistics.median(times[base]), baseline=base)
        if "compile" in name:
            rows[name]["compile_s"] = first[name] - med

    blk = block_bytes(models["diffusers"], models["vidtune"], inputs)
    rows["diffusers"]["block_materialized_bytes"] = blk["diffusers"].materialized_bytes
    rows["vidtune"]["block_materialized_bytes"] = blk["vidtune"].materialized_bytes

    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    print(f"bench config: dim 512, 8 layers, ffn 3072, {tokens} video tokens, {TEXT_LEN} text tokens, fp32, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats; ratio = step / the diffusers step of its kind")
    mib = lambda r, k: f"{r[k] / 2**20:10.1f}" if k in r else f"{'-':>10}"  # noqa: E731
    print(f"{'variant':<22}{'step s':>9}{'ratio':>8}{'compile s':>11}{'GFLOP':>10}{'peak MiB':>10}{'mat. MiB':>10}"
          f"{'block mat. MiB':>16}")
    for name, r in rows.items():
        comp = f"{r['compile_s']:11.1f}" if "compile_s" in r else f"{'':>11}"
        gflop = f"{r['flops'] / 1e9:10.1f}" if "flops" in r else f"{'-':>10}"
        print(f"{name:<22}{r['step_s']:9.3f}{r['ratio']:8.3f}{comp}{gflop}{mib(r, 'peak_live_bytes')}"
              f"{mib(r, 'materialized_bytes')}{mib(r, 'block_materialized_bytes'):>16}")
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
