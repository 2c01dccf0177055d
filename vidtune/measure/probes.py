"""Full-size measurements without weights, for the planner and the benchmarks.

Everything here runs under ``FakeTensorMode`` (shapes and dtypes only, no memory, no compute):
- ``probe_step``: one training (or no-grad) step of a *two-block* Wan model at full width and the
  real token count, cut by counter marks into phases — head (patch/text/time embedding), block 0,
  the probed block 1, the tail (norm, proj_out, loss), then backward. The planner chains the
  probed block once per layer, so a 40-layer step costs two blocks to measure (~2 s, not ~30 s).
- ``probe_vae`` / ``probe_text_encoder``: the diffusers Wan 2.1 VAE (encode or decode) and the
  text encoder from transformers (UMT5-XXL for Wan, Gemma2-2B for Sana Video), at full size.
- ``OpRecorder``: per-op FLOPs and bytes read+written, for the roofline projections.
Models are built by ``vidtune.build`` on the meta device (adapters injected there by peft) and
their parameters then replaced by fake tensors: peft cannot inject into modules whose parameters
are fake.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from vidtune.measure.counters import counting
from vidtune.models import example_inputs
from vidtune.runtime import dtype as runtime_dtype

# UMT5-XXL encoder (Wan's text encoder, ~5.7B parameters).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")
TEXT_LEN = 512  # Wan pads prompts to 512 tokens
# Gemma2-2B (Sana Video's text encoder, gemma-2-2b-it's decoder, ~2.6B parameters).
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                 query_pre_attn_scalar=256, sliding_window=4096)
TEXT_ENCODERS = {"umt5": UMT5_XXL, "gemma2": GEMMA2_2B}
# CLIP ViT-H/14 vision tower (Wan 2.1 I2V's image encoder, ~632M parameters).
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024)


def local_component_config(model_cfg, component: str) -> dict | None:
    """config.json of a pipeline component (``vae``, ``text_encoder``) in a local checkpoint dir,
    so plans of small or custom checkpoints use their real sizes; None for hub ids."""
    from vidtune.models.wan.pipeline import component_config

    return component_config(model_cfg, component)


def arch_key(arch) -> tuple:
    d = dataclasses.asdict(arch)
    d.pop("extra", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def fakeify(module: nn.Module) -> nn.Module:
    """Replace every parameter and buffer by an empty tensor of the active (fake) mode."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
    return module


def build_meta_model(model_cfg, adapter_cfg, arch, *, num_layers: int | None = None, ckpt: bool = False,
                     chunk: int | None = None, adapter_dtype: torch.dtype = torch.float32):
    """The model the trainer builds (``vidtune.build``: dtype policy, adapter, checkpointing,
    chunked FF), on the meta device. Quantization and offload need real weights: the planner
    accounts for them itself."""
    from vidtune.build import build_training_model
    from vidtune.config import ChunkedFFConfig, CompileConfig, MemoryConfig

    memory = MemoryConfig(gradient_checkpointing=ckpt, gradient_checkpointing_every_n=1,
                          chunked_ff=ChunkedFFConfig(enabled=chunk is not None, chunk_size=chunk or 1))
    adapter_cfg = dataclasses.replace(adapter_cfg, init_from=None)  # the values do not matter here
    return build_training_model(model_cfg, adapter_cfg, memory, CompileConfig(enabled="off"), "meta", init="meta",
                                arch=arch, num_layers=num_layers, adapter_dtype=adapter_dtype).model


class OpRecorder(TorchDispatchMode):
    """(op, FLOPs, bytes read + written, element size) per op call; the roofline's input."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        if packet in _VIEWS or not outs:  # views and metadata queries move no data
            nbytes = 0
        else:
            nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        # The precision an op runs in is that of its biggest operand (an fp32 bias or logsumexp
        # beside bf16 matrices does not make a matmul or attention fp32).
        floats = [t for t in ins if t.is_floating_point()]
        elsize = max(floats, key=lambda t: t.numel()).element_size() if floats else 4
        self.calls.append((packet.__name__, flops, nbytes, elsize))
        return out


aten = torch.ops.aten
_VIEWS = {aten.view, aten._unsafe_view, aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze,
          aten.squeeze, aten.split, aten.split_with_sizes, aten.unbind, aten.slice, aten.select, aten.alias,
          aten.as_strided, aten.detach, aten.unflatten, aten.reshape}


@dataclass
class Segment:
    """One phase of a probed step. ``peak`` is above the live bytes at the phase start."""

    peak: int = 0
    live_delta: int = 0
    flops: int = 0
    materialized: int = 0
    calls: list = field(default_factory=list, repr=False)


@dataclass
class StepProbe:
    """Phases of a two-block step, forward: head, block0, gap (a route's gather), block (the
    probed block), tail; backward: tail_bwd, block_bwd (the probed block), rest_bwd (block 0 and
    the head). Absent backward phases without grad. ``peak`` of the whole probe;
    ``attention_bytes`` held by attention outputs at that peak."""

    segments: dict
    peak: int
    attention_bytes: int
    peak_by_op: dict


_PROBES: dict = {}


def probe_step(model_cfg, adapter_cfg, arch, *, latent: tuple[int, int, int], batch: int,
               autocast: torch.dtype | None, ckpt: bool, chunk: int | None, route_ratio: float | None = None,
               grad: bool = True, text_len: int = TEXT_LEN, adapter_dtype: torch.dtype = torch.float32) -> StepProbe:
    """Counters of one step of a two-block model (memoised), block 1 being the probed one. The
    model is the one ``model_cfg`` and ``adapter_cfg`` build, cut to two blocks of ``arch``.

    Block 0 (unrouted, same checkpointing) stands between the head and the probed block, so the
    probed block sees what blocks 1..N-1 of the real model see: an input that needs its grad, and a
    backward that ends before any head node can run (the head's grads wait for every block)."""
    # flash-attn and SageAttention run on CUDA only; on fake tensors they are counted as SDPA, whose
    # footprint they share (no S x S score matrix).
    m, a = dataclasses.replace(model_cfg, attention_backend="sdpa"), adapter_cfg
    what = (m.family, m.dtype, m.force_2_1_time_embedding, m.attention_backend,
            a.type, a.rank, a.alpha, tuple(a.target_modules), a.dropout, adapter_dtype)
    key = (arch_key(arch), what, latent, batch, autocast, ckpt, chunk, route_ratio, grad, text_len)
    if key not in _PROBES:
        model = build_meta_model(m, adapter_cfg, arch, num_layers=2, ckpt=ckpt, chunk=chunk,
                                 adapter_dtype=adapter_dtype)
        _PROBES[key] = _probe_step(model, arch, latent, batch, runtime_dtype(m.dtype), autocast, route_ratio, grad,
                                   text_len)
    return _PROBES[key]


def _probe_step(model, arch, latent, batch, dtype, autocast, route_ratio, grad, text_len):
    with FakeTensorMode():
        fakeify(model).train(grad)
        f, h, w = latent
        x = torch.randn(batch, arch.in_channels, f, h, w, dtype=dtype)
        target = torch.randn(batch, arch.out_channels, f, h, w, dtype=dtype)
        t = torch.full((batch,), 500.0)
        ctx = torch.randn(batch, text_len, arch.text_dim, dtype=dtype)
        extra = example_inputs(model, x)  # a family's conditioning (Wan S2V: audio, reference, motion)
        routes = [(route_ratio, 1, 1)] if route_ratio else None
        rec = OpRecorder()
        marks: list[tuple[str, int]] = []
        fired: set = set()
        existing = [*model.parameters(), *model.buffers(), x, target, t, ctx, *extra.values()]
        with counting(existing) as c:

            def mark(label):
                if label in fired:  # recompute under checkpointing re-enters the hooks
                    return
                fired.add(label)
                c.mark(label)
                marks.append((label, len(rec.calls)))

            def pre(i):
                def hook(mod, args, kwargs):
                    mark(f"pre{i}")
                    if i == 1 and grad and args[0].requires_grad and "hooked" not in fired:
                        fired.add("hooked")
                        args[0].register_hook(lambda g: mark("block_bwd"))
                return hook

            def post(mod, args, kwargs, out):
                if "post1" in fired:
                    return
                mark("post1")
                if grad and out.requires_grad:
                    out.register_hook(lambda g: mark("tail_bwd"))

            hooks = [model.blocks[0].register_forward_pre_hook(pre(0), with_kwargs=True),
                     model.blocks[0].register_forward_hook(lambda *a: mark("post0"), with_kwargs=True),
                     model.blocks[1].register_forward_pre_hook(pre(1), with_kwargs=True),
                     model.blocks[1].register_forward_hook(post, with_kwargs=True)]
            with rec, contextlib.ExitStack() as stack:
                if not grad:
                    stack.enter_context(torch.no_grad())
                if autocast is not None:
                    stack.enter_context(torch.autocast("cpu", dtype=autocast))
                out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, routes=routes,
                            generator=torch.Generator().manual_seed(0), **extra)
                stack.close()  # the loss and backward run outside autocast, as in the trainer
                loss = (out.float() - target.float()).pow(2).mean()
                mark("fwd")
                if grad:
                    loss.backward()
                    mark("end")
            for hk in hooks:
                hk.remove()
        del out, loss
    names = {"pre0": "head", "post0": "block0", "pre1": "gap", "post1": "block", "fwd": "tail",
             "tail_bwd": "tail_bwd", "block_bwd": "block_bwd", "end": "rest_bwd"}
    segs, prev_live, prev_flops, prev_mat, prev_call = {}, 0, 0, 0, 0
    for m, (label, ncalls) in zip(c.marks, marks):
        segs[names[label]] = Segment(m.peak_since_prev - prev_live, m.live_bytes - prev_live, m.flops - prev_flops,
                                     m.materialized_bytes - prev_mat, rec.calls[prev_call:ncalls])
        prev_live, prev_flops, prev_mat, prev_call = m.live_bytes, m.flops, m.materialized_bytes, ncalls
    attn = sum(v for k, v in c.peak_by_op.items() if "attention" in k)
    return StepProbe(segs, c.peak_live_bytes, attn, dict(c.peak_by_op))


_AUX: dict = {}


def probe_vae(frames: int, height: int, width: int, dtype: torch.dtype, *, decode: bool, batch: int = 1,
              config: dict | None = None):
    """(weight bytes, peak activation bytes, FLOPs) of the Wan VAE (``config``: its config.json;
    default the Wan 2.1 VAE; the Wan 2.2 one strides 16) encoding pixels (F, H, W) or decoding
    their latents, no grad,
    measured at full size on fake tensors (memoised)."""
    key = ("vae", frames, height, width, dtype, decode, batch, json.dumps(config, sort_keys=True))
    if key not in _AUX:
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            # nn.Module.to: diffusers' own .to(dtype) warns about fp32-kept modules, and this VAE has none.
            vae = nn.Module.to(AutoencoderKLWan(**(config or {})), dtype)
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        with FakeTensorMode():
            fakeify(vae).eval()
            if decode:
                t, sp = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
                z = torch.randn(batch, vae.config.z_dim, (frames - 1) // t + 1, height // sp, width // sp, dtype=dtype)
                fn = lambda: vae.decode(z).sample  # noqa: E731
            else:
                z = torch.randn(batch, 3, frames, height, width, dtype=dtype)
                fn = lambda: vae.encode(z).latent_dist.mode()  # noqa: E731
            with torch.no_grad(), counting([*vae.parameters(), *vae.buffers(), z]) as c:
                fn()
        _AUX[key] = (weights, c.peak_live_bytes, c.flops)
    return _AUX[key]


def probe_text_encoder(batch: int, dtype: torch.dtype, text_len: int = TEXT_LEN, config: dict | None = None,
                       kind: str = "umt5"):
    """(weight bytes, peak activation bytes, FLOPs) of the text encoder ``kind`` (umt5 | gemma2;
    ``config``: its config.json, default the full-size one of TEXT_ENCODERS) on ``batch`` prompts."""
    from transformers import Gemma2Config, Gemma2Model, UMT5Config, UMT5EncoderModel

    cls, cfg_cls = (Gemma2Model, Gemma2Config) if kind == "gemma2" else (UMT5EncoderModel, UMT5Config)
    return _probe_encoder(
        (kind, batch, dtype, text_len, json.dumps(config, sort_keys=True)),
        lambda: cls(cfg_cls(**(config or TEXT_ENCODERS[kind]))).to(dtype),
        lambda: (torch.zeros(batch, text_len, dtype=torch.long), torch.ones(batch, text_len, dtype=torch.long)),
        lambda te, ids, mask: te(input_ids=ids, attention_mask=mask))


def _probe_encoder(key, build, make_inputs, call):
    """(weight bytes, peak activation bytes, FLOPs) of the module ``build()`` makes (on meta) when
    ``call(module, *make_inputs())`` runs on fake tensors, without grad; memoised by ``key``."""
    if key not in _AUX:
        with torch.device("meta"):
            module = build()
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        with FakeTensorMode():
            fakeify(module).eval()
            inputs = make_inputs()
            with torch.no_grad(), counting([*module.parameters(), *module.buffers(), *inputs]) as c:
                call(module, *inputs)
        _AUX[key] = (weights, c.peak_live_bytes, c.flops)
    return _AUX[key]


def image_encoder_bytes(config: dict | None = None) -> int:
    """Weight bytes of the CLIP vision encoder (``config``: its config.json; default ViT-H/14) in
    fp32, the dtype vidtune runs it in while caching; its activations (one image) are negligible."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        enc = CLIPVisionModel(CLIPVisionConfig(**(config or CLIP_VIT_H)))
    return sum(p.numel() * 4 for p in enc.parameters())
# wav2vec2-large-xlsr-53-english (Wan S2V's audio encoder, ~315M parameters), as Wav2Vec2ForCTC.
XLSR_53_LARGE = dict(vocab_size=33, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                     conv_kernel=(10, 3, 3, 3, 3, 2, 2), feat_extract_norm="layer", do_stable_layer_norm=True,
                     num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)


def probe_audio_encoder(dtype: torch.dtype, seconds: float, config: dict | None = None):
    """(weight bytes, peak activation bytes, FLOPs) of Wan S2V's wav2vec2 (``config``: its
    config.json; default XLS-R-53 large) on ``seconds`` of 16 kHz audio, all hidden states kept."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    return _probe_encoder(
        ("wav2vec2", dtype, seconds, json.dumps(config, sort_keys=True, default=list)),
        lambda: Wav2Vec2ForCTC(Wav2Vec2Config(**(config or XLSR_53_LARGE))).to(dtype),
        lambda: (torch.zeros(1, int(seconds * 16000), dtype=dtype),),
        lambda enc, wave: enc.wav2vec2(wave, output_hidden_states=True))


def optimizer_peak(shapes_dtypes: list[tuple[tuple, torch.dtype]], foreach: bool) -> int:
    """Peak bytes of a first torch AdamW step (state creation + temporaries) over fake parameters
    of these shapes; the gradients are inputs (counted by the caller)."""
    key = ("adamw", tuple(shapes_dtypes), foreach)
    if key not in _AUX:
        with FakeTensorMode():
            params = [nn.Parameter(torch.empty(s, dtype=d)) for s, d in shapes_dtypes]
            for p in params:
                p.grad = torch.empty_like(p)
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
            with counting([*params, *(p.grad for p in params)]) as c:
                opt.step()
        _AUX[key] = c.peak_live_bytes
    return _AUX[key]
