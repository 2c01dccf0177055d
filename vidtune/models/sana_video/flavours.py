"""Sana Video flavours: the full-size architecture each one names and where its transformer lives.

The 2B architecture is the config ``scripts/convert_sana_video_to_diffusers.py`` (diffusers) wrote
for Efficient-Large-Model/SANA-Video_2B_480p_diffusers: dim 2240 (20 x 112), 20 layers, Gemma2-2B
captions (2304), mlp_ratio 3.0 (the converter's value; the diffusers class default is 2.5),
patch (1, 2, 2), sample_size 30 (480p). ``i2v-2b-480p`` is the same checkpoint trained and
sampled image-to-video (SanaImageToVideoPipeline's conditioning).
"""
from __future__ import annotations

from .model import SanaVideoConfig

SANA_VIDEO_2B = dict(num_attention_heads=20, attention_head_dim=112, num_layers=20, num_cross_attention_heads=20,
                     cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=3.0,
                     attention_bias=False, sample_size=30, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads")
ARCHS = {"2b-480p": SANA_VIDEO_2B, "i2v-2b-480p": SANA_VIDEO_2B}
I2V_FLAVOURS = ("i2v-2b-480p",)


def flavour_config(flavour: str) -> SanaVideoConfig | None:
    """The full-size config of a flavour, None when the flavour has no built-in architecture."""
    return SanaVideoConfig(**ARCHS[flavour]) if flavour in ARCHS else None


def transformer_subfolder(flavour: str, expert: str | None = None) -> str | None:
    """Every flavour's transformer is the pipeline's ``transformer/`` (one expert: ``expert`` is unused)."""
    return None


def is_i2v(flavour: str) -> bool:
    return flavour in I2V_FLAVOURS
