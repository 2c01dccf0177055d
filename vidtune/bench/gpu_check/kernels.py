"""Parts "kernels" and "speed": the fused ops of ``vidtune_kernels`` on the device.

kernels: every op's Triton path against ``kernels/reference.py``, forward and every input grad,
fp32 and bf16, at odd shapes (sizes that are not powers of two, non-contiguous views, per-sample
and per-token tables), judged by ``reference.compare`` (fp32: allclose; bf16: the flash-attention
rule). Then one Wan block between a TREAD gather and scatter, compiled with
``torch.compile(fullgraph=True)`` (every custom op inside one graph), against the eager block.

speed: each fused op against the torch sequence it replaces (the reference, or the torch op
diffusers calls: ``F.rms_norm``, ``F.gelu``) at Wan 2.1 1.3B block shapes (32,760 tokens x 1536,
FF 8960), bf16, LoRA-style grads (activations only). Median of event-timed runs, and achieved
GB/s = the bytes the op must move / time, against the measured copy bandwidth (bytes model:
forward reads the inputs and writes the output; forward+backward also reads the output grad and
the saved inputs again and writes the input grads).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .common import copy_seconds, median, randn, tensor_bytes, timed

# (B, S, H, Dh) of the correctness cases: odd sizes reach every mask and stride path.
ODD = {"toy": [(2, 5, 3, 8)], "full": [(2, 37, 3, 24), (1, 1021, 12, 128)]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHUNK = 7  # tokens per chunk of the chunked FF case: not a divisor of any case's token count


def _use_triton() -> None:
    os.environ["VIDTUNE_KERNELS"] = "triton"  # explicit: a missing triton is an error, not a fallback


def correctness_cases(device, dtype, shape):
    """(op, fused, reference, args) of every op at one shape; args as ``reference.compare`` takes them."""
    import vidtune_kernels as K
    from vidtune_kernels import reference as R

    B, S, H, Dh = shape
    D = H * Dh

    def t(shape, seed, dt=dtype, **kw):
        return randn(shape, device, dt, seed, **kw)

    cos, sin = K.wan_rope_freqs(Dh, 1, S, 1, device=device)
    perm = torch.stack([torch.randperm(S, generator=torch.Generator().manual_seed(b)) for b in range(B)])
    pcos, psin = cos[perm.to(device)], sin[perm.to(device)]  # per-sample tables, as after routing
    idx = K.select_tokens(B, S, 0.5, generator=torch.Generator().manual_seed(0)).to(device)
    w1, w2 = t((2 * D, D), 20, torch.float32, scale=D**-0.5), t((D, 2 * D), 21, torch.float32, scale=(2 * D)**-0.5)

    def ffn_ref(x):
        a, b = w1.to(x.dtype), w2.to(x.dtype)
        return F.linear(F.gelu(F.linear(x, a), approximate="tanh"), b)

    def ffn_fused(x):
        a, b = w1.to(x.dtype), w2.to(x.dtype)
        return K.chunked_feed_forward(lambda c: F.linear(K.gelu_tanh(F.linear(c, a)), b), x, CHUNK)

    def qkv():
        x = t((B, S, 3 * D), 25, offset=0.3)
        return [x[..., i * D:(i + 1) * D].unflatten(-1, (H, Dh)).requires_grad_() for i in range(3)]

    gelu_x = t((B, D + 5, S), 10, scale=3.0)
    gelu_x[0, :4, 0] = torch.tensor([-30.0, 30.0, 0.0, -1e-4], device=device)  # tanh saturation, the origin
    return [
        ("rope", lambda x: K.rope(x, cos, sin), lambda x: R.rope_ref(x, cos, sin),
         [t((B, H, S, Dh), 1).transpose(1, 2).requires_grad_()]),
        ("rope per-sample", lambda x: K.rope(x, pcos, psin), lambda x: R.rope_ref(x, pcos, psin),
         [t((B, H, S, Dh), 2).transpose(1, 2).requires_grad_()]),
        ("qk_norm_rope", lambda x, w: K.qk_norm_rope(x, w, 1e-6, pcos, psin, H),
         lambda x, w: R.qk_norm_rope_ref(x, w, 1e-6, pcos, psin, H),
         [t((B, S, 2 * D), 3, scale=3.0)[..., D:].requires_grad_(), t((D,), 4, scale=0.5, offset=1.0).requires_grad_()]),
        ("rms_norm", lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: R.rms_norm_ref(x, w, 1e-6),
         [t((B, S, 2 * D), 5, scale=3.0)[..., D:].requires_grad_(), t((D,), 6, scale=0.5, offset=1.0).requires_grad_()]),
        ("modulate", lambda x, m: K.modulate(x, m[:, 0:1], m[:, 1:2]), lambda x, m: R.modulate_ref(x, m[:, 0:1], m[:, 1:2]),
         [t((B, S, D), 7, scale=3.0, offset=2.0).requires_grad_(), t((B, 6, D), 8, torch.float32, scale=0.5).requires_grad_()]),
        ("modulate per-token", lambda x, m: K.modulate(x, m[:, :, 0], m[:, :, 1]),
         lambda x, m: R.modulate_ref(x, m[:, :, 0], m[:, :, 1]),
         [t((B, S, D), 9, scale=3.0, offset=2.0).requires_grad_(), t((B, S, 6, D), 11, torch.float32, scale=0.5).requires_grad_()]),
        ("gated_residual", lambda x, y, m: K.gated_residual(x, y, m[:, 2:3]),
         lambda x, y, m: R.gated_residual_ref(x, y, m[:, 2:3]),
         [t((B, S, D), 12, scale=4.0).requires_grad_(), t((B, S, D), 13).requires_grad_(),
          t((B, 6, D), 14, torch.float32).requires_grad_()]),
        ("gated_residual per-token", lambda x, y, m: K.gated_residual(x, y, m[:, :, 2]),
         lambda x, y, m: R.gated_residual_ref(x, y, m[:, :, 2]),
         [t((B, S, D), 15, scale=4.0).requires_grad_(), t((B, S, D), 16, torch.float32).requires_grad_(),
          t((B, S, 6, D), 17, torch.float32).requires_grad_()]),
        ("gelu_tanh", K.gelu_tanh, R.gelu_tanh_ref, [gelu_x.transpose(1, 2).requires_grad_()]),
        ("tread_gather", lambda x: K.tread_gather(x, idx), lambda x: R.tread_gather_ref(x, idx),
         [t((B, S, D), 18).requires_grad_()]),
        ("tread_gather shared", lambda x: K.tread_gather(x, idx, shared=True),
         lambda x: R.tread_gather_ref(x, idx, shared=True), [t((S, 1, D), 19).requires_grad_()]),
        ("tread_scatter", lambda b, y: K.tread_scatter(b, y, idx), lambda b, y: R.tread_scatter_ref(b, y, idx),
         [t((B, S, D), 22).requires_grad_(), t((B, idx.shape[1], D), 23).requires_grad_()]),
        ("chunked_feed_forward", ffn_fused, ffn_ref, [t((B, S, D), 24).requires_grad_()]),
        # Sana's linear attention on head views of a fused qkv projection; +0.3 keeps every
        # token's normaliser away from the bare eps
        ("linear_attention", lambda q, k, v: K.linear_attention(q, k, v, cos, sin),
         lambda q, k, v: R.linear_attention_ref(q, k, v, cos, sin), qkv()),
        ("linear_attention per-sample", lambda q, k, v: K.linear_attention(q, k, v, pcos, psin),
         lambda q, k, v: R.linear_attention_ref(q, k, v, pcos, psin), qkv()),
    ]


def _compile_case(ctx):
    """A bf16 Wan block between a TREAD gather and scatter: (the function compiled with
    fullgraph, the eager reference picking the fp32 or bf16 block by its input dtype, args)."""
    import vidtune_kernels as K
    from vidtune.build import build_training_model
    from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig
    from vidtune.models.wan import WanConfig

    B, S, H, Dh = ODD[ctx.size][-1]
    arch = WanConfig(num_attention_heads=H, attention_head_dim=Dh, ffn_dim=3 * H * Dh, num_layers=1,
                     text_dim=H * Dh, freq_dim=16, in_channels=4, out_channels=4)
    blocks = {}
    for dt in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same weights, rounded for the bf16 block
        blocks[dt] = build_training_model(ModelConfig(dtype=dt), AdapterConfig(type="full"),
                                          MemoryConfig(gradient_checkpointing=False), CompileConfig(enabled="off"),
                                          ctx.device, init="random", arch=arch).model.blocks[0]
    cos, sin = K.wan_rope_freqs(Dh, 1, S, 1, device=ctx.device)
    idx = K.select_tokens(B, S, 0.5, generator=torch.Generator().manual_seed(0)).to(ctx.device)

    def routed(block):
        def fn(x, context, temb):
            rope = (K.tread_gather(cos, idx, shared=True), K.tread_gather(sin, idx, shared=True))
            return K.tread_scatter(x, block(K.tread_gather(x, idx), context, temb, rope), idx)
        return fn

    backend = "inductor" if ctx.cuda else "aot_eager"  # the dry run traces without code generation
    torch._dynamo.reset()
    fused = torch.compile(routed(blocks["bf16"]), fullgraph=True, backend=backend)
    eager = {torch.float32: routed(blocks["fp32"]), torch.bfloat16: routed(blocks["bf16"])}
    D, bf = H * Dh, torch.bfloat16
    args = [randn((B, S, D), ctx.device, bf, 30).requires_grad_(), randn((B, 11, D), ctx.device, bf, 31),
            randn((B, 6, D), ctx.device, torch.float32, 32, scale=0.1).requires_grad_()]
    return fused, (lambda x, c, m: eager[x.dtype](x, c, m)), args, backend


def _judge(results) -> dict:
    ok = all(r["ok"] for r in results)
    low = [r["err"] / r["bound"] for r in results if r["bound"]]
    return dict(ok=ok, checks=len(results), max_err=max((r["err"] or 0.0) for r in results),
                err_over_bound=max(low) if low else None,
                problems="; ".join(f"{r['name']}: {r['problem'] or 'out of bound'}" for r in results if not r["ok"]) or None)


def correctness(ctx) -> None:
    from vidtune_kernels.reference import compare

    _use_triton()
    for label, dtype in DTYPES.items():
        per_op: dict[str, list] = {}
        for shape in ODD[ctx.size]:
            for op, fused, ref, args in correctness_cases(ctx.device, dtype, shape):
                res = compare(fused, ref, args)
                per_op.setdefault(op, []).extend(dict(r, shape=shape) for r in res)
        for op, results in per_op.items():
            j = _judge(results)
            ctx.row(f"{op} {label}", j.pop("ok"), **j, detail=results)
    case = "torch.compile fullgraph: Wan block in a TREAD route, bf16"
    with ctx.guard(case):
        fused, ref, args, backend = _compile_case(ctx)
        j = _judge(compare(fused, ref, args))
        ctx.row(case, j.pop("ok"), backend=backend, **j)


# ---------------------------------------------------------------------------------------------
# speed

# S = the latent grid's tokens: 81 frames at 832x480 are 21 x 30 x 52 after the VAE and patching.
SPEED = {"toy": dict(S=8, grid=(1, 8, 1), H=2, Dh=16, F=40, reps=1, copy_mib=4),
         "full": dict(S=32760, grid=(21, 30, 52), H=12, Dh=128, F=8960, reps=50, copy_mib=1024)}


def speed_cases(device, S, grid, H, Dh, F_, **_):
    """(op, fused, torch sequence, inputs, grad inputs) at one block shape, bf16."""
    import vidtune_kernels as K
    from vidtune_kernels import reference as R

    D, bf = H * Dh, torch.bfloat16
    cos, sin = K.wan_rope_freqs(Dh, *grid, device=device)
    x = randn((1, S, D), device, bf, 1, scale=2.0).requires_grad_()
    xq = randn((1, S, H, Dh), device, bf, 2).requires_grad_()
    y = randn((1, S, D), device, bf, 3).requires_grad_()
    h = randn((1, S, F_), device, bf, 4, scale=2.0).requires_grad_()
    w = randn((D,), device, bf, 5, scale=0.2, offset=1.0)
    table = randn((1, 6, D), device, torch.float32, 6, scale=0.3)
    idx = K.select_tokens(1, S, 0.5, generator=torch.Generator().manual_seed(0)).to(device)
    kept = randn((1, idx.shape[1], D), device, bf, 7).requires_grad_()
    shift, scale, gate = table[:, 0:1], table[:, 1:2], table[:, 2:3]
    return [
        ("rope", lambda: K.rope(xq, cos, sin), lambda: R.rope_ref(xq, cos, sin), [xq, cos, sin], [xq]),
        ("qk_norm_rope", lambda: K.qk_norm_rope(x, w, 1e-6, cos, sin, H),
         lambda: R.qk_norm_rope_ref(x, w, 1e-6, cos, sin, H), [x, w, cos, sin], [x]),
        ("rms_norm", lambda: K.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (D,), w, 1e-6), [x, w], [x]),
        ("modulate", lambda: K.modulate(x, shift, scale), lambda: R.modulate_ref(x, shift, scale),
         [x, shift, scale], [x]),
        ("gated_residual", lambda: K.gated_residual(x, y, gate), lambda: R.gated_residual_ref(x, y, gate),
         [x, y, gate], [x, y]),
        ("gelu_tanh (FF width)", lambda: K.gelu_tanh(h), lambda: F.gelu(h, approximate="tanh"), [h], [h]),
        ("tread_gather 0.5", lambda: K.tread_gather(x, idx), lambda: R.tread_gather_ref(x, idx), [x, idx], [x]),
        ("tread_scatter 0.5", lambda: K.tread_scatter(x, kept, idx), lambda: R.tread_scatter_ref(x, kept, idx),
         [x, kept, idx], [x, kept]),
    ]


def speed(ctx) -> None:
    _use_triton()
    sz = SPEED[ctx.size]
    n = sz["copy_mib"] << 20
    copy_bw = 2 * n / copy_seconds(n, ctx.device, max(3, sz["reps"] // 2))  # read + write
    ctx.row("device copy (the bandwidth reference)", None, MiB=sz["copy_mib"], GB_s=copy_bw / 1e9)
    S, H, Dh = sz["S"], sz["H"], sz["Dh"]
    for op, fused, ref, inputs, grads in speed_cases(ctx.device, S, sz["grid"], H, Dh, sz["F"]):
        with ctx.guard(op):
            out = fused()
            g = torch.randn_like(out)
            fwd_bytes = tensor_bytes(inputs) + tensor_bytes([out])
            fb_bytes = fwd_bytes + tensor_bytes([out]) + 2 * tensor_bytes(grads)
            del out

            def fwd(fn):
                with torch.no_grad():
                    fn()

            def fwd_bwd(fn):
                torch.autograd.grad(fn(), grads, g)

            t = {}
            for key, run in (("fwd", fwd), ("fb", fwd_bwd)):
                for who, fn in (("fused", fused), ("torch", ref)):
                    t[key, who] = median(timed(lambda: run(fn), ctx.device, sz["reps"]))
            gbs = {k: b / t[k, "fused"] / 1e9 for k, b in (("fwd", fwd_bytes), ("fb", fb_bytes))}
            ctx.row(op, None, tokens=S,
                    fwd_ms=t["fwd", "fused"] * 1e3, torch_fwd_ms=t["fwd", "torch"] * 1e3,
                    fwd_speedup=t["fwd", "torch"] / t["fwd", "fused"], fwd_GB_s=gbs["fwd"],
                    fwd_pct_copy=100 * gbs["fwd"] * 1e9 / copy_bw,
                    fb_ms=t["fb", "fused"] * 1e3, torch_fb_ms=t["fb", "torch"] * 1e3,
                    fb_speedup=t["fb", "torch"] / t["fb", "fused"], fb_GB_s=gbs["fb"],
                    fb_pct_copy=100 * gbs["fb"] * 1e9 / copy_bw)
