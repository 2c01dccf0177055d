"""``vidtune lora merge`` and ``vidtune lora convert``: adapter files without a training run.

Layouts (``detect_layout`` tells them apart by their key prefixes):

- ``diffusers``: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B``; the scale is
  ``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (no metadata: 1).
- ``wan`` (original Wan / ComfyUI): ``diffusion_model.blocks.0.self_attn.q.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``.
- ``musubi`` (musubi-tuner / kohya): ``lora_unet_blocks_0_self_attn_q.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``.

Conversion moves tensors unchanged (same values, same dtypes) and carries alpha: into the
``.alpha`` tensors, or into diffusers' metadata when every module has the same rank and alpha,
so converting back and forth is exact. Only a diffusers file for modules with different
alpha / rank ratios gets the scale folded into ``lora_B`` (one line says so).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .lora import _TO_WAN, AdapterError, read_lora

LAYOUTS = ("diffusers", "wan", "musubi")
_FROM_WAN = {v: k for k, v in _TO_WAN.items()}
_FROM_MUSUBI = {v.replace(".", "_"): k for k, v in _TO_WAN.items()}

# module name (diffusers naming, e.g. "blocks.0.attn1.to_q") -> [down (r, in), up (out, r), alpha or None]
Modules = dict[str, list]


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("diffusion_model.") for k in keys):
        return "wan"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    raise AdapterError(f"not a LoRA in a known layout (diffusers, wan, musubi); keys like {keys[:3]}")


def _block_module(block: str, inner: str, table: dict, path) -> str:
    if inner not in table:
        raise AdapterError(f"{path}: no diffusers module for {inner!r} in block {block}; known: {sorted(table)}")
    return f"blocks.{block}.{table[inner]}"


def read_modules(path: str | Path) -> tuple[str, Modules, dict]:
    """(layout, modules, file metadata) of a LoRA file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterError(f"{path}: cannot read as safetensors: {exc}") from None
    layout = detect_layout(tensors)
    mods: Modules = {}
    slot = {"lora_down.weight": 0, "lora_up.weight": 1, "alpha": 2, "lora_A.weight": 0, "lora_B.weight": 1}
    for key, t in tensors.items():
        if layout == "wan":
            m = re.fullmatch(r"diffusion_model\.blocks\.(\d+)\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
            name = m and _block_module(m[1], m[2], _FROM_WAN, path)
        elif layout == "musubi":
            m = re.fullmatch(r"lora_unet_blocks_(\d+)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
            name = m and _block_module(m[1], m[2], _FROM_MUSUBI, path)
        else:
            m = re.fullmatch(r"(?:transformer\.)?(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", key)
            name = m and m[1]
        if not m:
            raise AdapterError(f"{path}: key {key!r} is not a LoRA down/up/alpha tensor of the {layout} layout")
        mods.setdefault(name, [None, None, None])[slot[m.groups()[-1]]] = t
    if layout == "diffusers":
        peft = json.loads(meta.get("lora_adapter_metadata", "{}"))
        r, alpha = peft.get("transformer.r", peft.get("r")), peft.get("transformer.lora_alpha", peft.get("lora_alpha"))
        if r is not None and alpha is not None:
            for name, (down, _, a) in mods.items():
                if a is None:  # the metadata's alpha is for rank r; keep the ratio for other ranks
                    mods[name][2] = torch.tensor(float(alpha) * down.shape[0] / float(r), dtype=torch.float32)
    bad = [n for n, (d, u, _) in mods.items() if d is None or u is None]
    if bad:
        raise AdapterError(f"{path}: {bad[:3]} have only one of down / up")
    return layout, mods, meta


def write_modules(mods: Modules, path: str | Path, layout: str, metadata: dict | None = None, log=print) -> Path:
    from safetensors.torch import save

    from ..fsutil import atomic_write_bytes

    if layout not in LAYOUTS:
        raise AdapterError(f"unknown LoRA layout {layout!r}; use one of {LAYOUTS}")
    meta = {k: v for k, v in (metadata or {}).items() if k != "lora_adapter_metadata"}
    meta.update({"format": "pt", "vidtune.layout": layout})
    out: dict[str, torch.Tensor] = {}
    if layout == "diffusers":
        ranks = {d.shape[0] for d, _, _ in mods.values()}
        alphas = {float(a) if a is not None else float(d.shape[0]) for d, _, a in mods.values()}
        uniform = len(ranks) == 1 and len(alphas) == 1
        if not uniform:
            log("LoRA modules differ in rank or alpha: their alpha / rank scales are folded into lora_B")
        for name, (d, u, a) in mods.items():
            scale = 1.0 if uniform or a is None else float(a) / d.shape[0]
            out[f"transformer.{name}.lora_A.weight"] = d.contiguous()
            out[f"transformer.{name}.lora_B.weight"] = (u if scale == 1.0 else (u.float() * scale).to(u.dtype)).contiguous()
        rank = ranks.pop() if len(ranks) == 1 else max(ranks)
        peft_meta = {"r": rank, "lora_alpha": alphas.pop() if uniform else rank, "target_modules": sorted(mods),
                     "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in peft_meta.items()},
                                                   sort_keys=True)
    else:
        for name, (d, u, a) in mods.items():
            parts = name.split(".")
            inner = ".".join(parts[2:])
            if parts[0] != "blocks" or inner not in _TO_WAN:
                raise AdapterError(f"LoRA on {name!r} has no {layout} key; convert it to diffusers instead")
            wan = _TO_WAN[inner]
            key = (f"diffusion_model.blocks.{parts[1]}.{wan}" if layout == "wan"
                   else f"lora_unet_blocks_{parts[1]}_{wan.replace('.', '_')}")
            out[f"{key}.lora_down.weight"] = d.contiguous()
            out[f"{key}.lora_up.weight"] = u.contiguous()
            out[f"{key}.alpha"] = a if a is not None else torch.tensor(float(d.shape[0]), dtype=torch.float32)
    return atomic_write_bytes(path, save(out, metadata=meta))


def convert_lora(src: str | Path, dst: str | Path, to: str, log=print) -> Path:
    layout, mods, meta = read_modules(src)
    log(f"{src}: {len(mods)} LoRA modules, {layout} layout -> {to}")
    return write_modules(mods, dst, to, meta, log)


@torch.no_grad()
def merge_lora(adapter: str | Path, base: str | Path, out_dir: str | Path, scale: float = 1.0, log=print) -> Path:
    """Fold ``adapter`` into the base transformer (a pipeline dir, a transformer dir or a hub id)
    and save a diffusers-layout transformer dir: ``W += scale * (alpha / r) * up @ down``, in fp32,
    rounded once to each weight's dtype."""
    from ..models import from_pretrained, save_pretrained

    model = from_pretrained(base)
    deltas = read_lora(adapter)
    modules = dict(model.named_modules())
    missing = sorted(n for n in deltas if not isinstance(modules.get(n), torch.nn.Linear))
    if missing:
        raise AdapterError(f"{adapter}: {len(missing)} LoRA module(s) are not Linear layers of {base}, "
                           f"e.g. {missing[:3]}: is this adapter for this model?")
    for name, (a, b, s) in deltas.items():
        w = modules[name].weight
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterError(f"{adapter}: {name} is {b.shape[0]}x{a.shape[1]}, the base weight {tuple(w.shape)}")
        w.copy_((w.float() + (scale * s) * (b.float() @ a.float())).to(w.dtype))
    out_dir = save_pretrained(model, out_dir)
    log(f"merged {len(deltas)} LoRA modules of {adapter} into {base} -> {out_dir}")
    return out_dir
