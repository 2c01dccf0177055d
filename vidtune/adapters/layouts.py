"""Adapter files: one in-memory form (module name -> ``AdapterModule``) and the key layouts it is
read from and written to. Module names are diffusers' (``blocks.0.attn1.to_q``), our models' too.

- ``diffusers``: ``transformer.<name>.lora_A.weight`` / ``.lora_B.weight``; the scale is
  ``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (none: 1). LoRA only: diffusers'
  Wan loader reads no LoKr.
- ``wan`` (the original Wan names, which ComfyUI reads): ``diffusion_model.<original name>.`` +
  ``lora_down.weight``, ``lora_up.weight``, ``alpha`` (LoRA) or LyCORIS's LoKr tensors ``lokr_w1``
  (or ``lokr_w1_a`` + ``lokr_w1_b``), ``lokr_w2`` (or ``lokr_w2_a`` + ``lokr_w2_b``), ``alpha``.
- ``musubi`` (musubi-tuner / kohya): ``lora_unet_<original name, dots as _>.`` + the same suffixes.

ComfyUI maps exactly these two original-name forms onto a Wan model (``comfy/lora.py``,
``model_lora_keys_unet``: ``diffusion_model.<path>`` and ``lora_unet_<path with _>`` for every
``diffusion_model.<path>.weight`` of the model) and scales a LoRA by ``alpha / rank``, a LoKr by
``alpha`` over the rank of its factored part (1 with full Kronecker factors, as LyCORIS), and by 1
without ``alpha``. diffusers converts the wan layout itself
(``_convert_non_diffusers_wan_lora_to_diffusers``) but applies ``alpha`` to the block linears only:
it raises on ``alpha`` of the head, the embedders and the image projection, and on
``patch_embedding`` keys. So outside the blocks a LoRA's scale is baked into its up weight and no
``alpha`` is written, and a file diffusers still cannot read gets a diffusers-layout companion
(``diffusers_reads``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .names import BLOCK_RE, ORIGINAL_NAMES, AdapterError, diffusers_name, has_original_names, original_name

LAYOUTS = ("diffusers", "wan", "musubi")


# ---------------------------------------------------------------------------------------------
# The in-memory form

LORA_KEYS = ("down", "up")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class AdapterModule:
    """One adapted module: a LoRA (``down`` (r, in, *k), ``up`` (out, r, *1)) or a LoKr (``lokr_w1``
    or ``lokr_w1_a`` @ ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` @ ``lokr_w2_b``; the weight delta
    is their Kronecker product), tensors as stored, and ``alpha`` (None: scale 1)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def kind(self) -> str:
        return "lokr" if any(k.startswith("lokr_") for k in self.tensors) else "lora"

    @property
    def rank(self) -> int | None:
        """What ``alpha`` is divided by: a LoRA's rank; a LoKr's factored rank (LyCORIS and
        ComfyUI: w2's if factored, else w1's; None with full factors, whose scale is 1)."""
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        for k in ("lokr_w2_b", "lokr_w1_b"):
            if k in t:
                return t[k].shape[0]
        return None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else float(self.alpha) / self.rank

    @property
    def up_key(self) -> str:
        """The tensor a scale is folded into: the LoRA up weight, LoKr's w2 (or its a factor)."""
        if self.kind == "lora":
            return "up"
        return "lokr_w2" if "lokr_w2" in self.tensors else "lokr_w2_a"

    def scaled(self, s: float, alpha: float | None) -> AdapterModule:
        """The weights with ``s`` folded into the up tensor, and ``alpha``."""
        t = dict(self.tensors)
        t[self.up_key] = (t[self.up_key].float() * s).to(t[self.up_key].dtype)
        return AdapterModule(t, alpha)

    def baked(self) -> AdapterModule:
        """The same delta with the scale folded into the weights and no alpha."""
        return self if self.alpha is None else self.scaled(self.scale, None)

    def to(self, dtype: torch.dtype) -> AdapterModule:
        return AdapterModule({k: v.to(dtype) for k, v in self.tensors.items()}, self.alpha)

    def delta(self, shape) -> torch.Tensor:
        """The weight delta in fp32, reshaped to the adapted weight's ``shape``."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            d = t["up"].flatten(1) @ t["down"].flatten(1)
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            d = torch.kron(w1, w2)
        shape = tuple(shape)
        if d.shape != (shape[0], math.prod(shape[1:])):
            raise AdapterError(f"a {self.kind} of tensors {({k: tuple(v.shape) for k, v in self.tensors.items()})} "
                               f"makes a {tuple(d.shape)} delta, not one for a weight of shape {shape}")
        return (d * self.scale).reshape(shape)

    def check(self, where: str) -> None:
        t = self.tensors
        if self.kind == "lora":
            if set(t) != set(LORA_KEYS):
                raise AdapterError(f"{where}: has only {sorted(t)} of a LoRA's down / up weights")
            return
        for w in ("lokr_w1", "lokr_w2"):
            if (w in t) == (f"{w}_a" in t or f"{w}_b" in t) or ((f"{w}_a" in t) != (f"{w}_b" in t)):
                raise AdapterError(f"{where}: a LoKr needs {w} or both {w}_a and {w}_b; it has {sorted(t)}")


Modules = dict[str, AdapterModule]

# Key suffix -> slot in AdapterModule.tensors (None: the alpha).
_SUFFIX = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
           "alpha": None, **{k: k for k in LOKR_KEYS}}
_SUFFIX_RE = "|".join(re.escape(s) for s in sorted(_SUFFIX, key=len, reverse=True))
_UNSUPPORTED = ("lokr_t1", "lokr_t2", "hada_", "dora_scale", "lora_mid", ".diff")


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("diffusion_model.") for k in keys):
        return "wan"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    raise AdapterError(f"not an adapter in a known layout (diffusers, wan, musubi); keys like {keys[:3]}")


def _pattern_value(name: str, patterns: dict, default):
    """peft's rank_pattern / alpha_pattern lookup (keys match a module path or a dotted suffix)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_file(path: str | Path, family: str | None = None) -> tuple[str, Modules, dict]:
    """(layout, modules, file metadata) of an adapter file in any supported layout; ``family``
    (whose module names the original layouts use) defaults to the one vidtune recorded in the
    file (``vidtune.family``), else Wan."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path} is not a file; give a .safetensors adapter")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' errors carry no file name
        raise AdapterError(f"{path}: cannot read as safetensors: {exc}") from None
    layout = detect_layout(tensors)
    family = family or meta.get("vidtune.family") or "wan"
    if layout != "diffusers" and not has_original_names(family):
        raise AdapterError(f"{path}: {layout} layout, which vidtune maps for Wan only, not {family}")
    bad = [k for k in tensors if any(u in k for u in _UNSUPPORTED)]
    if bad:
        raise AdapterError(f"{path}: {bad[0]!r}: Tucker, LoHa, DoRA, mid and diff tensors are not supported; "
                           f"vidtune reads LoRA and LoKr")
    mods: Modules = {}
    for key, t in tensors.items():
        if layout == "diffusers":
            m = re.fullmatch(r"(?:transformer\.)?(.+)\.(lora_A\.weight|lora_B\.weight)", key)
            name = m and m[1]
        else:
            prefix, sep = ("diffusion_model.", ".") if layout == "wan" else ("lora_unet_", "_")
            m = re.fullmatch(rf"{re.escape(prefix)}(.+?)\.({_SUFFIX_RE})", key)
            name = m and diffusers_name(m[1], family, sep)
            if m and name is None:
                raise AdapterError(f"{path}: {key!r}: no {family} module is called {m[1]!r} (known: "
                                   f"{', '.join(sorted(ORIGINAL_NAMES[family][1].values()))} and the block ones)")
        if not m:
            raise AdapterError(f"{path}: key {key!r} is not an adapter tensor of the {layout} layout")
        mod = mods.setdefault(name, AdapterModule())
        slot = _SUFFIX[m[2]]
        if slot is None:
            mod.alpha = float(t)
        else:
            mod.tensors[slot] = t
    if layout == "diffusers":
        peft = json.loads(meta.get("lora_adapter_metadata", "{}"))
        get = lambda k: peft.get(f"transformer.{k}", peft.get(k))  # noqa: E731
        r, alpha = get("r"), get("lora_alpha")
        for name, mod in mods.items():
            mr = _pattern_value(name, get("rank_pattern"), r)
            ma = _pattern_value(name, get("alpha_pattern"), alpha)
            if mr is not None and ma is not None and "down" in mod.tensors:
                # keep alpha / r for this module's own rank
                mod.alpha = float(ma) * mod.tensors["down"].shape[0] / float(mr)
    for name, mod in mods.items():
        mod.check(f"{path}: {name}")
    return layout, mods, meta


def _diffusers_metadata(mods: Modules) -> dict:
    """diffusers' LoraConfig for these modules (``lora_adapter_metadata``), ranks and alphas
    per module through peft's patterns when they differ."""
    ranks = {n: m.rank for n, m in mods.items()}
    alphas = {n: (m.alpha if m.alpha is not None else float(m.rank)) for n, m in mods.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    # Exact names (escaped): peft matches pattern keys as regexes against the module path.
    meta = {"r": r, "lora_alpha": a, "target_modules": sorted(mods), "lora_dropout": 0.0, "use_dora": False,
            "lora_bias": False,
            "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != a}}
    return {f"transformer.{k}": v for k, v in meta.items()}


def write_state(mods: Modules, layout: str, family: str = "wan") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of ``mods`` in ``layout``. Tensors move unchanged where the layout can
    carry the alpha; where it cannot (a LoRA outside the Wan blocks in the wan / musubi layouts)
    the scale is baked in and no alpha written."""
    if layout not in LAYOUTS:
        raise AdapterError(f"unknown adapter layout {layout!r}; use one of {LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    meta = {"vidtune.layout": layout}
    if layout == "diffusers":
        lokr = sorted(n for n, m in mods.items() if m.kind == "lokr")
        if lokr:
            raise AdapterError(f"LoKr on {lokr[:2]}: diffusers' Wan loader reads no LoKr; use the wan layout "
                               f"(LyCORIS keys ComfyUI reads)")
        for name, m in mods.items():
            out[f"transformer.{name}.lora_A.weight"] = m.tensors["down"].contiguous()
            out[f"transformer.{name}.lora_B.weight"] = m.tensors["up"].contiguous()
        meta["lora_adapter_metadata"] = json.dumps(_diffusers_metadata(mods), sort_keys=True)
        return out, meta
    if not has_original_names(family):
        raise AdapterError(f"the {layout} layout has no key table for model family {family!r}; use diffusers")
    for name, m in mods.items():
        orig = original_name(name, family)
        if orig is None:
            raise AdapterError(f"adapter on {name!r} has no {layout} key; convert it to diffusers instead")
        if m.kind == "lora" and not BLOCK_RE.fullmatch(name):
            m = m.baked()
        key = f"diffusion_model.{orig}" if layout == "wan" else f"lora_unet_{orig.replace('.', '_')}"
        for slot, t in m.tensors.items():
            suffix = {"down": "lora_down.weight", "up": "lora_up.weight"}.get(slot, slot)
            out[f"{key}.{suffix}"] = t.contiguous()
        if m.alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out, meta


def write_file(mods: Modules, path: str | Path, layout: str, metadata: dict | None = None,
               family: str = "wan") -> Path:
    """Write ``mods`` in ``layout`` atomically; ``metadata`` (strings) is kept beside the layout's own."""
    from safetensors.torch import save

    from ..fsutil import atomic_write_bytes

    tensors, meta = write_state(mods, layout, family)
    keep = {k: v for k, v in (metadata or {}).items() if k not in ("lora_adapter_metadata", "vidtune.layout")}
    return atomic_write_bytes(path, save(tensors, metadata={"format": "pt", **keep, **meta}))


def diffusers_reads(tensors: dict[str, torch.Tensor]) -> str | None:
    """None when diffusers' Wan LoRA loader converts this state dict, else its error."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    try:  # its converter scales some tensors in place: give it copies
        WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot read"
        return f"{type(exc).__name__}: {exc}"
    return None
