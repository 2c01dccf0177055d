"""Wan flavours: the full-size architecture each one names and where its transformer lives.

Architectures are the diffusers configs of the published checkpoints (SPEC "Full-size
architectures"); the planner and the benchmarks build them without weights.
"""
from __future__ import annotations

from .model import WanConfig

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096)
ARCHS = {
    "t2v-480p-1.3b-2.1": WAN_1_3B,
    "t2v-480p-14b-2.1": WAN_14B,
    "t2v-a14b-2.2": WAN_14B,
    "i2v-14b-2.2-high": {**WAN_14B, "in_channels": 36},
    "i2v-14b-2.2-low": {**WAN_14B, "in_channels": 36},
}


def flavour_config(flavour: str) -> WanConfig | None:
    """The full-size config of a flavour, None when the flavour has no built-in architecture."""
    return WanConfig(**ARCHS[flavour]) if flavour in ARCHS else None


def transformer_subfolder(flavour: str) -> str | None:
    """Two-stage Wan 2.2 repos hold the high-noise expert in ``transformer`` and the low-noise one
    in ``transformer_2``; None: the default place (``transformer/`` of a pipeline)."""
    return "transformer_2" if flavour.endswith("-2.2-low") else None
