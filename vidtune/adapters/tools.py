"""``vidtune lora merge`` and ``vidtune lora convert``: adapter files without a training run.

Both read every layout ``vidtune.adapters.layouts`` knows (diffusers, wan, musubi; LoRA and LoKr)
and every module an adapter can train: the block linears, the Conv3d patch embedding, the output
projection, the time and text embedders, the I2V image projection. Conversion moves tensors
unchanged (same values, same dtypes) and carries each alpha where the target layout can hold it
(so converting back and forth is exact); where it cannot, the scale is baked into the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .layouts import LAYOUTS, read_file, write_file
from .names import AdapterError

__all__ = ["LAYOUTS", "convert_lora", "merge_lora"]


def convert_lora(src: str | Path, dst: str | Path, to: str, log=print) -> Path:
    layout, mods, meta = read_file(src)
    kinds = sorted({m.kind for m in mods.values()})
    log(f"{src}: {len(mods)} {'/'.join(kinds)} modules, {layout} layout -> {to}")
    return write_file(mods, dst, to, meta, meta.get("vidtune.family") or "wan")


@torch.no_grad()
def merge_lora(adapter: str | Path, base: str | Path, out_dir: str | Path, scale: float = 1.0, log=print) -> Path:
    """Fold ``adapter`` (LoRA or LoKr) into the base transformer (a pipeline dir, a transformer dir
    or a hub id) and save a diffusers-layout transformer dir: ``W += scale * delta``, computed in
    fp32 and rounded once to each weight's dtype."""
    from ..models import from_pretrained, save_pretrained

    model = from_pretrained(base)
    _, mods, _ = read_file(adapter, getattr(model, "family", "wan"))
    modules = dict(model.named_modules())
    missing = sorted(n for n in mods if not isinstance(modules.get(n), (torch.nn.Linear, torch.nn.Conv3d)))
    if missing:
        raise AdapterError(f"{adapter}: {len(missing)} adapted module(s) are not Linear or Conv3d layers of {base}, "
                           f"e.g. {missing[:3]}: is this adapter for this model?")
    for name, mod in mods.items():
        w = modules[name].weight
        try:
            delta = mod.delta(w.shape)
        except AdapterError as exc:
            raise AdapterError(f"{adapter}: {name}: {exc}") from None
        w.copy_((w.float() + scale * delta).to(w.dtype))
    out_dir = save_pretrained(model, out_dir)
    log(f"merged {len(mods)} adapter modules of {adapter} into {base} -> {out_dir}")
    return out_dir
