"""LoRA and LoKr on our models through peft; start from an existing adapter file; export.

peft's ``inject_adapter_in_model`` wraps the targeted modules in place, so parameter names stay
diffusers' names plus ``lora_A.default`` / ``lora_B.default`` (LoRA; Linear and Conv3d, also over
torchao int8 Linears) or ``lokr_w1.default`` ... (LoKr: ``LoKrConfig``; Linear and Conv1d/2d, so
no LoKr on Wan's Conv3d ``patch_embedding``). Files are read and written through
``vidtune.adapters.layouts`` (the key layouts and where the alpha goes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from .layouts import AdapterModule, Modules, read_file
from .names import AdapterError

ADAPTER = "default"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers layout (diffusers' default weight name)
WAN_FILE = "wan_lora.safetensors"  # original Wan layout: ComfyUI, and diffusers for the block linears
WAN_LOKR_FILE = "wan_lokr.safetensors"  # original Wan layout, LyCORIS LoKr keys (ComfyUI)

# Wan 2.1 I2V's image branch: the cross-attention projections (original layout: cross_attn.k_img /
# v_img) and the CLIP image projection (img_emb), which Wan 2.2 models do not have.
IMAGE_MODULES = ("attn2.add_k_proj", "attn2.add_v_proj")
IMAGE_PREFIX = "condition_embedder.image_embedder."


def lora_config(cfg: AdapterConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), init_lora_weights=True)


def lokr_config(cfg: AdapterConfig):
    from peft import LoKrConfig

    # adapter.dropout drops whole adapter outputs (peft's module_dropout): LoKr has no input dropout.
    return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, module_dropout=cfg.dropout, decompose_both=cfg.lokr_decompose_both,
                      decompose_factor=cfg.lokr_decompose_factor, target_modules=list(cfg.target_modules),
                      init_weights=True)


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> list[nn.Parameter]:
    """Freeze the model and wrap ``cfg.target_modules`` with a LoRA or LoKr (``cfg.type``);
    returns the trainable params.

    Apply after quantization, before offload and checkpointing. The init draws from torch's
    global RNG: seed it first for a reproducible start."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    config = lokr_config(cfg) if cfg.type == "lokr" else lora_config(cfg)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"adapter.target_modules = {cfg.target_modules}: {exc}. Valid Wan targets: "
                          f"to_q, to_k, to_v, to_out.0 (attn1/attn2), add_k_proj, add_v_proj (I2V), "
                          f"net.0.proj, net.2 (feed-forward), proj_out, patch_embedding (LoRA), time_proj, "
                          f"linear_1, linear_2 (embedders)") from None
    marker = ".lokr_" if cfg.type == "lokr" else ".lora_"
    params = [p for n, p in model.named_parameters() if marker in n]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA or LoKr layer."""
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLayer, LoKrLayer))}


lora_modules = adapter_layers  # the name older callers use


def _layer_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    if hasattr(m, "lora_A"):
        return {"down": m.lora_A[ADAPTER].weight, "up": m.lora_B[ADAPTER].weight}
    return {k: getattr(m, k)[ADAPTER] for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                 "lokr_w2_b") if ADAPTER in getattr(m, k)}


def adapter_modules(model: nn.Module) -> Modules:
    """The model's adapter as trained (fp32 copies on CPU): module name -> AdapterModule whose
    scale is peft's (alpha / r), through its alpha, or baked in where the file form has no alpha
    (LoKr with full Kronecker factors)."""
    out = {}
    for name, m in adapter_layers(model).items():
        mod = AdapterModule({k: v.detach().float().cpu() for k, v in _layer_tensors(m).items()})
        s = float(m.scaling[ADAPTER])
        out[name] = mod.scaled(s, None) if mod.rank is None else AdapterModule(mod.tensors, s * mod.rank)
    return out


def lora_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (A, B, scale) of a LoRA as trained (fp32 copies on CPU)."""
    return {n: (m.tensors["down"], m.tensors["up"], m.scale) for n, m in adapter_modules(model).items()
            if m.kind == "lora"}


def export_lora(model: nn.Module, path: str | Path, cfg: AdapterConfig, layout: str = "wan",
                metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.bfloat16,
                family: str | None = None) -> Path:
    """Write the model's adapter as one safetensors file (atomically) in ``layout`` with the key
    names of ``family`` (default: the model's). The diffusers layout bakes ``alpha / rank`` into
    ``lora_B`` and records ``lora_alpha = r``: every loader, with or without that metadata, then
    applies the trained scale."""
    from .layouts import write_file

    family = family or getattr(model, "family", "wan")
    mods = adapter_modules(model)
    if layout == "diffusers":
        mods = {n: m.baked() for n, m in mods.items()}
    mods = {n: m.to(dtype) for n, m in mods.items()}
    return write_file(mods, path, layout, adapter_metadata(cfg, metadata), family)


def adapter_metadata(cfg: AdapterConfig, metadata: dict | None = None) -> dict[str, str]:
    meta = {f"vidtune.{k}": str(v) for k, v in (metadata or {}).items()}
    meta.update({"vidtune.adapter": cfg.type, "vidtune.rank": str(cfg.rank), "vidtune.alpha": str(cfg.alpha),
                 "vidtune.target_modules": json.dumps(list(cfg.target_modules))})
    if cfg.type == "lokr":
        meta.update({"vidtune.lokr_decompose_factor": str(cfg.lokr_decompose_factor),
                     "vidtune.lokr_decompose_both": str(cfg.lokr_decompose_both).lower()})
    return meta


def read_lora(path: str | Path, family: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA file in any supported layout -> module name -> (A, B, scale), B x A x scale the delta."""
    _, mods, _ = _read(path, family)
    lokr = [n for n, m in mods.items() if m.kind != "lora"]
    if lokr:
        raise AdapterError(f"adapter.init_from: {path} is a LoKr (e.g. {lokr[0]}): it cannot start a LoRA run")
    return {n: (m.tensors["down"].float(), m.tensors["up"].float(), m.scale) for n, m in mods.items()}


def _read(path, family):
    try:
        return read_file(path, family)
    except AdapterError as exc:
        raise AdapterError(f"adapter.init_from: cannot read {exc}") from None


def _image_branch(name: str) -> bool:
    return name.endswith(IMAGE_MODULES) or name.startswith(IMAGE_PREFIX)


def load_lora_into(model: nn.Module, path: str | Path, log=print, family: str | None = None) -> int:
    """Set our adapter's weights so the model's weight deltas equal the file's (LoRA into a LoRA
    run, LoKr into a LoKr run); returns the modules set. ``family`` (default: the model's) names
    the file's keys."""
    _, mods, _ = _read(path, family or getattr(model, "family", "wan"))
    ours = adapter_layers(model)
    unknown = sorted(set(mods) - set(ours))
    image = [m for m in unknown if _image_branch(m)]
    if image and not any(_image_branch(n) for n, _ in model.named_modules()):
        # A Wan 2.1 I2V adapter's image branch (k_img / v_img, img_emb) on a model without one
        # (Wan 2.2): nothing to apply it to, the rest of the adapter still fits.
        log(f"adapter.init_from: {path}: {len(image)} image-branch module(s) (cross-attention k_img / v_img, "
            f"img_emb) left out: this model has no image branch")
        mods = {k: v for k, v in mods.items() if k not in image}
        unknown = sorted(set(mods) - set(ours))
    if unknown:
        raise AdapterError(
            f"adapter.init_from: {path} has adapter weights for {len(unknown)} module(s) this run does not "
            f"adapt, e.g. {unknown[:3]}; add their suffixes to adapter.target_modules")
    for name, mod in mods.items():
        layer = ours[name]
        mine = _layer_tensors(layer)
        kind = "lokr" if "lokr_w1" in mine or "lokr_w1_a" in mine else "lora"
        if mod.kind != kind:
            raise AdapterError(f"adapter.init_from: {path} holds a {mod.kind} for {name}; this run trains a "
                               f"{kind}: set adapter.type = \"{mod.kind}\"")
        shapes = {k: tuple(v.shape) for k, v in mod.tensors.items()}
        if shapes != {k: tuple(v.shape) for k, v in mine.items()}:
            fix = (f"set adapter.rank = {mod.rank}" if kind == "lora" else
                   "set adapter.rank, lokr_decompose_factor and lokr_decompose_both to the ones it was trained with")
            raise AdapterError(f"adapter.init_from: {path}: {name} has tensors {shapes}, this run "
                               f"{ {k: tuple(v.shape) for k, v in mine.items()} }; {fix}")
        # Our forward multiplies by peft's scaling: store the file's delta divided by it.
        ratio = mod.scale / float(layer.scaling[ADAPTER])
        up = mod.up_key
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(mod.tensors[k].float() * ratio if k == up else mod.tensors[k])
    missing = len(ours) - len(mods)
    if missing:
        log(f"adapter.init_from: {missing} adapted module(s) not in {path} start from their initial values")
    return len(mods)
