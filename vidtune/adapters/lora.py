"""LoRA on our Wan model through peft, start from an existing LoRA, export in two key layouts.

peft's ``inject_adapter_in_model`` wraps the targeted Linears in place, so parameter names stay
diffusers' names plus ``lora_A.default`` / ``lora_B.default`` (peft also wraps torchao int8
Linears). Layouts we read and write:

- diffusers / peft: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (what
  ``WanPipeline.load_lora_weights`` reads). Export bakes ``alpha / rank`` into ``lora_B`` and
  records ``lora_alpha = r`` in diffusers' ``lora_adapter_metadata``: every loader, with or
  without that metadata, then applies the trained scale.
- original Wan / ComfyUI: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (weights as trained; loaders scale by alpha / rank).

Reading goes through diffusers' ``WanLoraLoaderMixin.lora_state_dict``, which also converts the
original-Wan and musubi layouts (alpha baked in) to the diffusers one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig

# peft imports bitsandbytes, whose CPU backend warns on import that an optional 4-bit matmul kernel
# from the hub is missing; vidtune never runs 4-bit matmuls (Wan refuses NF4/INT4).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER = "default"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
WAN_FILE = "wan_lora.safetensors"

# diffusers module path inside a block -> original Wan module path.
_TO_WAN = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


class AdapterError(ValueError):
    """An adapter file or setting that cannot be used; the message names the file and the fix."""


def lora_config(cfg: AdapterConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), init_lora_weights=True)


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> list[nn.Parameter]:
    """Freeze the model and wrap ``cfg.target_modules`` with LoRA; returns the trainable params.

    Apply after quantization, before offload and checkpointing. lora_A's init draws from torch's
    global RNG: seed it first for a reproducible start.
    """
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config(cfg), model, adapter_name=ADAPTER)
    except ValueError as exc:
        raise AdapterError(f"adapter.target_modules = {cfg.target_modules}: {exc}. Valid Wan targets: "
                           f"to_q, to_k, to_v, to_out.0 (attn1/attn2), add_k_proj, add_v_proj (I2V), "
                           f"net.0.proj, net.2 (feed-forward)") from None
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (A, B, scale) as trained (fp32 copies on CPU)."""
    out = {}
    for name, m in lora_modules(model).items():
        a = m.lora_A[ADAPTER].weight.detach().float().cpu()
        b = m.lora_B[ADAPTER].weight.detach().float().cpu()
        out[name] = (a, b, float(m.scaling[ADAPTER]))
    return out


def export_lora(model: nn.Module, path: str | Path, cfg: AdapterConfig, layout: str = "diffusers",
                metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the adapter as one safetensors file (atomically) in ``layout`` = diffusers | wan."""
    from safetensors.torch import save

    from ..fsutil import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": "pt", **{f"vidtune.{k}": str(v) for k, v in (metadata or {}).items()}}
    meta.update({"vidtune.rank": str(cfg.rank), "vidtune.alpha": str(cfg.alpha),
                 "vidtune.target_modules": json.dumps(list(cfg.target_modules)),
                 "vidtune.layout": layout})
    for name, (a, b, scale) in lora_weights(model).items():
        if layout == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = (b * scale).to(dtype).contiguous()
        elif layout == "wan":
            key = f"diffusion_model.{_original_module(model, name)}"
            tensors[f"{key}.lora_down.weight"] = a.to(dtype).contiguous()
            tensors[f"{key}.lora_up.weight"] = b.to(dtype).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(scale * a.shape[0], dtype=torch.float32)
        else:
            raise AdapterError(f"unknown LoRA layout {layout!r}; use diffusers or wan")
    if layout == "diffusers":
        # diffusers builds its LoraConfig from this (keys prefixed by the pipeline component).
        ranks = {a.shape[0] for a, _, _ in lora_weights(model).values()}
        rank = ranks.pop() if len(ranks) == 1 else cfg.rank
        peft_meta = {"r": rank, "lora_alpha": rank, "target_modules": sorted(lora_modules(model)),
                     "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in peft_meta.items()},
                                                   sort_keys=True)
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def _original_module(model: nn.Module, name: str) -> str:
    """The original-Wan (ComfyUI) name of one of our modules: the block table, or the family's own
    map for modules outside the blocks (Wan S2V's audio injector)."""
    from ..models import family

    parts = name.split(".")
    inner = ".".join(parts[2:])
    if parts[0] == "blocks" and inner in _TO_WAN:
        return f"blocks.{parts[1]}.{_TO_WAN[inner]}"
    other = getattr(family(getattr(model, "family", "wan")), "official_module", lambda n: None)(name)
    if other is None:
        raise AdapterError(f"LoRA on {name!r} has no original-Wan key; export it with "
                           f"adapter.export_format = \"diffusers\"")
    return other


def read_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Any supported LoRA file -> module name -> (A, B, scale) with B x A x scale the weight delta."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter.init_from: {path} is not a file; give a .safetensors LoRA")
    try:
        state, meta = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # safetensors / conversion errors carry no file name
        raise AdapterError(f"adapter.init_from: cannot read {path} as a Wan LoRA: {exc}") from None
    scale = 1.0
    if meta:
        r, alpha = meta.get("transformer.r"), meta.get("transformer.lora_alpha")
        if r and alpha and not meta.get("transformer.rank_pattern") and not meta.get("transformer.alpha_pattern"):
            scale = float(alpha) / float(r)
    out: dict[str, list] = {}
    for key, t in state.items():
        k = key.removeprefix("transformer.")
        for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if k.endswith(part):
                out.setdefault(k[: -len(part)], [None, None, scale])[idx] = t
                break
        else:
            if not k.endswith(".alpha"):
                raise AdapterError(f"adapter.init_from: {path}: key {key!r} is not a LoRA A/B weight "
                                   f"(LoKr, DoRA or bias adapters cannot start a LoRA run)")
    bad = [m for m, (a, b, _) in out.items() if a is None or b is None]
    if bad:
        raise AdapterError(f"adapter.init_from: {path}: {bad[:3]} have only one of lora_A / lora_B")
    return {m: (a.float(), b.float(), s) for m, (a, b, s) in out.items()}


def load_lora_into(model: nn.Module, path: str | Path, log=print) -> int:
    """Set our LoRA weights so the model's weight deltas equal the file's; returns modules set."""
    weights = read_lora(path)
    ours = lora_modules(model)
    unknown = sorted(set(weights) - set(ours))
    if unknown:
        raise AdapterError(
            f"adapter.init_from: {path} has LoRA weights for {len(unknown)} module(s) this run does not "
            f"adapt, e.g. {unknown[:3]}; add their suffixes to adapter.target_modules")
    for name, (a, b, scale) in weights.items():
        m = ours[name]
        A, B = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
        if a.shape != A.shape or b.shape != B.shape:
            raise AdapterError(
                f"adapter.init_from: {path}: {name} has rank {a.shape[0]} (A {tuple(a.shape)}), this run "
                f"has rank {A.shape[0]} (A {tuple(A.shape)}); set adapter.rank = {a.shape[0]}")
        with torch.no_grad():
            A.copy_(a)
            B.copy_(b * (scale / float(m.scaling[ADAPTER])))
    missing = len(ours) - len(weights)
    if missing:
        log(f"adapter.init_from: {missing} adapted module(s) not in {path} start from zero")
    return len(weights)
