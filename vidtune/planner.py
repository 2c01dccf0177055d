"""Memory planner: predicted peak memory per phase (caching, training step, validation) for a
config on a device class, a fit/no-fit verdict, and for a plan that does not fit, the combinations
of memory options that would.

    vidtune-train --plan config.toml [--gpu rtx4090|a6000|mi300x|h100|cpu] [--set k=v ...]

How the step peak is predicted. Weights, adapter, optimizer state and EMA are counted from the
parameters of the model ``vidtune.build`` makes on the meta device (the trainer's dtype policy and adapter;
int8 = 1 byte per weight + per-row fp32 scale and int8 zero point, as torchao's Int8Tensor).
Activations are measured, not modelled: ``vidtune.measure.probes.probe_step`` runs one step of a
two-block model at full width and the real token count on fake tensors under the counters, with
marks cutting it into head / block / tail phases, forward and backward. The planner then replays
the phases for the real depth — head, then each block (at its token count: TREAD routes give
routed blocks their own probe; checkpoint-every-N gives checkpointed and plain blocks their own),
tail, and backward in reverse — carrying the live bytes, so the peak lands where it really does
(start of backward without checkpointing, inside one block's recompute with it). The optimizer
step's peak (state creation + foreach temporaries) is measured the same way on fake parameters.

Host RAM (a projection, reported, not judged against a machine): what waits in RAM while the
device trains — offloaded blocks in the streamer's host tier, with ``model.experts = "both"`` the
idle expert (its other weights, adapter, optimizer state and EMA; the whole expert without block
offload) — and the peaks of loading a model (weights in ``model.dtype`` before quantization and
offload, while a model built before already waits in RAM) and of caching (the text encoder is
read into RAM before it moves to the device).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch

from vidtune.build import KAHAN_OPTIMIZERS, adapter_dtype, adapter_master_weights, architecture, model_inputs
from vidtune.config import Config, ConfigError, override
from vidtune.measure import devices as D
from vidtune.measure import probes as P
from vidtune.measure.mfu import flops_config, model_flops
from vidtune.models import family
from vidtune.models.wan.pipeline import vae_config
from vidtune.runtime import dtype as _dtype
from vidtune.runtime import resolve_device

GiB = 1 << 30


def gib(n: float) -> str:
    return f"{n / GiB:7.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Shapes

@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    frames: int
    spatial: int = 8  # the VAE's pixel stride (16 for the Wan 2.2 VAE) and frame stride
    temporal: int = 4

    @property
    def latent(self) -> tuple[int, int, int]:
        return ((self.frames - 1) // self.temporal + 1, self.height // self.spatial, self.width // self.spatial)

    def tokens(self, patch=(1, 2, 2)) -> int:
        f, h, w = self.latent
        return (f // patch[0]) * (h // patch[1]) * (w // patch[2])

    def __str__(self):
        return f"{self.width}x{self.height}x{self.frames}"

    @classmethod
    def of_latent(cls, frames: int, height: int, width: int) -> "Shape":
        """The pixel shape whose latents are (frames, height, width) (Wan VAE: x4 in time, x8 in space)."""
        return cls(width * 8, height * 8, (frames - 1) * 4 + 1)


WAN_ASPECT = 832 / 480  # the aspect Wan was trained at; the planner sizes the largest bucket with it
AUDIO_SECONDS = 60.0  # Wan S2V audio tracks are sized at this without audio.max_duration_seconds


def _round16(x: float, multiple: int = 16) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _vae_strides(cfg: Config) -> tuple[int, int, int]:
    """(pixel multiple of a training size, VAE spatial stride, VAE temporal stride)."""
    inputs = model_inputs(cfg.model)
    if inputs is None:
        return 16, 8, 4
    return inputs.side_multiple, inputs.vae_spatial, inputs.vae_temporal


def train_shape(cfg: Config) -> Shape:
    """The largest training sample the datasets produce (a Wan-aspect bucket at their resolution)."""
    multiple, spatial, temporal = _vae_strides(cfg)
    best = None
    for d in cfg.datasets:
        frames = d.num_frames if d.type == "video" else 1
        if d.resolution_type == "pixel":
            h = _round16(d.resolution, multiple)
            w = _round16(d.resolution * WAN_ASPECT, multiple)
        else:
            area = d.resolution ** 2
            w, h = (_round16(math.sqrt(area * WAN_ASPECT), multiple), _round16(math.sqrt(area / WAN_ASPECT), multiple))
        s = Shape(w, h, frames, spatial, temporal)
        if best is None or s.tokens() > best.tokens():
            best = s
    return best or validation_shape(cfg)


def validation_shape(cfg: Config) -> Shape:
    w, h = (int(x) for x in cfg.validation.resolution.lower().split("x"))
    _, spatial, temporal = _vae_strides(cfg)
    return Shape(w, h, cfg.validation.num_frames, spatial, temporal)


# ---------------------------------------------------------------------------------------------
# The plan

@dataclass
class Item:
    label: str
    bytes: int
    note: str = ""


@dataclass
class Phase:
    name: str
    items: list[Item]
    peak: int
    fits: bool = True
    note: str = ""


@dataclass
class Suggestion:
    changes: list[str]  # human-readable option names
    overrides: list[str]  # --set assignments
    step_peak: int
    max_peak: int


@dataclass
class Plan:
    config: Config
    device: D.Device
    shape: Shape
    tokens: int
    phases: list[Phase]
    counters: dict  # deterministic per-step counters (FLOPs, bytes)
    sim: dict = field(default_factory=dict, repr=False)  # the replayed step: peaks, per-op calls (projections)
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    host: Phase | None = None  # host RAM (projection; not part of the verdict)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def report(self) -> str:
        dev = self.device
        m, a = self.config.model, self.config.adapter
        out = [f"vidtune memory plan: {m.family}/{m.flavour}{f' experts {m.experts}' if m.experts else ''} {a.type}"
               f"{f' rank {a.rank}' if a.type != 'full' else ''} on {dev.label} ({dev.name})",
               f"  training sample {self.shape} -> latents {'x'.join(map(str, self.shape.latent))} -> "
               f"{self.tokens:,} tokens, batch {self.config.train.batch_size}",
               f"  device memory {gib(dev.memory_bytes).strip()}, usable {gib(dev.usable_bytes).strip()} "
               f"(runtime reserve {gib(dev.reserve_bytes).strip()}, 5% allocator headroom)",
               "  columns: what holds device memory in that phase | its bytes at the phase's peak | where the "
               "number comes from or what it leaves out", ""]
        for ph in self.phases:
            verdict = "fits" if ph.fits else "DOES NOT FIT"
            out.append(f"[{ph.name}] peak {gib(ph.peak).strip()} — {verdict}" + (f"  ({ph.note})" if ph.note else ""))
            for it in ph.items:
                out.append(f"  {it.label:<44}{gib(it.bytes)}" + (f"   {it.note}" if it.note else ""))
            out.append("")
        if self.host is not None:
            out.append(f"[{self.host.name}] peak {gib(self.host.peak).strip()} — projection ({self.host.note})")
            for it in self.host.items:
                out.append(f"  {it.label:<44}{gib(it.bytes)}" + (f"   {it.note}" if it.note else ""))
            out.append("")
        c = self.counters
        out.append(f"per step: forward {c['fwd_flops'] / 1e12:.1f} TFLOP, backward {c['bwd_flops'] / 1e12:.1f} TFLOP, "
                   f"optimizer {c['opt_flops'] / 1e9:.2f} GFLOP (analytic); offload moves "
                   f"{c['offload_bytes'] / GiB:.2f} GiB host -> device")
        out.append(f"  materialised {c['materialized_bytes'] / GiB:.1f} GiB: every tensor the step allocates, summed "
                   f"(memory traffic that fused kernels cut, not memory held at once)")
        for n in self.notes:
            out.append(f"note: {n}")
        out.append("")
        out.append(f"verdict: {'FITS' if self.fits else 'DOES NOT FIT'} on {dev.name} "
                   f"(largest phase {gib(self.peak).strip()} of {gib(dev.usable_bytes).strip()} usable)")
        if not self.fits:
            if self.suggestions:
                out.append("options that make it fit (each a minimal combination; first = fewest changes):")
                for s in self.suggestions:
                    out.append(f"  - {' + '.join(s.changes)}: largest phase {gib(s.max_peak).strip()}  "
                               f"[{' '.join('--set ' + o for o in s.overrides)}]")
            else:
                out.append("no combination of the searched options fits this device "
                           "(checkpointing, chunked FF, int8, block offload, TREAD, 8-bit AdamW, EMA in CPU RAM, "
                           "fewer frames, lower resolution)")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Pieces

def _param_bytes(p, int8: bool) -> int:
    if int8 and p.ndim == 2:
        return p.numel() + p.shape[0] * 5  # int8 data + fp32 scale + int8 zero point per row
    return p.numel() * p.element_size()


def _weights(model, cfg: Config):
    """(resident frozen bytes, offloaded block bytes per group list, trainable params list,
    biggest block linear in compute dtype)"""
    int8 = cfg.model.base_precision == "int8" and cfg.adapter.type != "full"
    off = cfg.memory.offload
    nblocks = len(model.blocks)
    block_frozen = []
    trainable = []
    for i, blk in enumerate(model.blocks):
        b = 0
        for name, p in blk.named_parameters():
            if p.requires_grad:
                continue
            is_linear = name.endswith(".weight") and p.ndim == 2
            b += _param_bytes(p, int8 and is_linear)
        block_frozen.append(b)
    other = 0
    in_blocks = {id(p) for p in model.blocks.parameters()}  # Sana names them transformer_blocks.*
    also = tuple(f"{n}." for n in getattr(model, "quantize_also", ()))
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable.append(p)
        elif id(p) not in in_blocks:
            other += _param_bytes(p, int8 and name.startswith(also) and name.endswith(".weight"))
    biggest = max((p.numel() * p.element_size() for n, p in model.blocks[0].named_parameters() if p.ndim == 2),
                  default=0)
    groups = []
    if off.type == "block_level" and cfg.adapter.type != "full":
        bpg = off.blocks_per_group
        groups = [sum(block_frozen[i:i + bpg]) for i in range(0, nblocks, bpg)]
        resident = other
    else:
        resident = other + sum(block_frozen)
    return resident, groups, trainable, biggest


def offload_loads(num_groups: int, depth: int, *, backward: bool = True) -> list[tuple[str, int]]:
    """The loads ``GroupOffload`` issues for one forward (+ backward): a window of the current group
    and the next ``depth`` in this pass's order stays resident, the rest is evicted."""
    resident: list[int] = []
    loads = []
    passes = [("fwd", list(range(num_groups)))] + ([("bwd", list(range(num_groups))[::-1])] if backward else [])
    for phase, order in passes:
        for pos, g in enumerate(order):
            window = order[pos:pos + depth + 1]
            resident = [r for r in resident if r in window]
            for w in window:
                if w not in resident:
                    resident.append(w)
                    loads.append((phase, w))
    return loads


_STATE_BYTES = {  # optimizer state bytes per trained parameter, by the element size it steps in
    "adamw": lambda e: 2 * e, "adamw_bf16": lambda e: 2 * e, "lion": lambda e: e,
    "adamw_8bit": lambda e: 2 * 1 + 2 * 4 / 256, "paged_adamw_8bit": lambda e: 2 * 1 + 2 * 4 / 256,
    "lion_8bit": lambda e: 1 + 4 / 256, "paged_lion_8bit": lambda e: 1 + 4 / 256,
}


def _state_bytes(optimizer: str, elsize: int, masters: bool) -> float:
    """Per trained parameter: the optimizer's states, plus an fp32 master copy (whose dtype the
    states then take) or optimi's Kahan compensation buffer for bf16 weights."""
    if masters:
        return 4 + _STATE_BYTES[optimizer](4)
    kahan = elsize < 4 and optimizer in KAHAN_OPTIMIZERS
    return _STATE_BYTES[optimizer](elsize) + (elsize if kahan else 0)
_OPT_FLOPS = {"adamw": 12, "adamw_bf16": 14, "lion": 7}  # elementwise FLOPs per parameter per step


def _classes(cfg: Config, nblocks: int):
    """Per block: (route ratio or None, checkpointed); plus the resolved routes."""
    routes = cfg.tread.resolve(nblocks) if cfg.tread.routes else []
    mem = cfg.memory
    out = []
    for i in range(nblocks):
        ratio = next((r for r, s, e in routes if s <= i <= e), None)
        ckpt = mem.gradient_checkpointing and i % mem.gradient_checkpointing_every_n == 0
        out.append((ratio, ckpt))
    return out, routes


def _probe_kwargs(cfg: Config, arch, shape: Shape, batch: int):
    mp = cfg.train.mixed_precision
    return dict(latent=shape.latent, batch=batch, autocast=None if mp == "no" else _dtype(mp),
                adapter_dtype=adapter_dtype(cfg), text_len=family(cfg.model.family).TEXT_LEN,
                chunk=cfg.memory.chunked_ff.chunk_size if cfg.memory.chunked_ff.enabled else None)


def simulate_step(cfg: Config, arch, shape: Shape) -> dict:
    """Replay the probed phases over the real depth; returns peak, FLOPs and bytes of fwd+bwd."""
    nblocks = arch.num_layers
    classes, routes = _classes(cfg, nblocks)
    kw = _probe_kwargs(cfg, arch, shape, cfg.train.batch_size)
    probes = {c: P.probe_step(cfg.model, cfg.adapter, arch, ckpt=c[1], route_ratio=c[0], **kw) for c in set(classes)}
    unrouted = {k: P.probe_step(cfg.model, cfg.adapter, arch, ckpt=k, **kw) for k in {c[1] for c in classes}}
    S = unrouted[classes[0][1]].segments  # head, tail and block 0's backward (+ the head's)
    starts = {s: r for r, s, e in routes}
    ends = {e: r for r, s, e in routes}

    def route_cost(ratio, ckpt):  # (gathered tensors kept from the route's start, scatter output)
        pr, pu = probes[(ratio, ckpt)].segments, unrouted[ckpt].segments
        return (max(0, pr["gap"].live_delta - pu["gap"].live_delta),
                max(0, pr["tail"].live_delta - pu["tail"].live_delta))

    live, peak = S["head"].live_delta, S["head"].peak
    fwd_flops = S["head"].flops + S["tail"].flops
    mat = S["head"].materialized + S["tail"].materialized + S["tail_bwd"].materialized + S["rest_bwd"].materialized
    block_calls = []
    for i, c in enumerate(classes):
        seg = probes[c].segments
        if i in starts:
            live += route_cost(starts[i], c[1])[0]
        peak = max(peak, live + seg["block"].peak)
        live += seg["block"].live_delta
        if i in ends:
            live += route_cost(ends[i], c[1])[1]
        fwd_flops += seg["block"].flops
        mat += seg["block"].materialized + (seg["block_bwd"].materialized if i else 0)
        # block 0's backward runs inside rest_bwd (with the head's), counted there
        block_calls.append((c, seg["block"].calls, seg["block_bwd"].calls if i else [], seg["block"].flops))
    peak = max(peak, live + S["tail"].peak)
    live += S["tail"].live_delta
    peak = max(peak, live + S["tail_bwd"].peak)
    live += S["tail_bwd"].live_delta
    bwd_flops = S["tail_bwd"].flops + S["rest_bwd"].flops
    for i in reversed(range(1, nblocks)):
        c = classes[i]
        seg = probes[c].segments
        if i in ends:
            live -= route_cost(ends[i], c[1])[1]
        peak = max(peak, live + seg["block_bwd"].peak)
        live += seg["block_bwd"].live_delta
        if i in starts:
            live -= route_cost(starts[i], c[1])[0]
        bwd_flops += seg["block_bwd"].flops
    peak = max(peak, live + S["rest_bwd"].peak)
    attn = max(p.attention_bytes for p in probes.values())
    calls = {"head": S["head"].calls, "tail": S["tail"].calls + S["tail_bwd"].calls, "head_bwd": S["rest_bwd"].calls}
    return dict(peak=peak, fwd_flops=fwd_flops, bwd_flops=bwd_flops, materialized=mat, attention=attn,
                calls=calls, block_calls=block_calls, classes=classes)


def step_model_flops(cfg: Config, arch, shape: Shape | None = None) -> int:
    """Model FLOPs of one training step of ``cfg`` at ``shape`` (default: its largest training
    sample): the counters' replay of the step with checkpointing and chunked FF off
    (``measure.mfu.flops_config``); TREAD-routed blocks count the tokens they keep. The trainer's
    MFU uses it; the GPU check counts the same (``plan(flops_config(cfg)).counters``)."""
    sim = simulate_step(flops_config(cfg), arch, shape or train_shape(cfg))
    return model_flops(sim["fwd_flops"], sim["bwd_flops"])


def _text_encoder(cfg: Config):
    """(kind, tokens per prompt it runs on, local config or None, (weight bytes, peak activation
    bytes, FLOPs)) of the family's text encoder while caching (memoised by the probe)."""
    fam = family(cfg.model.family)
    kind = getattr(fam, "TEXT_ENCODER", "umt5")
    te_len = getattr(fam, "TEXT_ENCODER_LEN", fam.TEXT_LEN)
    te_cfg = P.local_component_config(cfg.model, "text_encoder")
    return kind, te_len, te_cfg, P.probe_text_encoder(cfg.cache.text_batch_size, _dtype(cfg.model.text_encoder_dtype),
                                                      text_len=te_len, config=te_cfg, kind=kind)


def _caching_phase(cfg: Config, dev: D.Device, shape: Shape) -> Phase:
    kind, te_len, te_cfg, (te_w, te_act, _) = _text_encoder(cfg)
    vae_w, vae_act, _ = P.probe_vae(shape.frames, shape.height, shape.width, _dtype(cfg.model.vae_dtype),
                                    decode=False, batch=cfg.cache.vae_batch_size, config=vae_config(cfg.model))
    full_name = {"umt5": "UMT5-XXL", "gemma2": "Gemma2-2B"}[kind]
    te_name = f"text encoder {full_name} weights" if te_cfg is None else "text encoder weights (local config)"
    inputs = model_inputs(cfg.model)
    clip_w = 0  # Wan 2.1 I2V's CLIP image encoder embeds each clip's first frame
    if inputs is not None and inputs.image_encoder:
        clip_w = P.image_encoder_bytes(P.local_component_config(cfg.model, "image_encoder"))
    clip = [Item("image encoder (CLIP) weights, fp32", clip_w)] if clip_w else []
    au_w = au_act = 0
    au_items = []
    if cfg.model.family == "wan_s2v":  # wav2vec2 over each video's whole audio track
        limits = [d.audio.max_duration_seconds for d in cfg.datasets]
        seconds = max(limits) if limits and None not in limits else AUDIO_SECONDS
        au_w, au_act, _ = P.probe_audio_encoder(_dtype(cfg.model.audio_encoder_dtype), seconds,
                                                P.local_component_config(cfg.model, "audio_encoder"))
        au_items = [Item("audio encoder (wav2vec2) weights", au_w),
                    Item(f"audio encoder activations ({seconds:g} s of audio)", au_act,
                         "" if None not in limits else "no audio.max_duration_seconds: sized for 60 s")]
    items = []
    if cfg.memory.offload_during_startup:
        te_peak, vae_peak = te_w + te_act, vae_w + vae_act
        first = max(te_peak, vae_peak, clip_w, au_w + au_act)
        items = [Item(te_name, te_w, "alone on the device (offload_during_startup)"),
                 Item(f"text encoder activations ({cfg.cache.text_batch_size} x {te_len} tokens)", te_act),
                 Item("VAE weights", vae_w, "alone on the device"),
                 Item(f"VAE encode activations ({shape})", vae_act)] + clip + au_items
        peak = first
        note = "encoders one at a time"
    else:
        items = [Item(te_name, te_w), Item("VAE weights", vae_w),
                 Item(f"text encoder activations ({cfg.cache.text_batch_size} x {te_len} tokens)", te_act),
                 Item(f"VAE encode activations ({shape})", vae_act)] + clip + au_items
        peak = te_w + vae_w + clip_w + au_w + max(te_act, vae_act, au_act)
        note = "all encoders resident"
    return Phase("caching", items, peak, peak <= dev.usable_bytes, note)


def plan(config: Config, gpu: str = "rtx4090", *, search: bool = True, arch=None, device: D.Device | None = None) -> Plan:
    """Predict the peak of each phase of ``config`` on device class ``gpu`` (``device``: a budget
    that replaces the class's, e.g. a suite's ``[device]`` table)."""
    dev = device or D.device(gpu)
    arch = arch or architecture(config.model)
    shape = train_shape(config)
    tokens = shape.tokens(arch.patch_size)
    cfg = config
    notes = []
    model = P.build_meta_model(cfg.model, cfg.adapter, arch, adapter_dtype=adapter_dtype(cfg))
    two_stage = cfg.model.experts == "both" or (cfg.validation.load_other_stage and cfg.validation.every > 0)
    resident, groups, trainable, biggest = _weights(model, cfg)
    full = cfg.adapter.type == "full"
    int8 = cfg.model.base_precision == "int8" and not full
    slots = (1 + (1 if cfg.memory.offload.use_stream else 0)) * max(groups, default=0)
    if groups and dev.name == "cpu":
        resident += sum(groups)  # on a CPU the "host" copies live in the same RAM
        notes.append("on the CPU, offloaded groups stay in the same RAM: offload cannot lower its peak")
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    masters = adapter_master_weights(cfg)
    kahan = cfg.train.optimizer in KAHAN_OPTIMIZERS and any(p.element_size() < 4 for p in trainable)
    state = int(sum(p.numel() * _state_bytes(cfg.train.optimizer, p.element_size(), masters) for p in trainable))
    ema = train_bytes if cfg.ema.enabled and cfg.ema.device == "same" else 0  # ema.device = "cpu": host RAM
    dequant = biggest if int8 else 0  # torchao int8 weight-only dequantises one weight per matmul
    b = cfg.train.batch_size
    f, h, w = shape.latent
    text_len = family(cfg.model.family).TEXT_LEN
    inputs = b * (2 * arch.in_channels * f * h * w + text_len * arch.text_dim) * _dtype(cfg.model.dtype).itemsize

    sim = simulate_step(cfg, arch, shape)
    # grads in the parameters' dtype; with master copies, fp32 copies of them too while stepping
    grads = train_bytes + (4 * sum(p.numel() for p in trainable) if masters else 0)
    if cfg.train.optimizer in ("adamw", "adamw_bf16"):
        # Measured: a first torch AdamW step on fake parameters (state creation + temporaries);
        # torch defaults to foreach on accelerators and a per-parameter loop on CPU.
        stepped = [(tuple(p.shape), torch.float32 if masters else p.dtype) for p in trainable]
        opt_peak = P.optimizer_peak(stepped, dev.name != "cpu")
        opt_transient = max(0, opt_peak - 2 * sum(math.prod(s) * dt.itemsize for s, dt in stepped))
    else:
        opt_transient = 0  # 8-bit / Lion: state counted above, temporaries are per-parameter
    static = resident + slots + train_bytes + state + ema + inputs
    act_peak = sim["peak"] + dequant
    opt_phase = grads + max(0, opt_transient)
    step_peak = static + max(act_peak, opt_phase)
    step_items = [
        Item("weights resident (frozen base" + (", int8)" if int8 else ")") if not full else "weights (trained, full)",
             resident + (train_bytes if full else 0)),
        Item("offload slots (" + (f"{1 + int(cfg.memory.offload.use_stream)} x group of "
                                  f"{cfg.memory.offload.blocks_per_group} blocks)" if groups else "off)"), slots,
             f"{sum(groups) / GiB:.1f} GiB of blocks in host RAM" if groups else ""),
        Item(f"adapter weights ({cfg.adapter.type})" if not full else "adapter weights (none: full)",
             0 if full else train_bytes),
        Item(f"optimizer state ({cfg.train.optimizer})", state,
             "with fp32 master copies" if masters else "with Kahan buffers" if kahan else ""),
        Item("EMA", ema, "" if cfg.ema.enabled else "off"),
        Item("inputs (latents, target, text embeddings)", inputs),
        Item("activations + gradients, fwd/bwd peak", sim["peak"],
             f"{len(sim['classes'])} blocks replayed from probes"),
        Item("  of which attention workspace at the probe peak", sim["attention"], "(included above)"),
        Item("int8 dequantised weight (one matmul)", dequant),
        Item("optimizer step: gradients + temporaries", opt_phase, "peak is the larger of this and activations"),
    ]
    for label, mutate in (("checkpointing", _no_ckpt), ("chunked FF", _no_chunk)):
        alt = mutate(cfg)
        if alt is not None:
            saved = simulate_step(alt, arch, shape)["peak"] - sim["peak"]
            step_items.append(Item(f"  saving from {label}", saved, "(already subtracted)"))
    step = Phase("training step", step_items, step_peak, step_peak <= dev.usable_bytes)

    phases = [_caching_phase(cfg, dev, shape), step]
    if cfg.validation.every > 0:
        vshape = validation_shape(cfg)
        vkw = _probe_kwargs(cfg, arch, vshape, 2)
        den = P.probe_step(cfg.model, cfg.adapter, arch, ckpt=False, grad=False, **vkw)
        vae_w, vae_act, _ = P.probe_vae(vshape.frames, vshape.height, vshape.width, _dtype(cfg.model.vae_dtype),
                                        decode=True, config=vae_config(cfg.model))
        train_state = resident + slots + train_bytes + state + ema
        # The other expert samples below (or above) the boundary: its non-streamed weights join
        # the device (the whole expert without block offload); its blocks share the slot pool.
        other = resident + (train_bytes if cfg.model.experts == "both" else 0) if two_stage else 0
        vpeak = train_state + other + vae_w + max(den.peak + dequant, vae_act)
        phases.append(Phase("validation", [
            Item("training state kept (weights, slots, adapter, optimizer, EMA)", train_state),
            Item("the other expert's resident weights", other,
                 "" if two_stage else "one expert samples"),
            Item("VAE weights", vae_w),
            Item(f"denoiser forward, CFG batch 2 at {vshape}", den.peak + dequant),
            Item(f"VAE decode of all {vshape.frames} frames", vae_act),
        ], vpeak, vpeak <= dev.usable_bytes, "prompt embeddings cached at startup; peak of denoise or decode"))

    host = _host_phase(cfg, model, resident, groups, train_bytes + state + ema, two_stage)
    if cfg.model.experts == "both":
        notes.append("experts = both: one expert on the device at a time; the idle one waits in host RAM "
                     "(see host RAM), its blocks in the same streamer, sharing the slot pool")
    loads = offload_loads(len(groups), int(cfg.memory.offload.use_stream)) if groups else []
    counters = dict(
        tokens=tokens, fwd_flops=sim["fwd_flops"], bwd_flops=sim["bwd_flops"],
        opt_flops=_OPT_FLOPS.get(cfg.train.optimizer.replace("paged_", "").replace("_8bit", ""), 12)
        * sum(p.numel() for p in trainable),
        materialized_bytes=sim["materialized"], step_peak_bytes=step_peak, act_peak_bytes=sim["peak"],
        offload_bytes=sum(groups[g] for _, g in loads), offload_loads=len(loads),
        group_bytes=groups, trainable_params=sum(p.numel() for p in trainable),
        # The step's parts, for the per-rank plans of several GPUs (plan_parallel).
        parts=dict(resident=resident, slots=slots, trained=train_bytes, state=state, ema=ema, inputs=inputs,
                   activations=sim["peak"], dequant=dequant, optimizer=opt_phase,
                   full=full, blocks=arch.num_layers, heads=arch.num_attention_heads),
    )
    if cfg.memory.model_cpu_offload:
        notes.append("model_cpu_offload moves whole models between phases; it does not lower the step peak")
    p = Plan(cfg, dev, shape, tokens, phases, counters, sim, notes, host=host)
    if search and not p.fits:
        p.suggestions = search_options(cfg, gpu, arch, device=dev)
    return p


def _host_phase(cfg: Config, model, resident: int, groups: list[int], training_state: int, two_stage: bool) -> Phase:
    """Host RAM of the run (a projection): steady while training, loading a model, caching."""
    both = cfg.model.experts == "both"
    on_disk = bool(cfg.memory.offload.to_disk_path) and bool(groups)
    blocks = 0 if on_disk else sum(groups)
    n = 2 if two_stage else 1
    idle = resident + training_state if both else 0  # the idle expert: what is not streamed + its training state
    other = resident if two_stage and not both else 0  # the frozen other stage between validations
    full = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    load = (n - 1) * blocks + full  # the last model loads while the one built before waits in RAM
    te_w = _text_encoder(cfg)[3][0]  # memoised
    items = [
        Item(f"streamed blocks, {n} model(s)", n * blocks, "on disk (offload.to_disk_path)" if on_disk else
             ("" if groups else "no block offload")),
        Item("idle expert (weights not streamed, adapter, optimizer, EMA)", idle, "" if both else "one expert trains"),
        Item("other stage between validations (not streamed)", other, "" if other else "none"),
        Item(f"loading a model: {cfg.model.dtype} weights before int8/offload", load,
             f"+ {n - 1} model(s) waiting" if n > 1 else ""),
        Item("caching: text encoder read into RAM", te_w),
    ]
    steady = n * blocks + idle + other
    return Phase("host RAM", items, max(steady, load, te_w), True,
                 f"steady {gib(steady).strip()} while training; excludes the Python/CUDA runtime and the OS")


def _no_ckpt(cfg):
    if not cfg.memory.gradient_checkpointing:
        return None
    c = copy.deepcopy(cfg)
    c.memory.gradient_checkpointing = False
    return c


def _no_chunk(cfg):
    if not cfg.memory.chunked_ff.enabled:
        return None
    c = copy.deepcopy(cfg)
    c.memory.chunked_ff.enabled = False
    return c


# ---------------------------------------------------------------------------------------------
# Search

def _options(cfg: Config):
    """(name, overrides) alternatives per option group; a group contributes at most one."""
    mem, full = cfg.memory, cfg.adapter.type == "full"
    groups = []
    if not mem.gradient_checkpointing or mem.gradient_checkpointing_every_n > 1:
        groups.append([("gradient_checkpointing", ["memory.gradient_checkpointing=true",
                                                    "memory.gradient_checkpointing_every_n=1"])])
    if not mem.chunked_ff.enabled:
        groups.append([("chunked_ff 4096", ["memory.chunked_ff.enabled=true", "memory.chunked_ff.chunk_size=4096"])])
    if not full and cfg.model.base_precision != "int8":
        groups.append([("int8 base", ['model.base_precision="int8"'])])
    if not full and mem.offload.type != "block_level":
        groups.append([(f"block offload, blocks_per_group={n}",
                        ['memory.offload.type="block_level"', f"memory.offload.blocks_per_group={n}",
                         "memory.offload.use_stream=true"]) for n in (4, 2, 1)])
    if not cfg.tread.routes:
        groups.append([("TREAD 0.5 over layers 2..-2", ["tread.routes=[{selection_ratio=0.5, start_layer=2, end_layer=-2}]"])])
    if full and "8bit" not in cfg.train.optimizer:  # a full fine-tune's optimizer state is its biggest item
        groups.append([("8-bit AdamW", ['train.optimizer="adamw_8bit"'])])
    if cfg.ema.enabled and cfg.ema.device == "same":
        groups.append([("EMA in CPU RAM", ['ema.device="cpu"'])])
    shrink = []
    frames = [d.num_frames for d in cfg.datasets if d.type == "video"]
    if frames and max(frames) > 49:
        shrink.append(("49 frames", [f"dataset.{i}.num_frames=49" for i, d in enumerate(cfg.dataset) if d.type == "video"]))
    res = [d.resolution for d in cfg.datasets]
    if res and max(res) > 384:
        shrink.append(("resolution 384", [f"dataset.{i}.resolution=384" for i in range(len(cfg.dataset))]))
    if shrink:
        groups.append(shrink)
    return groups


def search_options(cfg: Config, gpu: str, arch, limit: int = 6, device: D.Device | None = None) -> list[Suggestion]:
    """Minimal combinations of the option groups that fit, fewest changes first."""
    groups = _options(cfg)
    found: list[tuple[frozenset, Suggestion]] = []
    for k in range(1, len(groups) + 1):
        for combo in itertools.combinations(range(len(groups)), k):
            if any(f <= frozenset(combo) for f, _ in found):
                continue  # a subset already fits
            for choice in itertools.product(*(groups[g] for g in combo)):
                overrides = [o for _, ov in choice for o in ov]
                try:
                    alt = override(cfg, overrides, "<plan search>")
                    p = plan(alt, gpu, search=False, arch=arch, device=device)
                except (ConfigError, ValueError):  # an option this model cannot take (e.g. a route on 2 layers)
                    continue
                if p.fits:
                    found.append((frozenset(combo), Suggestion([n for n, _ in choice], overrides,
                                                               p.phase("training step").peak, p.peak)))
                    break  # first alternative in a group = the least costly (e.g. biggest offload groups)
        if len(found) >= limit:
            break
    return [s for _, s in found[:limit]]


# ---------------------------------------------------------------------------------------------
# The training device's budget

def device_budget(device) -> D.Device:
    """The memory budget of a training device: a known GPU class when the name matches one, else
    the device's own total memory; the CPU's is this machine's RAM."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return D.device("cpu")
    props = torch.cuda.get_device_properties(device)
    known = D.gpu_class(props.name) or D.DEVICES["rtx4090"]
    return dataclasses.replace(known, name="local", label=props.name, memory_bytes=props.total_memory)


def check_plan(cfg: Config, gpu: str | None = None, *, search: bool = True,
               memory: int | None = None) -> tuple[bool, str]:
    """The planner's verdict for a run: (fits, report). ``gpu`` names a device class; default:
    the training device, or with ``memory`` (bytes) a GPU of that size. ``search`` adds the
    option combinations that would fit."""
    p = plan_on(cfg, gpu, search=search, memory=memory)
    return p.fits, p.report()


def plan_on(cfg: Config, gpu: str | None, *, search: bool = True, memory: int | None = None) -> Plan:
    """:func:`plan` on device class ``gpu``, default: the training device, or with ``memory``
    (bytes) a GPU of that size (of class ``gpu`` when given)."""
    if gpu:
        dev = D.device(gpu)
    elif memory is None:
        dev = device_budget(resolve_device(cfg.train.device))
    else:
        dev = None
    if memory is not None:
        dev = D.with_memory(memory, dev)
    return plan(cfg, dev.name, device=dev, search=search)


# ---------------------------------------------------------------------------------------------
# Several GPUs (torchrun): per-rank peaks of DDP, FSDP2 and sequence parallelism

def rank_peak(parts: dict, data: str, sequence: int, world: int) -> int:
    """Projected training-step peak of one rank: ``data`` = "ddp" (every rank holds the model) or
    "fsdp" (weights, gradients, optimizer state and EMA sharded over ``world``, plus two blocks
    gathered whole: the one running and the prefetched next), and ``sequence`` = K: each rank
    holds 1/K of the tokens' activations (Ulysses: the all-to-all buffers are per-rank shares too).
    A projection from the one-GPU plan's parts, not a measurement."""
    acts = parts["activations"] // sequence + parts["dequant"]
    weights = parts["resident"] + parts["slots"] + (parts["trained"] if parts["full"] else 0)
    kept = parts["state"] + parts["ema"] + (0 if parts["full"] else parts["trained"])
    opt = parts["optimizer"]
    if data == "fsdp":
        per_block = (parts["resident"] + (parts["trained"] if parts["full"] else 0)) // max(1, parts["blocks"])
        weights = weights // world + 2 * per_block
        kept, opt = kept // world, opt // world
    return weights + kept + parts["inputs"] + max(acts, opt)


def layouts(world: int, heads: int) -> list[tuple[str, int]]:
    """(data, sequence) layouts of ``world`` ranks: sequence divides the world and the heads."""
    return [(d, k) for k in range(1, world + 1) if world % k == 0 and heads % k == 0 for d in ("ddp", "fsdp")]


def plan_parallel(cfg: Config, gpu: str | None, nproc: int, *, memory: int | None = None) -> tuple[bool, str]:
    """``vidtune-train --plan --nproc N``: the projected per-rank step peak of every layout of N
    ranks (DDP / FSDP2 x sequence parallel), and the smallest setup that fits (fewest GPUs, then
    DDP before FSDP2, then the smallest sequence group). Returns (some layout of N fits, report)."""
    p = plan_on(cfg, gpu, search=False, memory=memory)
    parts, usable = p.counters["parts"], p.device.usable_bytes
    out = [p.report(), "", f"per-rank training-step peak on {nproc} x {p.device.name} (projected from the one-GPU "
                           f"parts above; caching and validation phases as on one GPU):"]
    from .distributed import parallel_problems

    refused = {}
    for data in ("ddp", "fsdp"):
        c = copy.deepcopy(cfg)
        c.parallel.data = data
        refused[data] = (parallel_problems(c) or [""])[0]
    fits_n = False
    for data, k in layouts(nproc, parts["heads"]):
        if refused[data]:
            out.append(f"  data = {data:<4} sequence = {k:<2} refused: {refused[data]}")
            continue
        peak = rank_peak(parts, data, k, nproc)
        fits_n |= peak <= usable
        out.append(f"  data = {data:<4} sequence = {k:<2} {gib(peak)}  {'fits' if peak <= usable else 'DOES NOT FIT'}"
                   f"  [--set parallel.data='\"{data}\"' --set parallel.sequence={k}]")
    best = next(((n, d, k) for n in range(1, nproc + 1) for d, k in layouts(n, parts["heads"])
                 if not refused[d] and rank_peak(parts, d, k, n) <= usable), None)
    if best is None:
        out.append(f"no layout of up to {nproc} x {p.device.name} fits: lower the memory of one rank first "
                   f"(vidtune-train --plan without --nproc lists the options)")
    else:
        n, d, k = best
        how = "no torchrun" if n == 1 else f"torchrun --nproc_per_node={n} with parallel.data = \"{d}\", sequence = {k}"
        out.append(f"smallest setup that fits: {n} x {p.device.name} ({how}); usable {gib(usable).strip()} per GPU")
    return fits_n, "\n".join(out)
