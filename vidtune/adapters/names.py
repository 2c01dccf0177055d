"""Which modules an adapter can name, and what they are called in each family's original
checkpoints (ComfyUI's names): plain data and checks, no torch, so a config can be checked before
anything heavy is imported (``vidtune-train --print-config`` stays instant).
"""
from __future__ import annotations

import re


class AdapterError(ValueError):
    """An adapter file or setting that cannot be used; the message names the file and the fix."""


# Wan: diffusers module path -> original Wan module path (diffusers' single-file converter,
# ``convert_wan_transformer_to_diffusers``, read backwards). Inside a block:
WAN_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
# ...and outside the blocks: the patch embedding (Conv3d), the output head, the time and text
# embedders and the I2V image projection.
WAN_TOP = {
    "patch_embedding": "patch_embedding",
    "proj_out": "head.head",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}
# Wan S2V (WanModel_S2V) shares the blocks and the embedders, has no image projection...
WAN_S2V_TOP = {k: v for k, v in WAN_TOP.items() if "image_embedder" not in k}
# ...and its audio injector's attention projections, which the default targets (to_q...) adapt
# too: numbered like blocks, named by the family's own rule (``official_module`` of
# ``vidtune.models.wan_s2v.keys``, imported when a name is asked for: it pulls in torch).
# family -> (module with official_module, our module path of injector i, modules inside it)
OFFICIAL_RULE = {"wan_s2v": ("vidtune.models.wan_s2v.keys", "audio_injector.injector.{}",
                             ("to_q", "to_k", "to_v", "to_out.0"))}
# Families whose original checkpoints (and ComfyUI) use these names.
ORIGINAL_NAMES = {"wan": (WAN_BLOCK, WAN_TOP), "wan_s2v": (WAN_BLOCK, WAN_S2V_TOP)}
# Modules LoKr cannot wrap: peft's LoKr has Linear, Conv1d and Conv2d layers, no Conv3d.
CONV3D = {"wan": ("patch_embedding",), "wan_s2v": ("patch_embedding",)}

BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def has_original_names(family: str) -> bool:
    return family in ORIGINAL_NAMES


def _official_module(family: str):
    import importlib

    return importlib.import_module(OFFICIAL_RULE[family][0]).official_module


def original_name(name: str, family: str = "wan") -> str | None:
    """The original-checkpoint path of diffusers module ``name`` (None: it has none)."""
    block, top = ORIGINAL_NAMES[family]
    m = BLOCK_RE.fullmatch(name)
    if m:
        inner = block.get(m[2])
        return inner and f"blocks.{m[1]}.{inner}"
    if name in top:
        return top[name]
    return _official_module(family)(name) if family in OFFICIAL_RULE else None


def diffusers_name(original: str, family: str = "wan", sep: str = ".") -> str | None:
    """The diffusers module path of an original path (``sep = "_"``: its kohya spelling)."""
    block, top = ORIGINAL_NAMES[family]
    m = re.fullmatch(rf"blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", original)
    if m:
        inner = {v.replace(".", sep): k for k, v in block.items()}.get(m[2])
        return inner and f"blocks.{m[1]}.{inner}"
    name = {v.replace(".", sep): k for k, v in top.items()}.get(original)
    if name is None and family in OFFICIAL_RULE:
        # The family's rule backwards: the module of the numbered owner whose official name this is.
        _, owner, inner = OFFICIAL_RULE[family]
        m = re.match(re.escape(owner.replace(".", sep)).replace(r"\{\}", r"(\d+)") + re.escape(sep), original)
        if m:
            official = _official_module(family)
            candidates = (f"{owner.format(m[1])}.{k}" for k in inner)
            name = next((c for c in candidates if (official(c) or "").replace(".", sep) == original), None)
    return name


def adaptable_names(family: str, num_blocks: int = 1) -> list[str]:
    """Every module path an adapter file of ``family`` can name (blocks, and a family's numbered
    modules such as S2V's audio injectors, 0..num_blocks-1)."""
    block, top = ORIGINAL_NAMES[family]
    names = [*top, *(f"blocks.{i}.{k}" for i in range(num_blocks) for k in block)]
    if family in OFFICIAL_RULE:
        _, owner, inner = OFFICIAL_RULE[family]
        names += [f"{owner.format(i)}.{k}" for i in range(num_blocks) for k in inner]
    return names


def target_matches(target: str, name: str) -> bool:
    """peft's rule for a ``target_modules`` entry: the module path or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def export_layouts(cfg, family: str) -> list[str]:
    """The layouts a run writes (``cfg``: the adapter section): ``auto`` is the original layout
    where the family has one (one file for ComfyUI and diffusers), else diffusers'."""
    fmt = cfg.export_format
    if fmt == "auto":
        return ["wan"] if has_original_names(family) else ["diffusers"]
    return {"both": ["wan", "diffusers"]}.get(fmt, [fmt])


def check_adapter(cfg, family: str) -> list[str]:
    """Problems of an adapter section (``cfg``) for a model family, found before anything is
    loaded or cached: targets that name no module an adapter file can hold, LoKr where peft has no
    layer, export layouts that cannot hold the adapter."""
    if cfg.type == "full":
        return []
    e = []
    layouts = export_layouts(cfg, family)
    if cfg.type == "lokr" and "diffusers" in layouts:
        e.append(f"adapter.export_format = {cfg.export_format!r}: diffusers' Wan loader reads no LoKr; use "
                 f"\"auto\" or \"wan\" (LyCORIS keys that ComfyUI reads)")
    if not has_original_names(family):
        if "wan" in layouts:
            e.append(f"adapter.export_format = {cfg.export_format!r}: no original key layout is known for model "
                     f"family {family!r}; use \"diffusers\"")
        return e
    names = adaptable_names(family)
    for t in cfg.target_modules:
        # A target with a block index ("blocks.3.attn1.to_q", "audio_injector.injector.2.to_q") is
        # checked as index 0's module.
        probe = re.sub(r"(^|\.)\d+\.", r"\g<1>0.", t, count=1)
        if not any(target_matches(probe, n) for n in names):
            e.append(f"adapter.target_modules: {t!r} names no module an adapter can train and export; use "
                     f"suffixes of {', '.join(names)} (block modules apply to every block: \"to_q\", \"net.2\"...)")
        elif cfg.type == "lokr" and any(target_matches(probe, n) for n in CONV3D.get(family, ())):
            e.append(f"adapter.target_modules: {t!r} is the Conv3d patch embedding; peft's LoKr has Linear and "
                     f"Conv1d/2d layers only: train it with adapter.type = \"lora\" or leave it out")
    return e
