"""A run's adapter files: the layouts ``adapter.export_format`` asks for, each under the name of
what loads it, with metadata that says what the adapter was trained on.

The default for Wan (and Wan S2V) is one file in the original layout (``wan_lora.safetensors``):
ComfyUI reads it, and so does diffusers' ``load_lora_weights`` as long as every module is one its
converter handles. When one is not (the Conv3d ``patch_embedding``, S2V's audio injector), a
diffusers-layout file is written beside it and one log line says so.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..runtime import DTYPES
from .layouts import diffusers_reads
from .lora import DIFFUSERS_FILE, WAN_FILE, WAN_LOKR_FILE, adapter_layers, export_lora
from .names import export_layouts, original_name

# Modules diffusers' Wan converter (0.42) has no key for in the original layout.
NOT_IN_DIFFUSERS_CONVERTER = ("patch_embedding",)


def model_flavour(cfg: Config, model) -> str:
    """``model.flavour`` when the model has that flavour's architecture, else ``custom`` (a
    fine-tune of another size, a tiny test model)."""
    from ..models import family

    ref = family(cfg.model.family).flavour_config(cfg.model.flavour)
    mine = getattr(model, "config", None)
    same = ref is not None and hasattr(mine, "to_dict") and ref.to_dict() == mine.to_dict()
    return cfg.model.flavour if same else "custom"


def trigger_words(cfg: Config) -> str:
    """The datasets' caption prefixes, the words that call up what the adapter learned."""
    return ", ".join(sorted({d.caption_prefix.strip() for d in cfg.datasets if d.caption_prefix.strip()}))


def run_metadata(cfg: Config, model, step: int, expert: str | None = None) -> dict[str, str]:
    trigger = trigger_words(cfg)
    meta = {"base_model": cfg.model.transformer_path or cfg.model.resolved_path(), "family": cfg.model.family,
            "flavour": model_flavour(cfg, model), "trigger_word": trigger, "steps": str(step)}
    if expert or cfg.model.experts:  # which expert of a two-expert checkpoint (Wan 2.2 A14B) it adapts
        meta["expert"] = expert or cfg.model.experts
    if hasattr(getattr(model, "config", None), "to_dict"):
        meta["model_config"] = json.dumps(model.config.to_dict(), sort_keys=True)
    return meta


def export_adapter_files(cfg: Config, model, run_dir: str | Path, step: int, log=print,
                         expert: str | None = None) -> list[Path]:
    """Write the run's adapter in each layout of ``adapter.export_format`` (in the model's dtype);
    returns the files written. ``expert`` (a run training both experts of Wan 2.2 A14B): this
    expert's files, named ``*_high_noise`` / ``*_low_noise`` (diffusers loads the low-noise one
    with ``load_into_transformer_2=True``)."""
    from safetensors.torch import load_file

    run_dir, fam, a = Path(run_dir), cfg.model.family, cfg.adapter
    meta, dtype = run_metadata(cfg, model, step, expert), DTYPES[cfg.model.dtype]
    layouts = export_layouts(a, fam)

    def name(file: str) -> str:
        return file.replace(".safetensors", f"_{expert}_noise.safetensors") if expert else file

    names = {"wan": name(WAN_LOKR_FILE if a.type == "lokr" else WAN_FILE), "diffusers": name(DIFFUSERS_FILE)}
    files = [export_lora(model, run_dir / names[layout], a, layout, meta, dtype, fam) for layout in layouts]
    if layouts == ["wan"] and a.type == "lora":
        problem = diffusers_reads(load_file(files[0]))
        if problem:
            files.append(export_lora(model, run_dir / names["diffusers"], a, "diffusers", meta, dtype, fam))
            # diffusers converts Wan's names only: not S2V's audio injector, nor the patch embedding
            which = [n for n in adapter_layers(model)
                     if n in NOT_IN_DIFFUSERS_CONVERTER or original_name(n, "wan") is None]
            more = f" and {len(which) - 2} more" if len(which) > 2 else ""
            why = f"its converter has no key for {', '.join(which[:2])}{more}" if which else problem[:160]
            log(f"adapter: {files[0].name} is for ComfyUI; diffusers cannot read it ({why}), so "
                f"{names['diffusers']} beside it is for diffusers' load_lora_weights")
    return files
