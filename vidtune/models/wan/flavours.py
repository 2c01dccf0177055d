"""Wan flavours: the full-size architecture each one names, where its transformers live, and
what its pipeline conditions on.

Architectures are the diffusers configs of the published checkpoints (SPEC "Full-size
architectures"); the planner and the benchmarks build them without weights.
"""
from __future__ import annotations

from .model import WanConfig

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096)
# I2V: 16 noisy + 4 mask + 16 first-frame latent channels in; Wan 2.1 adds CLIP image cross-attention.
WAN_14B_I2V_21 = {**WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
WAN_5B = dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, text_dim=4096,
              in_channels=48, out_channels=48)
ARCHS = {
    "t2v-480p-1.3b-2.1": WAN_1_3B,
    "t2v-480p-14b-2.1": WAN_14B,
    "i2v-480p-14b-2.1": WAN_14B_I2V_21,
    "i2v-720p-14b-2.1": WAN_14B_I2V_21,
    "t2v-a14b-2.2": WAN_14B,
    "i2v-14b-2.2": {**WAN_14B, "in_channels": 36},
    "ti2v-5b-2.2": WAN_5B,
}
# Two-expert flavours: the published pipelines' boundary_ratio (model_index.json), the default
# when a checkpoint does not say. The high-noise expert denoises timesteps >= boundary * 1000.
BOUNDARY_RATIO = {"t2v-a14b-2.2": 0.875, "i2v-14b-2.2": 0.9}
# The Wan 2.2 VAE (TI2V-5B): 48 latent channels, 16x spatial (8x + a 2x2 patchify), 4x temporal.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
VAE_CONFIGS = {"ti2v-5b-2.2": WAN22_VAE}  # the others use the Wan 2.1 VAE (diffusers' defaults)
# Pipelines with per-token timesteps (diffusers' expand_timesteps): the clean first latent frame
# conditions image-to-video at t = 0.
EXPAND_TIMESTEPS = ("ti2v-5b-2.2",)


def flavour_config(flavour: str) -> WanConfig | None:
    """The full-size config of a flavour, None when the flavour has no built-in architecture."""
    return WanConfig(**ARCHS[flavour]) if flavour in ARCHS else None


def transformer_subfolder(flavour: str, expert: str | None = None) -> str | None:
    """Two-expert Wan 2.2 repos hold the high-noise expert in ``transformer`` and the low-noise one
    in ``transformer_2``; None: the default place (``transformer/`` of a pipeline)."""
    return "transformer_2" if expert == "low" else None
