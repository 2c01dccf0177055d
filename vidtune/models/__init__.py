"""Model families and loading.

Each family is a package (``vidtune.models.<family>``) that exposes what the rest of vidtune needs
to know about it: ``CLASS_NAMES`` (the diffusers ``_class_name`` values it loads), ``CONFIG_CLASS``,
``MODEL_CLASS``, ``KEEP_FP32`` (parameters kept in fp32 whatever the dtype),
``flavour_config(flavour)`` (full-size architecture), ``transformer_subfolder(flavour, expert)`` and
``TEXT_LEN`` (text-encoder tokens per prompt the pipeline pads to); optionally
``model_inputs(arch, model_cfg)`` (the conditioning the transformer takes), ``checkpoint_key(key)``
(a checkpoint's key in another layout -> our parameter name) and ``example_inputs(config, hidden_states)``
(the extra model inputs probes and benchmarks pass).
Family rules live there, never in the trainer.
"""
from __future__ import annotations

import importlib

FAMILIES = ("wan", "wan_s2v", "sana_video")


def family(name: str):
    """The package of model family ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported yet (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(f"{__name__}.{name}")


def family_of_class(class_name: str | None) -> str | None:
    """The family whose checkpoints carry diffusers ``_class_name`` = ``class_name``."""
    for name in FAMILIES:
        if class_name in family(name).CLASS_NAMES:
            return name
    return None


def example_inputs(model, hidden_states) -> dict:
    """Keyword inputs besides (latents, timestep, text) that ``model``'s family needs, with shapes
    for ``hidden_states`` (the family's ``example_inputs``; probes and benchmarks)."""
    fn = getattr(family(model.family), "example_inputs", None)
    return fn(model.config, hidden_states) if fn is not None else {}


from .load import from_pretrained, save_pretrained  # noqa: E402  (load uses the registry above)

__all__ = ["FAMILIES", "example_inputs", "family", "family_of_class", "from_pretrained", "save_pretrained"]
