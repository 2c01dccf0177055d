"""The one path from config sections to the model we train.

    load -> quantize -> adapter -> offload -> checkpointing -> compile -> parallel

The trainer, the planner's probes, ``vidtune-bench`` and ``benchmarks/*.py`` all build through
:func:`build_training_model`, so what we measure is what we train. Each ``apply_*`` step takes
only its own config section and is a standalone function (torchtitan's habit); the model code
knows nothing of them. The order matters:

- quantize before the adapter, so peft wraps the int8 Linears (it trains on top of them);
- the adapter before offload, so offload sees which weights are frozen (only those move);
- offload before checkpointing, so a block's recompute in backward re-enters the offload wrapper
  and reloads its group;
- compile last, around everything a block's forward does (torchtitan compiles after activation
  checkpointing too): the checkpoint becomes part of the compiled graph.
- parallel (under torchrun) after compile, as torchtitan orders it: sequence parallelism splits
  the tokens the compiled blocks see, and DDP or FSDP2 wrap the model whose blocks are compiled.

Where the weights come from is the only choice a caller makes (``init``):
``"pretrained"`` loads the checkpoint the model section names; ``"random"`` builds the same
architecture with random weights (benchmarks); ``"meta"`` builds it on the meta device, no
memory at all (the planner's probes, full-size 14B models on a laptop). Quantization and
offload need real weights, so a meta build records them in ``TrainingModel.skipped`` instead;
the planner accounts for them analytically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import apply_lora, check_adapter, load_lora_into
from .config import AdapterConfig, CompileConfig, Config, ConfigError, MemoryConfig, ModelConfig
from .distributed import Parallel, apply_data_parallel, apply_sequence_parallel, mixed_precision
from .memory.checkpointing import apply_activation_checkpointing
from .memory.offload import GroupOffload, apply_group_offload
from .memory.quant import QuantConfig
from .memory.quant import apply_quantization as quantize_blocks
from .models import family
from .models.load import apply_dtype_policy, from_pretrained
from .runtime import dtype as to_dtype

INITS = ("pretrained", "random", "meta")


@dataclass
class TrainingModel:
    """A built model and what the loop needs to know about it."""

    model: nn.Module
    params: list[nn.Parameter]  # the trained parameters, in a fixed order
    device: torch.device
    offload: GroupOffload | None = None
    compiled: int = 0  # blocks compiled
    skipped: list[str] = field(default_factory=list)  # steps a meta build could not apply
    parallel: Parallel | None = None
    step_model: nn.Module | None = None  # what the training step calls: the DDP wrapper, else ``model``

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# load

def architecture(model_cfg: ModelConfig):
    """The transformer config the model section trains: a local checkpoint's ``config.json``
    (the family's subfolder of a pipeline dir, or the transformer dir itself), else the
    flavour's full-size architecture."""
    fam = family(model_cfg.family)
    sub = transformer_subfolder(model_cfg)
    for p in (model_cfg.transformer_path, model_cfg.path):
        if not p:
            continue
        d = Path(p).expanduser()
        for cand in ([d / sub] if sub else [d, d / "transformer"]):
            if (cand / "config.json").is_file():
                return fam.CONFIG_CLASS.from_dict(json.loads((cand / "config.json").read_text()))
    arch = fam.flavour_config(model_cfg.flavour)
    if arch is None:
        raise ValueError(f"no architecture for {model_cfg.family}/{model_cfg.flavour}: point model.path at a "
                         f"local checkpoint dir with config.json")
    return arch


def transformer_subfolder(model_cfg: ModelConfig) -> str | None:
    """The transformer's subfolder in its repo: the config's ("" = the path itself), else the
    family's rule for the flavour (None = found automatically: the path, or its transformer/)."""
    if model_cfg.transformer_subfolder is not None:
        return model_cfg.transformer_subfolder
    return family(model_cfg.family).transformer_subfolder(model_cfg.flavour, model_cfg.experts)


def expert_config(model_cfg: ModelConfig, expert: str) -> ModelConfig:
    """The model section of one expert ("high" | "low") of a two-expert flavour."""
    return dataclasses.replace(model_cfg, experts=expert)


def expert_boundary(model_cfg: ModelConfig, log=print) -> float:
    """The noise level (timestep / 1000) where a two-expert checkpoint hands over from the
    high-noise expert to the low-noise one: the pipeline's ``boundary_ratio`` (the family's)."""
    return family(model_cfg.family).boundary_ratio(model_cfg, say=log)


def model_inputs(model_cfg: ModelConfig):
    """What the model section's transformer takes besides latents, text and timesteps (the
    family's ``model_inputs``, e.g. ``vidtune.models.wan.WanInputs``); None for families
    without one."""
    fam = family(model_cfg.family)
    fn = getattr(fam, "model_inputs", None)
    return fn(architecture(model_cfg), model_cfg) if fn is not None else None


def load_transformer(model_cfg: ModelConfig, init: str = "pretrained", *, arch=None, num_layers: int | None = None):
    """The transformer in the model section's dtype (the family's fp32-kept parameters stay fp32).

    ``arch`` replaces the architecture of a random or meta build; ``num_layers`` cuts it (tests
    and probes build two blocks of a full-width model)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    dt = to_dtype(model_cfg.dtype)
    kw = dict(force_2_1_time_embedding=True) if model_cfg.force_2_1_time_embedding else {}  # a Wan option
    if init == "pretrained":
        if arch is not None or num_layers is not None:
            raise ValueError("arch and num_layers describe random or meta builds; a pretrained one reads its config")
        path = model_cfg.transformer_path or model_cfg.resolved_path()
        return from_pretrained(path, subfolder=transformer_subfolder(model_cfg) or None, torch_dtype=dt, **kw)
    fam = family(model_cfg.family)
    arch = arch or architecture(model_cfg)
    if num_layers is not None:
        arch = dataclasses.replace(arch, num_layers=num_layers)
    with torch.device("meta") if init == "meta" else contextlib.nullcontext():
        model = fam.MODEL_CLASS(arch, **kw)
        return apply_dtype_policy(model, dt, fam.KEEP_FP32)


# ---------------------------------------------------------------------------------------------
# the apply_* steps, each with its own section

def apply_quantization(model: nn.Module, model_cfg: ModelConfig, device) -> int:
    """int8 weight-only base blocks (``model.base_precision``, ``model.quantize_via``)."""
    return quantize_blocks(model, QuantConfig(model_cfg.base_precision, model_cfg.quantize_via), device)


def apply_adapter(model: nn.Module, adapter_cfg: AdapterConfig, *, dtype: torch.dtype = torch.float32,
                  family: str = "wan", log=print) -> list[nn.Parameter]:
    """Freeze the base and add the LoRA or LoKr (or train everything for ``type = "full"``);
    returns the trained parameters. Adapter weights are cast to ``dtype`` (their optimizer states
    follow). The adapter init draws from torch's global RNG: seed it first."""
    if adapter_cfg.type == "full":
        model.requires_grad_(True)
        return list(model.parameters())
    problems = check_adapter(adapter_cfg, family)
    if problems:
        raise ConfigError("; ".join(problems))
    params = apply_lora(model, adapter_cfg)
    for p in params:
        p.data = p.data.to(dtype)
    if adapter_cfg.init_from:
        n = load_lora_into(model, adapter_cfg.init_from, log=log, family=family)
        log(f"adapter: started from {adapter_cfg.init_from} ({n} modules)")
    return params


def apply_offload(model: nn.Module, memory_cfg: MemoryConfig, device, share: GroupOffload | None = None
                  ) -> GroupOffload | None:
    """Block-level group offload (``memory.offload``); without it the whole model moves to ``device``.
    ``share``: another model's offload whose streamer this one joins (two experts, one slot pool)."""
    off = apply_group_offload(model, memory_cfg.offload, device, model_cpu_offload=memory_cfg.model_cpu_offload,
                              share=share)
    if off is None:
        model.to(device)
    return off


def apply_checkpointing(model: nn.Module, memory_cfg: MemoryConfig) -> int:
    """Activation checkpointing of every ``gradient_checkpointing_every_n``-th block."""
    if not memory_cfg.gradient_checkpointing:
        return 0
    return apply_activation_checkpointing(model.blocks, memory_cfg.gradient_checkpointing_every_n)


# ``compile.enabled = "auto"``, from measurements (benchmarks/README.md). CPU: inductor's step is
# 1-3.5% faster than eager at the bench config, within the run-to-run spread, for 5-15 s of compile
# per process: off. NVIDIA GPU (H200, Wan 1.3B LoRA at 32,760 tokens, two passes): 0.950x / 0.946x
# of eager, 8.4 GiB less peak, 9-12 s of compile: on, for what was measured (a bf16/fp32 base
# without offload); int8 bases, offload and ROCm stay eager until measured.
COMPILE_AUTO = {"cpu": False, "cuda": True}


def compile_enabled(compile_cfg: CompileConfig, device, *, quantized: bool = False, offloaded: bool = False) -> bool:
    if compile_cfg.enabled == "auto":
        dev = torch.device(device).type
        if dev == "cuda" and (torch.version.hip is not None or quantized or offloaded):
            return False
        return COMPILE_AUTO.get(dev, False)
    return compile_cfg.enabled == "on"


def apply_compile(model: nn.Module, compile_cfg: CompileConfig, device="cpu", *, quantized: bool = False,
                  offloaded: bool = False) -> int:
    """Regional compilation: each block's own computation goes through ``torch.compile``. The
    blocks share their code, so Dynamo traces the block class once and the blocks reuse that graph
    (parameters are graph inputs, not constants): a 40-block model compiles one graph, not 40
    (two with a frozen patch embedding: block 0's input needs no grad, a guard Dynamo keys on).
    The head and tail stay eager (they run once per step). Returns the blocks compiled (0 when
    compile is off for this device).

    The compiled function goes *inside* the checkpointing and offload wrappers (they look their
    inner function up at call time): offload's bookkeeping stays eager Python, and a checkpointed
    block's recompute in backward replays the compiled forward.

    Token count: TREAD routes and buckets change it. ``dynamic = "auto"`` is torch's automatic
    dynamic shapes: the first time a second count shows up the block graph is recompiled once
    with the token dimension symbolic, and every later count reuses it; ``"on"`` makes the
    dimensions symbolic from the start, ``"off"`` compiles one graph per count."""
    if not compile_enabled(compile_cfg, device, quantized=quantized, offloaded=offloaded):
        return 0
    kw = dict(backend=compile_cfg.backend, dynamic={"auto": None, "on": True, "off": False}[compile_cfg.dynamic])
    if compile_cfg.mode != "default":
        kw["mode"] = compile_cfg.mode
    n = 0
    for block in model.blocks:
        holder, fn = None, block.forward
        while getattr(fn, "_vidtune_wrapper", False) and not getattr(fn, "_vidtune_compiled", False):
            holder, fn = fn, fn.__wrapped__
        if getattr(fn, "_vidtune_compiled", False):
            continue  # compiled already
        compiled = _compiled(fn, kw)
        if holder is None:
            block.forward = compiled
        else:
            holder.__wrapped__ = compiled
        n += 1
    return n


def _compiled(fn, kw):
    run = torch.compile(fn, **kw)

    @functools.wraps(fn)
    def forward(*args, **kwargs):
        return run(*args, **kwargs)

    forward._vidtune_compiled = True
    return forward


def apply_parallel(model: nn.Module, par: Parallel | None, model_cfg: ModelConfig, mixed: str = "no") -> nn.Module:
    """Under torchrun: sequence parallelism (``parallel.sequence``), then DDP or FSDP2 (``parallel.data``)
    over every rank. Returns the module the training step calls (the model itself without ``par``)."""
    if par is None:
        return model
    apply_sequence_parallel(model, par)
    policy = mixed_precision(model_cfg, mixed, par.device) if par.shards_model else None
    return apply_data_parallel(model, par, policy)


# ---------------------------------------------------------------------------------------------
# the whole path

def adapter_dtype(cfg: Config) -> torch.dtype:
    """The adapter weights' dtype (``adapter.dtype``). auto: bf16 on a bf16 model, so peft keeps no
    fp32 copies of the bf16 activations it multiplies, and for adamw_bf16 (its Kahan summation is
    for bf16 weights); fp32 otherwise. The optimizer keeps bf16 updates exact (``train.optim``)."""
    if cfg.adapter.dtype != "auto":
        return to_dtype(cfg.adapter.dtype)
    bf16 = cfg.model.dtype == "bf16" or cfg.train.optimizer == "adamw_bf16"
    return torch.bfloat16 if bf16 else torch.float32


# torch-optimi's optimizers: Kahan summation keeps the bits a bf16 weight update would round away.
KAHAN_OPTIMIZERS = ("adamw_bf16", "lion")


def adapter_master_weights(cfg: Config) -> bool:
    """Whether the optimizer steps fp32 master copies of the adapter: bf16 adapter weights with an
    optimizer that has no Kahan summation (torch AdamW, bitsandbytes' 8-bit ones)."""
    return (cfg.adapter.type != "full" and adapter_dtype(cfg) != torch.float32
            and cfg.train.optimizer not in KAHAN_OPTIMIZERS)


def build_training_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, memory_cfg: MemoryConfig,
                         compile_cfg: CompileConfig, device, *, adapter_dtype: torch.dtype = torch.float32,
                         seed: int | None = None, init: str = "pretrained", arch=None,
                         num_layers: int | None = None, offload_share: GroupOffload | None = None,
                         parallel: Parallel | None = None, mixed_precision: str = "no",
                         log=print) -> TrainingModel:
    """Load the transformer and apply quantize -> adapter -> offload -> checkpointing -> compile
    -> parallel (``parallel``: this rank's place in a torchrun launch; ``mixed_precision``: the
    autocast dtype name, for FSDP2's policy).

    ``seed`` seeds torch's global RNG before the adapter is made (LoRA init draws from it).
    ``offload_share``: the offload of a model built before whose streamer this one shares."""
    device = torch.device("meta") if init == "meta" else torch.device(device)
    model = load_transformer(model_cfg, init, arch=arch, num_layers=num_layers)
    model.set_attention_backend(model_cfg.attention_backend)
    model.set_ff_chunk_size(memory_cfg.chunked_ff.chunk_size if memory_cfg.chunked_ff.enabled else None)
    skipped = []
    if init == "meta":
        skipped += ["quantize"] if model_cfg.base_precision == "int8" else []
    else:
        apply_quantization(model, model_cfg, device)
    if seed is not None:
        torch.manual_seed(seed)
    params = apply_adapter(model, adapter_cfg, dtype=adapter_dtype, family=model_cfg.family, log=log)
    offload = None
    if init == "meta":
        skipped += ["offload"] if memory_cfg.offload.type != "none" else []
    else:
        offload = apply_offload(model, memory_cfg, device, offload_share)
    apply_checkpointing(model, memory_cfg)
    compiled = 0 if init == "meta" else apply_compile(
        model, compile_cfg, device, quantized=model_cfg.base_precision == "int8", offloaded=offload is not None)
    model.train()
    step_model = apply_parallel(model, parallel, model_cfg, mixed_precision) if init != "meta" else model
    return TrainingModel(model, params, device, offload, compiled, skipped, parallel, step_model)


def build_frozen_model(model_cfg: ModelConfig, memory_cfg: MemoryConfig, device, *,
                       offload_share: GroupOffload | None = None) -> nn.Module:
    """A model that only samples (the other expert during validation): load -> quantize ->
    offload, no adapter, no checkpointing, every weight frozen, in eval mode."""
    device = torch.device(device)
    model = load_transformer(model_cfg, "pretrained")
    model.set_attention_backend(model_cfg.attention_backend)
    model.set_ff_chunk_size(memory_cfg.chunked_ff.chunk_size if memory_cfg.chunked_ff.enabled else None)
    apply_quantization(model, model_cfg, device)
    model.requires_grad_(False)
    apply_offload(model, memory_cfg, device, offload_share)
    return model.eval()


def build_from_config(cfg: Config, device, **kw) -> TrainingModel:
    """:func:`build_training_model` with the sections of one run config, seeded like the trainer.
    Everything that builds "the model this config trains" calls this."""
    return build_training_model(cfg.model, cfg.adapter, cfg.memory, cfg.compile, device,
                                adapter_dtype=adapter_dtype(cfg), seed=cfg.train.seed,
                                mixed_precision=cfg.train.mixed_precision, **kw)
