"""Block-level group offload: frozen block weights live in host RAM or on disk, and stream into a
bounded pool of slots (prefetch_depth + 1 groups) as the blocks run.

Apply order: quantize -> adapters (peft) -> offload -> checkpointing. Offload wraps each block's
*instance* forward; checkpointing, applied after, wraps that again, so the recompute in backward
re-enters the offload wrapper and re-loads the group.

Schedule. Blocks form groups of ``blocks_per_group``. Entering group g (a block's forward, its
recompute, a pre-backward hook on its outputs, or the unpack of one of its saved weights) keeps
the window "g and the next prefetch_depth groups in this pass's order" resident: groups outside
it are evicted, missing ones are queued, then g is waited for and its parameters pointed at its
slot. Forward order is 0..G-1, backward order is G-1..0 (the autograd engine runs later-created
nodes first, so when group g's backward starts every node of g+1 has run).

Autograd keeps weights alive across the pass (a linear saves W^T for its input grad). Without
checkpointing, a saved-tensor hook packs any tensor that lives in a slot as (group, offset,
shape, stride) and rebuilds it from wherever the group is resident at unpack time; under
checkpointing the checkpoint's own hooks drop those tensors and the recompute reloads.

Two models can share one streamer (``share=``, the two experts of a Wan 2.2 A14B checkpoint):
their groups live side by side in its host tier and take turns on one slot pool. Entering a
group of one model first releases every group the other holds, so only the running model's
weights are ever on the device.

Parameters of an evicted group point at zero-element tensors, so stray use fails loudly.
Only frozen weights move (plain tensors and tensor subclasses such as torchao's Int8Tensor,
data and scales); trainable adapter weights stay resident; nothing is ever written back.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from vidtune.config import OffloadConfig
from vidtune.memory import streamer as _st

ADAPTER_MARKERS = ("lora_", "lokr_", "hada_", "oft_", "boft_", "ia3_", "vera_", "modules_to_save")
_PIECE_ALIGN = 64


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _SlotRef:
    """A saved tensor that lived in a slot: rebuilt from the group's slot at unpack time."""

    __slots__ = ("gid", "dtype", "shape", "stride", "offset", "sub")

    def __init__(self, gid, dtype, shape, stride, offset, sub=None):
        self.gid, self.dtype, self.shape, self.stride, self.offset, self.sub = gid, dtype, shape, stride, offset, sub


class _PreBackward(torch.autograd.Function):
    """Identity whose backward enters the group before any node of its blocks runs."""

    @staticmethod
    def forward(ctx, off, gid, *xs):
        ctx.off, ctx.gid = off, gid
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.off._enter(ctx.gid)
        return (None, None, *grads)


class GroupOffload:
    """The scheduler returned by :func:`apply_group_offload`. Counters for tests and benchmarks:
    ``load_log`` [(phase, gid)] of every load issued, ``enter_log`` [(phase, gid)] of every group
    switch, ``stats()`` the streamer's byte counters."""

    def __init__(self, blocks: nn.ModuleList, cfg: OffloadConfig, device, share: "GroupOffload | None" = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.blocks = blocks
        self.depth = cfg.depth
        n = len(blocks)
        self.groups = [list(range(i, min(i + cfg.blocks_per_group, n))) for i in range(0, n, cfg.blocks_per_group)]
        self._fwd_order = list(range(len(self.groups)))
        self._bwd_order = self._fwd_order[::-1]
        self._pieces: list[list[tuple]] = []
        sizes = []
        for blk in self.groups:
            pieces, off = [], 0
            for bi in blk:
                for p, attr, t in _frozen_tensors(blocks[bi], bi):
                    nb = t.numel() * t.element_size()
                    pieces.append((p, attr, t.dtype, tuple(t.shape), off, nb))
                    off += -(-nb // _PIECE_ALIGN) * _PIECE_ALIGN
            self._pieces.append(pieces)
            sizes.append(off)
        self.group_bytes = sizes
        if share is None:
            self.streamer = _st.make_streamer(cfg.backend, self.depth + 1, max(max(sizes), 1), cfg.num_workers,
                                              self.device)
            self._sid = _st.register(self.streamer)
            self._pool = {"active": self}  # who holds the slots of this streamer
        else:
            if max(sizes) > share.streamer.slot_bytes or share.device != self.device:
                raise ValueError(f"cannot share the offload streamer: groups of {max(sizes)} bytes on {self.device} "
                                 f"vs slots of {share.streamer.slot_bytes} on {share.device} (same architecture "
                                 f"and device needed)")
            self.streamer, self._sid, self._pool = share.streamer, share._sid, share._pool
        self._owns_streamer = share is None
        self._gids: list[int] = []  # the streamer's id of each of our groups
        self._slot_by_ptr = {s.untyped_storage().data_ptr(): i for i, s in enumerate(self.streamer.slot_tensors())}
        self._slot_owner: dict[int, int] = {}
        self._bound: dict[int, int] = {}  # gid -> slot its parameters point at
        self._resident: list[int] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._materialized: set[int] = set()
        if cfg.to_disk_path:
            os.makedirs(cfg.to_disk_path, exist_ok=True)
        for gid, pieces in enumerate(self._pieces):
            host = self.streamer.add_group(max(sizes[gid], 1))
            self._gids.append(host)
            buf = self.streamer.host_tensor(host)
            for p, attr, dtype, shape, off, nb in pieces:
                t = p if attr is None else getattr(p, attr)
                buf[off:off + nb].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            if cfg.to_disk_path:
                self.streamer.spill(host, os.path.join(cfg.to_disk_path, f"group_{host:04d}.bin"))
            self._unbind(gid)
        self._cur: tuple[int, bool] | None = None
        self.load_log: list[tuple[str, int]] = []
        self.enter_log: list[tuple[str, int]] = []
        self.streamer.reset_stats()
        for gid, blk in enumerate(self.groups):
            for bi in blk:
                blocks[bi].forward = self._wrap(blocks[bi].forward, gid)

    # -- binding -----------------------------------------------------------------------------------
    def _placeholder(self, dtype):
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def _set(self, p, attr, t):
        if attr is None:
            p.data = t
        else:
            setattr(p, attr, t)

    def _bind(self, gid: int, slot: int) -> None:
        if self._bound.get(gid) == slot:
            return
        u8 = self.streamer.slot_tensors()[slot]
        for p, attr, dtype, shape, off, nb in self._pieces[gid]:
            self._set(p, attr, u8[off:off + nb].view(dtype).view(shape))
        self._bound[gid] = slot
        self._slot_owner[slot] = gid

    def _unbind(self, gid: int) -> None:
        if gid in self._materialized:  # remove() gave it ordinary tensors
            return
        for p, attr, dtype, *_ in self._pieces[gid]:
            self._set(p, attr, self._placeholder(dtype))
        self._bound.pop(gid, None)

    # -- schedule ----------------------------------------------------------------------------------
    def _enter(self, gid: int) -> int:
        bwd = _in_backward()
        if self._cur == (gid, bwd):
            return self._bound[gid]
        if self._pool["active"] is not self:  # a model sharing our streamer holds the slots
            self._pool["active"].release()
            self._pool["active"] = self
        phase = "bwd" if bwd else "fwd"
        order = self._bwd_order if bwd else self._fwd_order
        pos = order.index(gid)
        window = order[pos:pos + self.depth + 1]
        for r in [r for r in self._resident if r not in window]:
            self._unbind(r)
            torch.ops.vidtune.group_evict(self._sid, self._gids[r])
            self._resident.remove(r)
        for w in window:
            if w not in self._resident:
                torch.ops.vidtune.group_load(self._sid, self._gids[w])
                self._resident.append(w)
                self.load_log.append((phase, w))
        slot = torch.ops.vidtune.group_wait(self._sid, self._gids[gid])
        self._bind(gid, slot)
        self._cur = (gid, bwd)
        self.enter_log.append((phase, gid))
        return slot

    def _wrap(self, inner, gid: int):
        off = self

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            inner = forward.__wrapped__  # read at call time: apply_compile may swap in a compiled one
            off._enter(gid)
            grad = torch.is_grad_enabled()
            if grad and torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
                with torch.autograd.graph.saved_tensors_hooks(off._pack, off._unpack):
                    out = inner(*args, **kwargs)
            else:  # no grad, or a checkpoint's hooks own the saved tensors (it recomputes)
                out = inner(*args, **kwargs)
            if grad and not _in_backward():
                out = off._attach_prebackward(out, gid)
            return out

        forward._vidtune_offloaded = True
        forward._vidtune_wrapper = True
        return forward

    def _attach_prebackward(self, out, gid):
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else out
        if not isinstance(outs, tuple):
            return out
        idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not idx:
            return out
        hooked = _PreBackward.apply(self, gid, *(outs[i] for i in idx))
        outs = list(outs)
        for i, h in zip(idx, hooked):
            outs[i] = h
        return outs[0] if single else type(out)(outs)

    # -- saved tensors -----------------------------------------------------------------------------
    def _slot_ref(self, t):
        if type(t) in (torch.Tensor, nn.Parameter):
            if t.device != self.device:
                return None
            slot = self._slot_by_ptr.get(t.untyped_storage().data_ptr())
            if slot is None:
                return None
            return _SlotRef(self._slot_owner[slot], t.dtype, tuple(t.shape), t.stride(),
                            t.storage_offset() * t.element_size())
        if hasattr(t, "__tensor_flatten__"):
            names, ctx = t.__tensor_flatten__()
            inner = {n: self._slot_ref(getattr(t, n)) for n in names}
            if all(v is None for v in inner.values()):
                return None
            inner = {n: (v if v is not None else getattr(t, n)) for n, v in inner.items()}
            gid = next(v.gid for v in inner.values() if isinstance(v, _SlotRef))
            return _SlotRef(gid, t.dtype, tuple(t.shape), t.stride(), 0, sub=(type(t), ctx, inner))
        return None

    def _pack(self, t):
        ref = self._slot_ref(t)
        return t if ref is None else ref

    def _rebuild(self, ref: _SlotRef, slot: int):
        if ref.sub is not None:
            cls, ctx, inner = ref.sub
            inner = {n: self._rebuild(v, slot) if isinstance(v, _SlotRef) else v for n, v in inner.items()}
            return cls.__tensor_unflatten__(inner, ctx, torch.Size(ref.shape), ref.stride)
        u8 = self.streamer.slot_tensors()[slot]
        item = torch.empty((), dtype=ref.dtype).element_size()
        return u8.view(ref.dtype).as_strided(ref.shape, ref.stride, ref.offset // item)

    def _unpack(self, x):
        if not isinstance(x, _SlotRef):
            return x
        return self._rebuild(x, self._enter(x.gid))

    # -- public ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        st = self.streamer.stats()
        st.update(backend=self.streamer.backend, slot_bytes=self.streamer.slot_bytes,
                  num_slots=self.streamer.num_slots, group_bytes=list(self.group_bytes))
        return st

    def reset_stats(self) -> None:
        self.streamer.reset_stats()
        self.load_log.clear()
        self.enter_log.clear()

    def release(self) -> None:
        """Evict every group this model holds (its slots go back to the pool); the next forward
        loads them again."""
        for r in list(self._resident):
            self._unbind(r)
            torch.ops.vidtune.group_evict(self._sid, self._gids[r])
        self._resident.clear()
        self._cur = None

    def resident_groups(self) -> list[int]:
        """Our groups that hold a slot now."""
        return list(self._resident)

    def remove(self) -> None:
        """Make every weight an ordinary resident tensor again and unwrap the block forwards."""
        for gid in range(len(self.groups)):
            slot = self._enter(gid)
            u8 = self.streamer.slot_tensors()[slot]
            for p, attr, dtype, shape, off, nb in self._pieces[gid]:
                self._set(p, attr, u8[off:off + nb].view(dtype).view(shape).clone())
            self._bound.pop(gid, None)
            self._materialized.add(gid)
        for r in list(self._resident):
            torch.ops.vidtune.group_evict(self._sid, self._gids[r])
        self._resident.clear()
        for blk in self.groups:
            for bi in blk:
                f = self.blocks[bi].forward
                chain = []
                while not getattr(f, "_vidtune_offloaded", False):  # keep wrappers applied after us
                    chain.append(f)
                    f = getattr(f, "__wrapped__", None)
                    if f is None:
                        raise RuntimeError("remove(): another wrapper hides the offload wrapper")
                if chain:
                    raise RuntimeError("remove(): remove the wrappers applied after offload first "
                                       "(e.g. remove_activation_checkpointing)")
                self.blocks[bi].forward = f.__wrapped__
                if self.blocks[bi].forward == type(self.blocks[bi]).forward.__get__(self.blocks[bi]):
                    del self.blocks[bi].forward
        if self._owns_streamer:
            _st.unregister(self._sid)


def _frozen_tensors(block: nn.Module, index: int):
    """(parameter, inner attribute or None, tensor) for every frozen weight of a block."""
    seen = set()
    for name, p in block.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            if any(m in name for m in ADAPTER_MARKERS):
                continue  # trainable adapter weights stay resident
            raise ValueError(
                f"group offload moves frozen base weights only, but blocks.{index}.{name} is trainable "
                "(a full fine-tune): its updates would not be written back to the offloaded copy. "
                "Train an adapter (LoRA/LoKr) with offload, or set memory.offload.type = 'none'.")
        if type(p) in (torch.Tensor, nn.Parameter):
            yield p, None, p.data
        elif hasattr(p, "__tensor_flatten__"):
            names, _ = p.__tensor_flatten__()
            for n in names:
                inner = getattr(p, n)
                if hasattr(inner, "__tensor_flatten__") and type(inner) is not torch.Tensor:
                    raise TypeError(f"blocks.{index}.{name}: nested tensor subclasses are not offloadable")
                yield p, n, inner
        else:
            raise TypeError(f"blocks.{index}.{name}: cannot offload a {type(p).__name__}")


def apply_group_offload(model: nn.Module, cfg: OffloadConfig, device="cpu", *,
                        model_cpu_offload: bool = False, share: GroupOffload | None = None) -> GroupOffload | None:
    """Stream ``model.blocks`` in groups. Call after quantization and adapters, before
    checkpointing. Returns the scheduler (None when ``cfg.type == 'none'``). ``share``: another
    model's scheduler whose streamer (host tier and slot pool) this model joins.

    Parameters and buffers outside the offloaded frozen block weights are moved to ``device``.
    """
    cfg.validate()
    if cfg.type == "none":
        return None
    if model_cpu_offload or getattr(model, "_hf_hook", None) is not None:
        raise ValueError("group offload and whole-model CPU offload are mutually exclusive: "
                         "disable one of them (memory.offload.type = 'none' or model_cpu_offload = false)")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError("block_level offload needs model.blocks, a non-empty nn.ModuleList")
    if any(getattr(b.forward, "_vidtune_checkpointed", False) for b in blocks):
        raise ValueError("apply group offload before activation checkpointing (quantize -> offload -> "
                         "checkpointing) so the recompute reloads the group")
    if any(getattr(b.forward, "_vidtune_offloaded", False) for b in blocks):
        raise ValueError("group offload is already applied to these blocks")
    off = GroupOffload(blocks, cfg, device, share)
    model._vidtune_group_offload = off
    place_resident(model, device)
    return off


def place_resident(model: nn.Module, device) -> None:
    """Move every parameter and buffer of ``model`` that the group offload does not stream (all
    of them without offload) to ``device``: how an idle model waits in host RAM and comes back.
    Parameters keep their identity, so optimizers keep their hold on them."""
    off = getattr(model, "_vidtune_group_offload", None)
    if off is None:
        model.to(device)
        return
    dev = torch.device(device)
    if dev.type == "cpu" and off.device.type != "cpu":
        off.release()  # its slots are free for the model that runs next
    moved = {id(p) for g in off._pieces for p, *_ in g}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in moved and p.device != dev:
                p.data = p.data.to(dev)
        for name, b in mod._buffers.items():
            if b is not None and b.device != dev:
                mod._buffers[name] = b.to(dev)
