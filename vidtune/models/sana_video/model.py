"""Sana Video transformer on vidtune_kernels.

Parameter names and shapes mirror diffusers' ``SanaVideoTransformer3DModel`` one to one
(``transformer_blocks.N.attn1.to_q``, ``transformer_blocks.N.ff.conv_inverted``,
``time_embed.emb.timestep_embedder.linear_1``, ``caption_norm``...), so its checkpoints load as
they are and peft adapter keys match. ``model.blocks`` is the same ModuleList, the name the
``apply_*`` steps use.

A block: adaLN-single modulation -> ReLU linear self-attention with the Wan video RoPE (fused
kernel ``vidtune_kernels.linear_attention``) -> softmax cross-attention to the projected Gemma2
caption (no norm before it, as in Sana) -> adaLN -> Mix-FFN (1x1 conv, SiLU, 3x3 depthwise conv,
GLU, 1x1 conv, then a temporal 3x1 conv with a residual). What differs from diffusers, on purpose:
- modulate, gated residual, q/k RMSNorm, caption RMSNorm and the linear attention are fused ops;
- timesteps may be per sample (B,), per latent frame (B, F') or per token (B, F'*H'*W'); per-frame
  modulation (the I2V case) is applied per frame without ever expanding it to every token;
- the Mix-FFN can run over chunks of whole frames with a one-frame halo (its convolutions need
  their neighbours), bounding the tokens x ffn intermediate;
- TREAD routes send a random subset of video tokens around the *attention* of a span of blocks
  (training only); the Mix-FFN always sees the full, un-routed grid, because its spatial and
  temporal convolutions read neighbouring tokens (see ``SanaVideoBlock.forward``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import vidtune_kernels as K

from ..attention import attention, check_backend
from ..diffusers_config import DiffusersConfig
from ..wan.model import TextProjection, TimestepEmbedding, _routes, timestep_embedding

# Parameters kept in fp32 whatever the model dtype: the modulation tables and the time embedding
# (diffusers keeps none for this model; the kernels compute modulation in fp32 anyway, and the
# time embedding is ~0.3% of the weights).
KEEP_FP32 = ("scale_shift_table", "time_embed")
FREQ_DIM = 256  # AdaLayerNormSingle's sinusoidal timestep channels
CAPTION_NORM_EPS = 1e-5
QK_NORM_EPS = 1e-5  # diffusers' Attention default


@dataclass
class SanaVideoConfig(DiffusersConfig):
    """The diffusers ``SanaVideoTransformer3DModel`` config (same keys and defaults)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 20
    attention_head_dim: int = 112
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: int | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = "rms_norm_across_heads"
    rope_max_seq_len: int = 1024
    extra: dict = field(default_factory=dict, repr=False)
    CLASS_NAME: ClassVar[str] = "SanaVideoTransformer3DModel"

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        problems = []
        if self.guidance_embeds:
            problems.append("guidance_embeds = true (guidance-distilled checkpoints) is not supported")
        if self.norm_elementwise_affine:
            problems.append("norm_elementwise_affine = true is not supported (the published checkpoints use false)")
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            problems.append(f"qk_norm = {self.qk_norm!r}: only 'rms_norm_across_heads' or null")
        if self.cross_attention_dim != self.inner_dim:
            problems.append(f"cross_attention_dim = {self.cross_attention_dim} must equal heads x head_dim = "
                            f"{self.inner_dim} (the caption is projected to the model width)")
        if self.attention_head_dim % 2:
            problems.append(f"attention_head_dim = {self.attention_head_dim} must be even (RoPE pairs)")
        if problems:
            raise ValueError("SanaVideoTransformer3DModel config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def text_dim(self) -> int:
        """Width of the text-encoder states the model takes (the family-neutral name)."""
        return self.caption_channels

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)


class LinearSelfAttention(nn.Module):
    """attn1: ReLU linear attention with RoPE; diffusers' names (to_q/k/v, to_out.0, norm_q/k)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_norm: bool, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        self.norm_q = nn.RMSNorm(inner, eps=QK_NORM_EPS) if qk_norm else None
        self.norm_k = nn.RMSNorm(inner, eps=QK_NORM_EPS) if qk_norm else None

    def forward(self, x, rope):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q = K.rms_norm(q, self.norm_q.weight, QK_NORM_EPS)
            k = K.rms_norm(k, self.norm_k.weight, QK_NORM_EPS)
        heads = (-1, self.heads, q.shape[-1] // self.heads)
        out = K.linear_attention(q.unflatten(-1, heads[1:]), k.unflatten(-1, heads[1:]),
                                 v.unflatten(-1, heads[1:]), *rope)
        return self.to_out[1](self.to_out[0](out.flatten(2)))


class CrossAttention(nn.Module):
    """attn2: softmax attention to the caption, diffusers' SanaAttnProcessor2_0 math."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.backend = "sdpa"
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        self.norm_q = nn.RMSNorm(inner, eps=QK_NORM_EPS) if qk_norm else None
        self.norm_k = nn.RMSNorm(inner, eps=QK_NORM_EPS) if qk_norm else None

    def forward(self, x, context, bias):
        """bias: additive (B, 1, 1, L) caption mask (0 keep, -10000 padding) or None."""
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q = K.rms_norm(q, self.norm_q.weight, QK_NORM_EPS)
            k = K.rms_norm(k, self.norm_k.weight, QK_NORM_EPS)
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))
        if bias is None:
            out = attention(q, k, v, self.backend)
        else:  # a masked caption: SDPA takes the additive mask (flash/sage kernels take none)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=bias).transpose(1, 2)
        return self.to_out[1](self.to_out[0](out.flatten(2).type_as(q)))


class MixFFN(nn.Module):
    """diffusers' GLUMBTempConv (no norm, no residual) with its parameter names.

    Tokens (B, F*H*W, D) are viewed channels-last as (B*F, D, H, W) for the 1x1 and depthwise
    convolutions and as (B, D, F, H*W) for the temporal one: views, no transposed copies. The
    modules themselves are called, so peft LoRA on the convolutions composes.

    ``chunk_size`` (tokens, None = off) runs the FFN over chunks of whole frames under
    non-reentrant checkpointing: a chunk of frames [f0, f1) computes its spatial part on
    [f0 - 1, f1 + 1) (one halo frame each side, where they exist) so the temporal convolution sees
    its true neighbours; at the clip's ends the conv's own zero padding applies, as unchunked.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(dim, hidden * 2, 1, 1, 0)
        self.conv_depth = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2)
        self.conv_point = nn.Conv2d(hidden, dim, 1, 1, 0, bias=False)
        self.conv_temp = nn.Conv2d(dim, dim, kernel_size=(3, 1), stride=1, padding=(1, 0), bias=False)
        self.chunk_size: int | None = None

    def _ff(self, x, grid):
        b, _, d = x.shape
        f, h, w = grid
        hs = x.reshape(b * f, h, w, d).permute(0, 3, 1, 2)  # channels-last view
        hs = self.conv_depth(self.nonlinearity(self.conv_inverted(hs)))
        hs, gate = hs.chunk(2, dim=1)
        hs = self.conv_point(hs * self.nonlinearity(gate))  # (B*F, D, H, W)
        ht = hs.permute(0, 2, 3, 1).reshape(b, f, h * w, d).permute(0, 3, 1, 2)  # (B, D, F, H*W)
        ht = ht + self.conv_temp(ht)
        return ht.permute(0, 2, 3, 1).reshape(b, f * h * w, d)

    def forward(self, x, grid):
        f, h, w = grid
        per_frame = x.shape[0] * h * w  # tokens per frame across the batch
        if self.chunk_size is None or self.chunk_size >= per_frame * f:
            return self._ff(x, grid)
        frames = max(1, self.chunk_size // per_frame)
        outs = []
        for f0 in range(0, f, frames):
            f1 = min(f, f0 + frames)
            a, b = max(0, f0 - 1), min(f, f1 + 1)

            def run(xc, a=a, b=b, f0=f0, f1=f1):
                return self._ff(xc, (b - a, h, w))[:, (f0 - a) * h * w:(f1 - a) * h * w]

            xc = x[:, a * h * w:b * h * w]
            outs.append(checkpoint(run, xc, use_reentrant=False) if torch.is_grad_enabled() else run(xc))
        return torch.cat(outs, dim=1)


class SanaVideoBlock(nn.Module):
    """One Sana Video block. Called as ``block(x, context, bias, tmod, rope, grid, route)``.

    tmod: (B, G, 6, D) modulation input, G timestep groups of S / G consecutive tokens (1: per
    sample, F': per frame, S: per token). rope: (cos, sin) compact fp32 tables (S, Dh/2).
    route: None, or ``(idx, rope_kept, tmod_kept)``: the block's attention then runs on the kept
    tokens ``idx`` (B, K) only (their rope rows (B, K, Dh/2), per-token modulation (B, K, 6, D) or
    None for per-sample), and the routed tokens skip it; the Mix-FFN runs on every token.
    """

    def __init__(self, cfg: SanaVideoConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.eps = cfg.norm_eps
        qk_norm = cfg.qk_norm is not None
        self.attn1 = LinearSelfAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias,
                                         qk_norm, cfg.dropout)
        self.attn2 = CrossAttention(dim, cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, qk_norm,
                                    cfg.dropout)
        self.ff = MixFFN(dim, cfg.ffn_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def _grouped(self, x, mods):
        """x (B, S, D) as (B*G, S/G, D) and each (B, G, D) modulation as (B*G, 1, D)."""
        b, g = mods[0].shape[:2]
        return x.view(b * g, -1, x.shape[-1]), [m.reshape(b * g, 1, -1) for m in mods]

    def _attend(self, x, context, bias, mod, rope):
        shift, scale, gate = mod
        xg, (shift, scale, gate) = self._grouped(x, (shift, scale, gate))
        h = K.modulate(xg, shift, scale, self.eps).view_as(x)
        x = K.gated_residual(xg, self.attn1(h, rope).view_as(xg), gate).view_as(x)
        return x + self.attn2(x, context, bias)

    def forward(self, x, context, bias, tmod, rope, grid, route=None):
        mod = (self.scale_shift_table + tmod.float()).unbind(2)  # 6 x (B, G, D), fp32
        if route is None:
            x = self._attend(x, context, bias, mod[:3], rope)
        else:
            idx, rope_kept, tmod_kept = route
            mod_kept = mod[:3] if tmod_kept is None else (self.scale_shift_table + tmod_kept.float()).unbind(2)[:3]
            kept = self._attend(K.tread_gather(x, idx), context, bias, mod_kept, rope_kept)
            x = K.tread_scatter(x, kept, idx)
        xg, (shift, scale, gate) = self._grouped(x, mod[3:])
        h = K.modulate(xg, shift, scale, self.eps).view_as(x)
        return K.gated_residual(xg, self.ff(h, grid).view_as(xg), gate).view_as(x)


class TimeEmbed(nn.Module):
    """diffusers' AdaLayerNormSingle: ``emb.timestep_embedder`` then ``linear(silu(.))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepEmbedding(FREQ_DIM, dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t):
        """t (...,) -> (temb (..., D), tmod (..., 6D))."""
        tp = timestep_embedding(t.flatten(), FREQ_DIM).to(self.emb.timestep_embedder.linear_1.weight.dtype)
        temb = self.emb.timestep_embedder(tp).unflatten(0, t.shape)
        return temb, self.linear(self.silu(temb))


class SanaVideoTransformer(nn.Module):
    """Sana Video T2V / I2V transformer; ``forward`` takes diffusers' arguments, returns a tensor."""

    family = "sana_video"

    def __init__(self, cfg: SanaVideoConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embed = TimeEmbed(dim)
        self.caption_projection = TextProjection(cfg.caption_channels, dim)
        self.caption_norm = nn.RMSNorm(dim, eps=CAPTION_NORM_EPS)
        self.transformer_blocks = nn.ModuleList([SanaVideoBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, math.prod(cfg.patch_size) * cfg.out_channels)

    @property
    def blocks(self) -> nn.ModuleList:
        """The block list under the name the ``apply_*`` steps use (diffusers calls it transformer_blocks)."""
        return self.transformer_blocks

    # -- knobs set from outside (config sections) --------------------------------------------------
    def set_attention_backend(self, name: str) -> None:
        """The cross-attention kernel; self-attention is always the linear-attention kernel."""
        check_backend(name)
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.backend = name

    def set_ff_chunk_size(self, chunk_size: int | None) -> None:
        """Tokens per Mix-FFN chunk (whole frames, at least one; None = unchunked);
        WAN_FEED_FORWARD_CHUNK_SIZE overrides."""
        chunk_size = K.resolve_chunk_size(chunk_size)
        for block in self.blocks:
            block.ff.chunk_size = chunk_size

    def rope_tables(self, f: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return K.wan_rope_freqs(self.config.attention_head_dim, f, h, w, max_seq_len=self.config.rope_max_seq_len,
                                device=device)

    def _modulation(self, timestep, b, grid):
        """(temb (B, G, D), tmod (B, G, 6, D)) for timesteps (B,), (B, F') or per token (B, S)
        (any shape with B * S elements, e.g. the pipeline's (B, 1, F', H', W'))."""
        f, h, w = grid
        n = timestep.numel()
        if n == b:
            t = timestep.reshape(b, 1)
        elif n == b * f and timestep.ndim == 2:
            t = timestep  # per frame
        elif n == b * f * h * w:
            t = timestep.reshape(b, f * h * w)
        else:
            raise ValueError(f"timestep of shape {tuple(timestep.shape)}: expected (B,), (B, frames) or (B, tokens) "
                             f"for B = {b}, {f} latent frames, {f * h * w} tokens")
        temb, tmod = self.time_embed(t)
        return temb, tmod.unflatten(-1, (6, -1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        controlnet_block_samples=None,
        return_dict: bool = False,
        *,
        routes=None,
        force_keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        skip_layers=(),
        capture_hidden=(),
    ):
        """Flow prediction for latents ``hidden_states`` (B, C, F, H, W).

        encoder_hidden_states: Gemma2 states (B, L, caption_channels); encoder_attention_mask
        (B, L), 1 = token, 0 = padding (None: every token counts). timestep: (B,), per latent frame
        (B, F') or per token (B, F'*H'*W'). Keyword-only extras as ``WanTransformer.forward``:
        routes (resolved TREAD routes, training mode only; here they route around the attention),
        force_keep (B, tokens) bool, generator, skip_layers, capture_hidden.
        """
        if guidance is not None or attention_mask is not None or controlnet_block_samples is not None:
            raise ValueError("SanaVideoTransformer: guidance, attention_mask and controlnet_block_samples are not "
                             "supported (the published checkpoints use none of them)")
        cfg = self.config
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        s = math.prod(grid)

        rope = self.rope_tables(*grid, hidden_states.device)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, tmod = self._modulation(timestep, b, grid)

        context = self.caption_projection(encoder_hidden_states)
        context = K.rms_norm(context, self.caption_norm.weight, CAPTION_NORM_EPS)
        bias = None
        if encoder_attention_mask is not None:  # diffusers' mask -> additive bias, in the states' dtype
            bias = ((1 - encoder_attention_mask.to(x.dtype)) * -10000.0).view(b, 1, 1, -1)

        route_at = {start: (ratio, end) for ratio, start, end in _routes(routes)} if self.training else {}
        skip, want, captured = set(skip_layers), set(capture_hidden), {}
        route = None
        end = -1
        for i, block in enumerate(self.blocks):
            if i in route_at:
                ratio, end = route_at[i]
                idx = K.select_tokens(b, s, ratio, generator=generator, force_keep=force_keep, device=x.device)
                route = (idx, tuple(K.tread_gather(r, idx, shared=True) for r in rope),
                         self._kept_modulation(tmod, idx, s))
            if i not in skip:
                x = block(x, context, bias, tmod, rope, grid, route)
            if i == end:
                route = None
            if i in want:
                captured[i] = x

        g = temb.shape[1]
        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unbind(2)  # (B, G, D)
        xg = x.view(b * g, -1, x.shape[-1])
        x = K.modulate(xg, shift.reshape(b * g, 1, -1).float(), scale.reshape(b * g, 1, -1).float(),
                       1e-6).view_as(x)
        x = self.proj_out(x)

        x = x.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return (out, captured) if capture_hidden else out

    @staticmethod
    def _kept_modulation(tmod, idx, s):
        """Per-token modulation rows of the kept tokens (B, K, 6, D); None when per sample."""
        g = tmod.shape[1]
        if g == 1:
            return None
        group = idx if g == s else torch.div(idx, s // g, rounding_mode="floor")  # per frame: the token's frame
        # plain indexing: per-frame groups repeat, and its backward accumulates the repeats
        return tmod[torch.arange(idx.shape[0], device=idx.device)[:, None], group]
