"""Checkpoint key layouts of Wan S2V, mapped onto ours (the newer diffusers-port revision).

Three layouts are in circulation (``../shared/reference/wan_s2v/README.md``): the official
Wan2.2 ``WanModel_S2V`` names, and two revisions of the diffusers port (PR 12258) that differ in
the causal audio encoder (``weights`` vs ``weighted_avg.weights``, ``conv2.conv`` vs
``conv2.conv.conv``). It is not known which one the published diffusers checkpoint uses, so
every one loads; keys already in our layout pass through unchanged.
"""
from __future__ import annotations

import re

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_AUDIO = "condition_embedder.causal_audio_encoder"

# (pattern, replacement) applied in order; each key matches at most the first rule that fits.
_RULES = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^cond_encoder\.", "condition_embedder.pose_embedder."),
    (r"^trainable_cond_mask\.", "trainable_condition_mask."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^casual_audio_encoder\.weights$", f"{_AUDIO}.weighted_avg.weights"),
    (r"^casual_audio_encoder\.encoder\.(conv[23])\.conv\.", f"{_AUDIO}.encoder.\\1.conv.conv."),
    (r"^casual_audio_encoder\.", f"{_AUDIO}."),
    (rf"^{_AUDIO}\.weights$", f"{_AUDIO}.weighted_avg.weights"),  # older diffusers port
    (rf"^{_AUDIO}\.encoder\.(conv[23])\.conv\.(weight|bias)$", f"{_AUDIO}.encoder.\\1.conv.conv.\\2"),
]
_OFFICIAL_ATTN = re.compile(r"^(blocks\.\d+\.(?:self_attn|cross_attn)|audio_injector\.injector\.\d+)\.(\w+)\.(.+)$")
_BLOCK_ATTN = {"self_attn": "attn1", "cross_attn": "attn2"}


def checkpoint_key(key: str) -> str:
    """Our parameter name for ``key`` of any known layout."""
    m = _OFFICIAL_ATTN.match(key)
    if m and m[2] in _ATTN:
        owner = m[1]
        for official, ours in _BLOCK_ATTN.items():
            owner = owner.replace(f".{official}", f".{ours}")
        return f"{owner}.{_ATTN[m[2]]}.{m[3]}"
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# Our module names outside the blocks that have an original-layout LoRA key (the audio injector's
# attention projections); the blocks use the Wan table of vidtune.adapters.
_TO_OFFICIAL_INJECTOR = {v: k for k, v in _ATTN.items() if k != v}


def official_module(name: str) -> str | None:
    """The official (ComfyUI) name of one of our modules outside ``blocks``, or None."""
    m = re.fullmatch(r"audio_injector\.injector\.(\d+)\.(.+)", name)
    if m and m[2] in _TO_OFFICIAL_INJECTOR:
        return f"audio_injector.injector.{m[1]}.{_TO_OFFICIAL_INJECTOR[m[2]]}"
    return None
