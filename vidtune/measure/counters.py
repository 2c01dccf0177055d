"""Deterministic counters: the one measuring tool for benchmarks, the planner and the CI gate.

``count(fn)`` runs ``fn`` under two dispatch modes and reports
- FLOPs (``torch.utils.flop_counter``, with a formula for CPU flash SDPA, which torch lacks);
- peak live bytes: the most bytes held at once by storages *allocated inside the region*
  (inputs and parameters that existed before are not counted; their new grads are);
- bytes materialised: the sum of the sizes of every new storage an op allocates (views and
  in-place results allocate nothing) — the measure fusion reduces;
- per-op breakdowns of both, keyed by op name, and the peak split by tensor shape (e.g. the
  share of a feed-forward's tokens x ffn_dim intermediate).
- marks: ``counts.mark(label)`` inside the region records live bytes, the peak since the previous
  mark, and FLOPs and bytes so far (the planner cuts a step into phases with them).
It works on real tensors and under ``FakeTensorMode`` (full-size models without weights): the
counts depend only on shapes, dtypes and the op sequence, so they are exact across machines.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

aten = torch.ops.aten

_registered = False


def _register_cpu_sdpa_flops() -> None:
    """torch has no FLOP formula for CPU flash SDPA (counts 0): register the standard one; and
    replace its grouped-conv backward formula (below)."""
    global _registered
    if _registered:
        return
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    from torch.utils.flop_counter import flop_registry

    if fwd is not None and fwd not in flop_registry:

        @register_flop_formula(fwd)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in flop_registry:

        @register_flop_formula(bwd)
        def _cpu_sdpa_bwd_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    # torch's convolution_backward formula ignores groups: its grad_weight term treats the input
    # as one group, overcounting a depthwise conv by its channel count (Sana's Mix-FFN: 14x the
    # forward). grad_input and grad_weight each cost what the forward does, for any groups.
    flop_registry[aten.convolution_backward] = shape_wrapper(_conv_backward_flop)
    _registered = True


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _op_name(func) -> str:
    packet = getattr(func, "overloadpacket", func)
    return getattr(packet, "__name__", str(packet))


class _StorageTracker(TorchDispatchMode):
    """Tracks storages allocated by ops: live bytes (freed via weakref finalizers) and totals."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.window_peak = 0  # peak since the last mark
        self.materialized = 0
        self.by_op: Counter = Counter()
        self.peak_by_op: Counter = Counter()  # live bytes at peak, by the op that allocated them
        self.peak_by_shape: Counter = Counter()  # live bytes at peak, by tensor shape
        self._owner: dict[int, tuple[int, str, int]] = {}
        self._known: weakref.WeakSet = weakref.WeakSet()

    def mark_existing(self, tensors) -> None:
        """Storages alive before the region: never counted, even if an op returns them."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._known.add(t.untyped_storage())

    def _free(self, key: int) -> None:
        nbytes = self._owner.pop(key, (0, "", 0))[0]
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for t in ins:
            with contextlib.suppress(Exception):
                self._known.add(t.untyped_storage())
        out = func(*args, **kwargs)
        name = _op_name(func)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                s = t.untyped_storage()
            except Exception:  # tensors without storage (e.g. some subclasses) are not counted
                continue
            if s in self._known:
                continue
            self._known.add(s)
            nbytes = s.nbytes()
            key = id(s)
            self._owner[key] = (nbytes, name, tuple(t.shape))
            weakref.finalize(s, self._free, key)
            self.live += nbytes
            self.materialized += nbytes
            self.by_op[name] += nbytes
            self.window_peak = max(self.window_peak, self.live)
            if self.live > self.peak:
                self.peak = self.live
                self.peak_by_op, self.peak_by_shape = Counter(), Counter()
                for n, op, shape in self._owner.values():
                    self.peak_by_op[op] += n
                    self.peak_by_shape[shape] += n
        return out


@dataclass
class Mark:
    """State at a ``Counts.mark`` call: live bytes now, peak since the previous mark (or the start),
    cumulative FLOPs and bytes materialised, and the live bytes by the op that allocated them
    and by (op, shape). Marked after a forward, the live bytes are what it keeps for backward
    (plus its output)."""

    label: str
    live_bytes: int
    peak_since_prev: int
    flops: int
    materialized_bytes: int
    live_by_op: dict = field(default_factory=dict, repr=False)
    live_by_shape: dict = field(default_factory=dict, repr=False)


@dataclass
class Counts:
    flops: int = 0
    peak_live_bytes: int = 0
    materialized_bytes: int = 0
    flops_by_op: dict = field(default_factory=dict)
    materialized_by_op: dict = field(default_factory=dict)
    peak_by_op: dict = field(default_factory=dict)
    peak_by_shape: dict = field(default_factory=dict)
    marks: list = field(default_factory=list)
    end_live_bytes: int = 0  # bytes allocated in the region and still alive at its end

    def mark(self, label: str) -> Mark:
        """Record a ``Mark`` now; only inside the ``counting`` region that yielded these counts."""
        live = getattr(self, "_live", None)
        if live is None:
            raise RuntimeError("Counts.mark() is only valid inside its counting() region")
        tracker, flop_mode = live
        by_op, by_shape = Counter(), Counter()
        for n, op, shape in tracker._owner.values():
            by_op[op] += n
            by_shape[(op, shape)] += n
        m = Mark(label, tracker.live, tracker.window_peak, int(flop_mode.get_total_flops()), tracker.materialized,
                 dict(by_op), dict(by_shape))
        tracker.window_peak = tracker.live
        self.marks.append(m)
        return m

    def as_row(self) -> dict:
        return {"flops": self.flops, "peak_live_bytes": self.peak_live_bytes, "materialized_bytes": self.materialized_bytes}


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global", no hooks."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@contextlib.contextmanager
def counting(existing=()):
    """Context manager yielding a ``Counts`` filled in on exit.

    ``existing``: tensors (e.g. ``model.parameters()`` and inputs) that are alive before the region;
    ops returning their storage (in-place updates) are not counted as allocations.
    """
    _register_cpu_sdpa_flops()
    counts = Counts()
    flop_mode = FlopCounterMode(display=False)
    # Only the global total is used. FlopCounterMode's per-module tracker registers grad hooks on
    # every module output, and those keep the graph (and its saved tensors) alive until the mode
    # exits: under activation checkpointing each recomputed block then stays "live", so peaks grew
    # with depth. Counting under a fixed "Global" parent keeps the same FLOPs without the hooks.
    flop_mode.mod_tracker = _GlobalOnly()
    tracker = _StorageTracker()
    tracker.mark_existing(list(existing))
    counts._live = (tracker, flop_mode)
    try:
        with flop_mode, tracker:
            yield counts
    finally:
        counts._live = None
    counts.flops = int(flop_mode.get_total_flops())
    counts.flops_by_op = {_op_name(k): int(v) for k, v in flop_mode.get_flop_counts().get("Global", {}).items()}
    counts.peak_live_bytes = tracker.peak
    counts.materialized_bytes = tracker.materialized
    counts.materialized_by_op = dict(tracker.by_op)
    counts.peak_by_op = dict(tracker.peak_by_op)
    counts.end_live_bytes = tracker.live
    counts.peak_by_shape = dict(tracker.peak_by_shape)


def count(fn, *args, existing=(), **kwargs) -> tuple[Counts, object]:
    """Run ``fn(*args, **kwargs)`` under the counters; returns (counts, result)."""
    with counting(existing) as c:
        result = fn(*args, **kwargs)
    return c, result


def count_train_step(model: torch.nn.Module, make_inputs, *, loss_fn=None) -> Counts:
    """Counts for one forward + backward of ``model`` on ``make_inputs()`` (args, kwargs).

    The loss defaults to ``output.float().pow(2).mean()``; gradients of parameters are freed after.
    """
    args, kwargs = make_inputs()
    existing = list(model.parameters()) + [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]

    def step():
        out = model(*args, **kwargs)
        loss = loss_fn(out) if loss_fn else out.float().pow(2).mean()
        loss.backward()

    c, _ = count(step, existing=existing)
    for p in model.parameters():
        p.grad = None
    return c
