"""Wan S2V flavours: the full-size architecture of each (official ``wan/configs/wan_s2v_14B.py``)."""
from __future__ import annotations

from .model import WanS2VConfig

ARCHS = {"s2v-14b-2.2": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                             text_dim=4096)}


def flavour_config(flavour: str) -> WanS2VConfig | None:
    """The full-size config of a flavour (the S2V defaults are the 14B's), None when unknown."""
    return WanS2VConfig(**ARCHS[flavour]) if flavour in ARCHS else None


def transformer_subfolder(flavour: str, expert: str | None = None) -> str | None:
    return None  # one transformer (no experts)
