"""Sana Video transformer forward+backward: vidtune vs diffusers on the same weights, in the same run.

Bench config (documented in benchmarks/README.md): a Sana Video block stack at a CPU-sized width —
dim 512 (4 heads x 128), mlp_ratio 3 (Mix-FFN hidden 1536), 6 layers, caption 512 channels with
300 Gemma-length tokens (200 of them padding, masked), latents 16 x 5 x 24 x 40 -> 1,200 video
tokens, batch 1, fp32.

vidtune's models come from ``vidtune.build`` (the trainer's build path), with the diffusers
model's weights loaded into them. Variants, full fine-tune: diffusers, vidtune, vidtune + TREAD
route 0.5 over layers 2..-2 (around the attention only), vidtune + frame-chunked Mix-FFN (2 frames
of 240 tokens + halo per chunk); LoRA rank 16 on q/k/v/out (peft on both sides): diffusers + peft,
vidtune.

Reports, per variant: median step time and its ratio to the diffusers step of the same kind (full
or LoRA), FLOPs, peak live bytes and bytes materialised of the step. Steps of all variants are
interleaved, so drift hits them alike.

    python benchmarks/sana_vs_diffusers.py [--repeats 5] [--threads 2] [--json out.json]
        [--variants diffusers vidtune "diffusers+peft lora" "vidtune lora"]   # only these
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

from vidtune.bench.timing import interleaved_times, peft_lora_copy
from vidtune.build import build_training_model
from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig, resolve_routes
from vidtune.measure.counters import count
from vidtune.models.sana_video import SanaVideoConfig

BENCH = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=128, num_layers=6,
             num_cross_attention_heads=4, cross_attention_head_dim=128, cross_attention_dim=512, caption_channels=512,
             mlp_ratio=3.0, patch_size=(1, 2, 2))
LATENT = (1, 16, 5, 24, 40)
TEXT_LEN, TEXT_VALID = 300, 100
ROUTE = [{"selection_ratio": 0.5, "start_layer": 2, "end_layer": -2}]
CHUNK = 480  # tokens: 2 frames of 12 x 20 per chunk (+ one halo frame each side, where there is one)
LORA = AdapterConfig(rank=16, alpha=16.0)


def ours(adapter: AdapterConfig, ref):
    """vidtune's model of this config through the trainer's build path, with ``ref``'s weights."""
    built = build_training_model(ModelConfig(family="sana_video", flavour="2b-480p", dtype="fp32"), adapter,
                                 MemoryConfig(gradient_checkpointing=False), CompileConfig(enabled="off"), "cpu",
                                 init="random", arch=SanaVideoConfig(**BENCH))
    built.model.load_state_dict(ref.state_dict(), strict=True)
    return built.model


def build(seed=0):
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(seed)
    ref = SanaVideoTransformer3DModel(**BENCH).train()
    ref_lora = peft_lora_copy(ref, LORA)
    return {"diffusers": ref, "vidtune": ours(AdapterConfig(type="full"), ref),
            "diffusers+peft lora": ref_lora, "vidtune lora": ours(LORA, ref_lora)}


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask[:, :TEXT_VALID] = 1
    return dict(hidden_states=torch.randn(*LATENT, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, TEXT_LEN, BENCH["caption_channels"], generator=g),
                encoder_attention_mask=mask)


def variants(models):
    routes = resolve_routes(ROUTE, BENCH["num_layers"])

    def diffusers_step(m):
        return lambda kw: m(**kw, return_dict=False)[0]

    def plain(m):
        return lambda kw: m(**kw)

    def tread_step(kw):
        return models["vidtune"](**kw, routes=routes, generator=torch.Generator().manual_seed(0))

    def chunked_step(kw):
        m = models["vidtune"]
        m.set_ff_chunk_size(CHUNK)
        try:
            return m(**kw)
        finally:
            m.set_ff_chunk_size(None)

    return {"diffusers": (models["diffusers"], diffusers_step(models["diffusers"]), "diffusers"),
            "vidtune": (models["vidtune"], plain(models["vidtune"]), "diffusers"),
            "vidtune+tread0.5": (models["vidtune"], tread_step, "diffusers"),
            "vidtune+chunked_ff": (models["vidtune"], chunked_step, "diffusers"),
            "diffusers+peft lora": (models["diffusers+peft lora"], diffusers_step(models["diffusers+peft lora"]),
                                    "diffusers+peft lora"),
            "vidtune lora": (models["vidtune lora"], plain(models["vidtune lora"]), "diffusers+peft lora")}


def step(model, fn, inputs):
    fn(inputs).float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="time only these variants (with the baselines their ratios need)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, inputs = build(), make_inputs()
    vs = variants(models)
    if args.variants:
        unknown = set(args.variants) - set(vs)
        if unknown:
            ap.error(f"no variant {sorted(unknown)}; there are {list(vs)}")
        keep = set(args.variants) | {vs[n][2] for n in args.variants}
        vs = {n: v for n, v in vs.items() if n in keep}
    tensors = [t for t in inputs.values() if isinstance(t, torch.Tensor)]
    rows = {}
    for name, (model, fn, _) in vs.items():
        step(model, fn, inputs)  # warm-up
        c, _ = count(lambda: step(model, fn, inputs), existing=[*model.parameters(), *tensors])
        rows[name] = c.as_row()
    times = interleaved_times({name: functools.partial(step, model, fn, inputs) for name, (model, fn, _) in vs.items()},
                              args.repeats)
    for name, (_, _, base) in vs.items():
        med = statistics.median(times[name])
        rows[name].update(step_s=med, ratio=med / statistics.median(times[base]), baseline=base,
                          spread=(min(times[name]), max(times[name])))

    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    print(f"bench config: Sana Video dim 512, {BENCH['num_layers']} layers, mlp_ratio 3, {tokens} video tokens, "
          f"{TEXT_LEN} caption tokens ({TEXT_VALID} unmasked), fp32, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats; ratio = step / the diffusers step of its kind")
    print(f"{'variant':<22}{'step s':>9}{'min-max s':>15}{'ratio':>8}{'GFLOP':>10}{'peak MiB':>10}{'mat. MiB':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['step_s']:9.3f}{r['spread'][0]:7.3f}-{r['spread'][1]:.3f}{r['ratio']:8.3f}"
              f"{r['flops'] / 1e9:10.1f}{r['peak_live_bytes'] / 2**20:10.1f}{r['materialized_bytes'] / 2**20:10.1f}")
    if "vidtune+tread0.5" in rows and "vidtune" in rows:
        print(f"FLOPs with TREAD 0.5 over layers 2..-2 (attention only) / without: "
              f"{rows['vidtune+tread0.5']['flops'] / rows['vidtune']['flops']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
