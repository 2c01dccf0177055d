"""Several GPUs and machines with torch.distributed: torchrun detection, the device mesh, and the
DDP / FSDP2 / Ulysses sequence-parallel wrappers that ``vidtune.build`` applies last.

    torchrun --nproc_per_node=8 -m vidtune.train config.toml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 -m vidtune.train config.toml

torchrun's rendezvous is all a multi-node launch needs; every rank reads the same config, and
``cache.dir`` and ``train.output_dir`` must be on a filesystem every node sees (checked at start).

Mesh. ``W`` ranks form a ``(dp, sp)`` mesh with ``sp = parallel.sequence``: rank ``r`` is
data-parallel rank ``r // sp`` and sequence rank ``r % sp``, so a sequence group is consecutive
ranks (one node's fast links). Each data-parallel rank draws its own batches; the ranks of a
sequence group share a batch and split its video tokens.

Gradients. DDP and FSDP2 reduce over all ``W`` ranks and average. Within a sequence group every
rank computes the same loss from the gathered prediction, and the gathers' backward (a
reduce-scatter) sums what the ``sp`` ranks send back, so the group's gradient is ``sp`` times its
loss's: the average over ``dp x sp`` ranks is then the mean over the data-parallel ranks, which is
what one rank accumulating ``dp`` micro-batches computes.

Timeouts. The training step's collectives (DDP/FSDP2 reductions, the sequence all-to-alls, the
loss average) give up after ``parallel.timeout_s``. Waiting for work that one rank does alone
(checkpoint writes, validation, exports) or that ranks do in shares (caching) goes through a gloo
group with ``parallel.wait_timeout_s``, so a long checkpoint write never trips the step's timeout.
A failed or timed-out collective becomes ``RankLost``: one line naming this rank, what it was doing,
and what to do.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ParallelConfig


class RankLost(RuntimeError):
    """A collective failed or timed out: another rank died or hangs (the message says what to do)."""


def world_size() -> int:
    """Ranks of this launch: torchrun's ``WORLD_SIZE``, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_COLLECTIVE = re.compile(r"gloo|nccl|rccl|connection (reset|closed|refused)|timed out|broken pipe|c10d|"
                         r"processgroup", re.I)


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective: a peer died, the network broke, a timeout (gloo
    raises a plain RuntimeError naming itself; NCCL and the store raise ``DistError``s)."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_COLLECTIVE.search(str(exc))))


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank for ``train.device``: ``auto`` / ``cuda`` take ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"train.device = {name!r}: under torchrun each rank takes cuda:LOCAL_RANK; set "
                              f"train.device = \"auto\" or \"cuda\" (CUDA_VISIBLE_DEVICES picks the GPUs)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                              f"launch with --nproc_per_node <= {torch.cuda.device_count()}")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


@dataclass
class Parallel:
    """This rank's place in a torchrun launch and the groups it talks through."""

    cfg: ParallelConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object  # DeviceMesh ("dp", "sp")
    waits: object  # gloo ProcessGroup with wait_timeout_s
    host: str = socket.gethostname()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp(self) -> int:
        return self.cfg.sequence

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def sp_group(self):
        return self.mesh.get_group("sp")

    @property
    def shards_model(self) -> bool:
        return self.cfg.data == "fsdp"

    @property
    def forward_needs_peers(self) -> bool:
        """A forward pass runs collectives (FSDP2 all-gathers, sequence all-to-alls): every rank takes part."""
        return self.shards_model or self.sp > 1

    # -- errors ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str, *, wait: bool = False):
        """Turn a failed or timed-out collective inside the block into ``RankLost``."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, RankLost) or not collective_failure(exc):
                raise
            key = "wait_timeout_s" if wait else "timeout_s"
            detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise RankLost(f"rank {self.rank} ({self.host}) lost the other ranks during {what}: {detail[:300]}. "
                           f"Another rank died or stalled past parallel.{key} = {getattr(self.cfg, key):g} s (its "
                           f"own output says why); fix that, then resume with train.resume = \"latest\"") from exc

    # -- waits (gloo, wait_timeout_s) -------------------------------------------------------------------
    def wait(self, what: str) -> None:
        """Every rank waits here until all arrive (e.g. for rank 0's checkpoint write)."""
        with self.guard(what, wait=True):
            dist.barrier(group=self.waits)

    def gather_objects(self, obj, what: str) -> list:
        """Every rank's ``obj``, on every rank, in rank order."""
        out = [None] * self.world
        with self.guard(what, wait=True):
            dist.all_gather_object(out, obj, group=self.waits)
        return out

    def broadcast_object(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self.guard(what, wait=True):
            dist.broadcast_object_list(box, src=0, group=self.waits)
        return box[0]

    def first_reason(self, reason: str, what: str) -> str:
        """The first non-empty ``reason`` of any rank (so every rank takes the same decision)."""
        return next((r for r in self.gather_objects(reason, what) if r), "")

    # -- the step's collectives (timeout_s) --------------------------------------------------------------
    def data_mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over the data-parallel ranks in place (the ranks of a sequence group hold equal values)."""
        if self.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
            t /= self.dp
        return t


def init_parallel(cfg: ParallelConfig, device: str = "auto") -> Parallel | None:
    """Join this launch's process group and build the ``(dp, sp)`` mesh; None without torchrun
    (or with one rank). Call once, before anything touches the run directory."""
    world = world_size()
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if world % cfg.sequence:
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise ConfigError(f"parallel.sequence = {cfg.sequence} does not divide the {world} ranks of this launch; "
                          f"use one of {divisors}")
    dev = rank_device(device, local)
    backend = cfg.backend
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError(f"parallel.backend = \"nccl\" needs GPUs, this rank trains on {dev}; use \"auto\" or \"gloo\"")
    if backend in ("auto", "nccl"):
        # CPU tensors (object collectives, flags) over gloo beside NCCL (RCCL on ROCm) for GPU tensors.
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s), **kw)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // cfg.sequence, cfg.sequence), mesh_dim_names=("dp", "sp"))
    waits = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.wait_timeout_s))
    return Parallel(cfg, rank, world, local, dev, mesh, waits)


def shutdown() -> None:
    """Leave the process group (at the end of a run, or on the way out of a failed one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Agreement between ranks: the same config, and the same shared directories

def _flatten(data, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_config(par: Parallel, text: str) -> None:
    """Every rank must train the config rank 0 trains (``text``: the resolved config as TOML);
    raises ConfigError on every rank, naming the keys that differ, if one does not."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    texts = par.gather_objects((par.host, text), "the config check")
    if all(t == texts[0][1] for _, t in texts):
        return
    ref = _flatten(tomllib.loads(texts[0][1]))
    problems = []
    for r, (host, t) in enumerate(texts):
        if t == texts[0][1]:
            continue
        mine = _flatten(tomllib.loads(t))
        diff = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
        shown = ", ".join(f"{k} = {mine.get(k)!r} (rank 0: {ref.get(k)!r})" for k in diff[:3])
        problems.append(f"rank {r} ({host}) has {shown}" + (f" and {len(diff) - 3} more" if len(diff) > 3 else ""))
    raise ConfigError("the ranks of this launch disagree on the config: " + "; ".join(problems[:3])
                      + ". Launch every rank with the same config file and --set options")


def check_shared_dir(par: Parallel, directory, what: str, marker: str) -> None:
    """Rank 0 wrote ``directory/marker``; every rank must read the same bytes there (one
    filesystem for all nodes). Raises ConfigError on every rank if one cannot."""
    from pathlib import Path

    path = Path(directory) / marker
    ref = par.broadcast_object(path.read_bytes() if par.is_main else None, f"the {what} check")
    seen = par.gather_objects(path.is_file() and path.read_bytes() == ref, f"the {what} check")
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"{what} = {directory} is not the same directory on every rank: rank(s) {blind} do not "
                          f"see what rank 0 wrote there ({path}); put it on a filesystem every node shares")


# ---------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism

class SequenceParallel:
    """This rank's share of a clip's tokens, and the all-to-alls around self-attention.

    Tokens split like ``tensor_split``: the first ``n % K`` ranks take one more. The model keeps
    the whole sequence's RoPE tables, so an attention knows the full token count from them and
    takes its rows; no layout state lives here (a recomputed block sees the same arguments).
    Gathers and all-to-alls are torch's functional collectives: autograd-aware (the gather's
    backward is a reduce-scatter) and traceable by ``torch.compile``.
    """

    def __init__(self, group, heads: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if heads % self.size:
            divisors = [k for k in range(1, heads + 1) if heads % k == 0]
            raise ConfigError(f"parallel.sequence = {self.size}: the model's {heads} attention heads do not divide "
                              f"by it (each rank attends with heads / sequence of them); use one of {divisors}")

    def sizes(self, n: int) -> list[int]:
        return [n // self.size + (r < n % self.size) for r in range(self.size)]

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``t`` (tokens along ``dim``)."""
        sizes = self.sizes(t.shape[dim])
        return t.narrow(dim, sum(sizes[:self.rank]), sizes[self.rank])

    def gather(self, t: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """Every rank's tokens of an ``n``-token sequence, in order (``t``: this rank's share)."""
        import torch.distributed._functional_collectives as fc

        sizes = self.sizes(n)
        most = sizes[0]
        x = t.movedim(dim, 0)
        if x.shape[0] < most:  # equal pieces for the all-gather; the padding is cut off below
            x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
        full = fc.wait_tensor(fc.all_gather_single(x.contiguous(), 0, self.group))
        if most * self.size != n:
            full = torch.cat([p[:s] for p, s in zip(full.split(most), sizes)])
        return full.movedim(0, dim)

    def to_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, s, H, d) of this rank's s tokens -> (B, n, H/K, d): every token, this rank's heads."""
        import torch.distributed._functional_collectives as fc

        b, s, h, d = x.shape
        k = self.size
        send = x.reshape(b, s, k, h // k, d).permute(2, 1, 0, 3, 4).reshape(k * s, b, h // k, d)
        got = fc.wait_tensor(fc.all_to_all_single(send.contiguous(), self.sizes(n), [s] * k, self.group))
        return got.permute(1, 0, 2, 3)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, H/K, d) -> (B, s, H, d): back to this rank's tokens, every head."""
        import torch.distributed._functional_collectives as fc

        b, n, hk, d = x.shape
        k = self.size
        sizes = self.sizes(n)
        s = sizes[self.rank]
        got = fc.wait_tensor(fc.all_to_all_single(x.permute(1, 0, 2, 3).contiguous(), [s] * k, sizes, self.group))
        return got.reshape(k, s, b, hk, d).permute(2, 1, 0, 3, 4).reshape(b, s, k * hk, d)


def apply_sequence_parallel(model: nn.Module, par: Parallel) -> SequenceParallel | None:
    """Split the model's video tokens across ``par``'s sequence group (``parallel.sequence`` > 1)."""
    if par is None or par.sp == 1:
        return None
    if not hasattr(model, "sequence_parallel"):
        raise ConfigError(f"parallel.sequence = {par.sp}: the {getattr(model, 'family', type(model).__name__)} model "
                          f"has no sequence-parallel path yet; set parallel.sequence = 1")
    sp = SequenceParallel(par.sp_group, model.config.num_attention_heads)
    for m in model.modules():
        if hasattr(m, "sequence_parallel"):
            m.sequence_parallel = sp
    return sp


# ---------------------------------------------------------------------------------------------------
# Data parallelism: DDP or FSDP2

def parallel_problems(cfg) -> list[str]:
    """Why this run config cannot train under ``parallel.data`` (checked at start, on every rank)."""
    par_cfg, model_cfg, adapter_cfg, memory_cfg, train_cfg = cfg.parallel, cfg.model, cfg.adapter, cfg.memory, cfg.train
    ema_cfg, validation_cfg = cfg.ema, cfg.validation
    if par_cfg.data != "fsdp":
        # DDP reduces only the trained (resident) parameters: int8 bases and offloaded frozen blocks
        # stay per-rank, untouched by it.
        return []
    out = []
    if model_cfg.base_precision == "int8":
        out.append("parallel.data = \"fsdp\" with model.base_precision = \"int8\": torchao's int8 weight tensors "
                   "cannot be sharded by FSDP2; use parallel.data = \"ddp\" (each rank keeps the int8 base, ~1 byte "
                   "per weight) or a bf16 base")
    if memory_cfg.offload.type != "none":
        out.append("parallel.data = \"fsdp\" with memory.offload.type = \"block_level\": FSDP2 already holds "
                   "1/world of each block and gathers it when the block runs, and block offload would move the "
                   "same weights behind its back; set memory.offload.type = \"none\" (or use parallel.data = \"ddp\")")
    if adapter_cfg.type == "full" and model_cfg.dtype != "fp32":
        out.append(f"parallel.data = \"fsdp\" with adapter.type = \"full\" and model.dtype = {model_cfg.dtype!r}: FSDP2 "
                   f"reduces gradients of one dtype per block, and the family keeps its norms and modulation tables "
                   f"in fp32; set model.dtype = \"fp32\" (sharded fp32 master weights, gathered in bf16 for compute "
                   f"under train.mixed_precision = \"bf16\")")
    if ema_cfg.enabled:
        out.append("parallel.data = \"fsdp\" with ema.enabled = true: the EMA copy would be sharded too and is "
                   "not gathered for checkpoints yet; use parallel.data = \"ddp\" or ema.enabled = false")
    if validation_cfg.every > 0:
        out.append("parallel.data = \"fsdp\" with validation.every > 0: sampling on rank 0 alone needs the whole "
                   "weights; use parallel.data = \"ddp\", or validation.every = 0 and sample the exported weights")
    if cfg.hub.repo_id and cfg.hub.push_every_checkpoint:
        out.append("parallel.data = \"fsdp\" with hub.push_every_checkpoint = true: a checkpoint's adapter is "
                   "exported from the whole weights, which rank 0 holds only at the end; set "
                   "hub.push_every_checkpoint = false (the final adapter is still pushed) or use parallel.data = \"ddp\"")
    if train_cfg.optimizer not in ("adamw", "adamw_bf16", "lion"):
        out.append(f"parallel.data = \"fsdp\" with train.optimizer = {train_cfg.optimizer!r}: bitsandbytes' 8-bit "
                   f"states do not shard; use adamw, adamw_bf16 or lion, or parallel.data = \"ddp\"")
    return out


def mixed_precision(model_cfg, autocast: str, device: torch.device):
    """FSDP2's policy: gradients reduced in fp32; parameters gathered in bf16 when they are stored
    in fp32 and the step runs under bf16 autocast on a GPU, else in their stored dtypes (a bf16
    model keeps the family's fp32 norms and modulation tables fp32, as on one GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    gather_bf16 = device.type == "cuda" and autocast == "bf16" and model_cfg.dtype == "fp32"
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if gather_bf16 else None, reduce_dtype=torch.float32)


def apply_data_parallel(model: nn.Module, par: Parallel | None, policy=None) -> nn.Module:
    """The module the training step calls: ``model`` wrapped in DDP, or sharded in place by FSDP2
    (each block, then the root), over all ranks. Apply after compile (torchtitan's order: the
    compiled blocks run inside the wrappers). Without ``par``, ``model`` itself."""
    if par is None:
        return model
    if par.shards_model:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = policy or MixedPrecisionPolicy()

        # The model's output is a reshaped view; nothing writes into it in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(par.device.type, (par.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Only the trained parameters are DDP's: frozen ones (int8, offloaded to the host) are neither
    # broadcast nor reduced, and may live anywhere.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[par.device.index] if par.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def no_sync(step_model: nn.Module, last: bool):
    """Skip the gradient reduction of a micro-step that is not the last of its step."""
    if last:
        return contextlib.nullcontext()
    # FSDP2 reduce-scatters every micro-step: holding unsharded gradients until the last one would
    # cost a whole model's gradients per rank, what sharding is for.
    return step_model.no_sync() if hasattr(step_model, "no_sync") else contextlib.nullcontext()


def load_weights(params: dict[str, nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors ``weights`` into ``params``; a sharded (FSDP2) parameter takes its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for n, p in params.items():
            w = weights[n].to(p.device, p.dtype)
            p.copy_(distribute_tensor(w, p.device_mesh, p.placements) if isinstance(p, DTensor) else w)


def weights_peak(params, par: Parallel | None) -> torch.Tensor:
    """Largest |w| over ``params`` (sharded ones included), the same on every rank (collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    peaks = [t.detach().abs().amax().float() for t in local if t.numel()]
    # One host sync: the peaks meet on the first one's device.
    peak = torch.stack([x.to(peaks[0].device) for x in peaks]).amax().cpu() if peaks else torch.zeros(())
    if par is not None and par.shards_model:
        with par.guard("the weight check", wait=True):
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=par.waits)
    return peak


@contextlib.contextmanager
def whole_sequence(model: nn.Module):
    """Run ``model`` on one rank over the whole sequence for the block (validation on rank 0)."""
    split = [m for m in model.modules() if getattr(m, "sequence_parallel", None) is not None]
    sp = split[0].sequence_parallel if split else None
    for m in split:
        m.sequence_parallel = None
    try:
        yield
    finally:
        for m in split:
            m.sequence_parallel = sp


@contextlib.contextmanager
def gathered(model: nn.Module, par: Parallel | None):
    """Every FSDP2-sharded module of ``model`` holds its whole parameters for the block (on every
    rank: collective), so checkpoints and exports read plain tensors; a no-op without FSDP2."""
    if par is None or not par.shards_model:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with par.guard("gathering the sharded weights"):
        for m in sharded:
            m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def model_state(model: nn.Module, par: Parallel | None) -> dict | None:
    """Under FSDP2 the whole state dict, on CPU on rank 0 (collective; None on the other ranks);
    None without FSDP2 (``model.state_dict()`` is whole)."""
    if par is None or not par.shards_model:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with par.guard("gathering the model", wait=True):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if par.is_main else None


def _names(model: nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order a plain ``optimizer.state_dict()`` numbers them."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer, par: Parallel | None) -> dict:
    """``optimizer.state_dict()``; under FSDP2 the whole (unsharded) state in the same layout, on
    CPU on rank 0 (collective): a checkpoint any world size, or one rank, can resume."""
    if par is None or not par.shards_model:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    names = _names(model, optimizer)
    with par.guard("gathering the optimizer state"):
        sd = get_optimizer_state_dict(model, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not par.is_main:
        return {}
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[k]: v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer, state: dict, par: Parallel | None) -> None:
    """Load what :func:`optimizer_state` saved (at any world size); under FSDP2 each rank keeps its shard."""
    if par is None or not par.shards_model:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names(model, optimizer)
    sd = {"state": {names[i]: v for i, v in state["state"].items()},
          "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    with par.guard("loading the optimizer state"):
        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP2 full fine-tunes)

def save_sharded(model: nn.Module, optimizer, dest: Path | None, par: Parallel) -> None:
    """Every rank writes its own shards of the weights and optimizer state with
    ``torch.distributed.checkpoint`` into ``dest``, a directory in rank 0's checkpoint temp
    directory (None on the other ranks: rank 0 sends it). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = par.broadcast_object(str(dest) if par.is_main else None, "the checkpoint directory")
    with par.guard("writing the sharded checkpoint", wait=True):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_sharded(path: Path, model: nn.Module, optimizer, par: Parallel | None) -> None:
    """Load ``sharded/`` of a checkpoint written by :func:`save_sharded` into ``model`` and
    ``optimizer`` at any world size: DCP reshards, each rank reading only what it holds; one
    process (no torchrun) reads it whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with par.guard("reading the sharded checkpoint", wait=True) if par else contextlib.nullcontext():
        model_sd, optim_sd = get_state_dict(model, optimizer)  # the targets, optimizer moments included
        both = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():  # one process reading it whole is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(both, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
