"""Checks before a run writes anything: is every model component where the config says?

A missing or malformed model directory used to surface as a hub lookup error (a local path taken
for a hub id) or, for the transformer, only after all the caching. ``check_model_sources`` looks
at every source the model section names, in a second, without loading a weight: a local path must
be a diffusers pipeline directory holding the components read from it; anything else must look
like a hub id (``owner/name``), fetched later.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..build import expert_config, transformer_subfolder
from ..config import ConfigError, ModelConfig
from ..models import family_of_class

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
LAYOUT = "a diffusers pipeline directory: model_index.json, transformer/, vae/, text_encoder/, tokenizer/"


def _json(path: Path, key: str, src: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key} = {src!r}: no {path} (expected {LAYOUT}); fix {key}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key} = {src!r}: {path} is unreadable ({exc}); restore it from the model's "
                          f"source") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key} = {src!r}: {path} is not a JSON object; restore it from the model's source")
    return data


def _check_transformer(d: Path, key: str, src: str, subfolder: str | None) -> None:
    cands = [d / subfolder] if subfolder else [d, d / "transformer"]
    found = next((c for c in cands if (c / "config.json").is_file()), None)
    if found is None:
        want = f"{subfolder}/" if subfolder else "transformer/"
        raise ConfigError(f"{key} = {src!r}: no {want} with a config.json (expected {LAYOUT}); fix {key}, or "
                          f"set model.transformer_path to the transformer's directory or .safetensors file")
    cls = _json(found / "config.json", key, src).get("_class_name")
    if family_of_class(cls) is None:
        raise ConfigError(f"{key} = {src!r}: {found / 'config.json'} describes a {cls}, not a transformer vidtune "
                          f"trains; point {key} at {LAYOUT}")
    if not any(found.glob("*.safetensors")):
        raise ConfigError(f"{key} = {src!r}: {found} has no .safetensors weights; restore them from the "
                          f"model's source")


def _check_source(key: str, src: str, components: list[str], subfolder: str | None) -> None:
    p = Path(src).expanduser()
    if p.is_file():
        if components == ["transformer"] and p.suffix == ".safetensors":
            return
        raise ConfigError(f"{key} = {src!r} is a file; point it at {LAYOUT}")
    if p.is_dir():
        for comp in components:
            if comp == "transformer":
                _check_transformer(p, key, src, subfolder)
            elif comp == "tokenizer":
                if not (p / comp).is_dir() or not any((p / comp).iterdir()):
                    raise ConfigError(f"{key} = {src!r}: no tokenizer/ (expected {LAYOUT}); fix {key} or set "
                                      f"model.text_encoder_path")
            else:
                _json(p / comp / "config.json", key, src)
        return
    if src.startswith((".", "/", "~")) or not HUB_ID.match(src):
        raise ConfigError(f"{key} = {src!r}: no such directory, and not a hub id (owner/name); point {key} at "
                          f"{LAYOUT}, or at a hub id")


def check_model_sources(model: ModelConfig) -> None:
    """Raise ``ConfigError`` naming the key, the path and the fix for the first model source that
    is missing or malformed. Hub ids are only checked for their form (they are fetched later)."""
    base_key = "model.path" if model.path else f"model.flavour ({model.flavour!r}'s checkpoint)"
    sources: dict[tuple[str, str], list[str]] = {}
    for comp, key, value in (("transformer", "model.transformer_path", model.transformer_path),
                             ("vae", "model.vae_path", model.vae_path),
                             ("text_encoder", "model.text_encoder_path", model.text_encoder_path),
                             ("tokenizer", "model.text_encoder_path", model.text_encoder_path)):
        sources.setdefault((key, value) if value else (base_key, model.resolved_path()), []).append(comp)
    sub = transformer_subfolder(model)  # build.load_transformer reads transformer_path the same way
    for (key, src), comps in sources.items():
        _check_source(key, src, comps, sub)
    if model.experts == "both" and not model.transformer_path:  # the low-noise expert loads too
        _check_source(base_key, model.resolved_path(), ["transformer"],
                      transformer_subfolder(expert_config(model, "low")))
