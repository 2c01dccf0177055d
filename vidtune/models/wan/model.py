"""Wan 2.1 / 2.2 transformer on vidtune_kernels.

Parameter names and shapes mirror diffusers' ``WanTransformer3DModel`` one to one
(``blocks.N.attn1.to_q``, ``blocks.N.ffn.net.0.proj``, ...), so diffusers checkpoints load as they
are and peft adapter keys match. Fusion lives in the kernels, never in restructured parameters.

What differs from diffusers, on purpose:
- q/k RMSNorm + RoPE, adaLN modulate, gated residual and the FF activation are fused ops;
- the feed-forward can run over token chunks (``chunk_size``), bounding tokens × ffn_dim;
- TREAD routes send a random subset of video tokens through a span of blocks (training only);
- image and text context stay separate tensors (no concat and split by a magic 512).
Optimisations (checkpointing, offload, quantization) are applied from outside by ``apply_*``
functions; ``forward`` stays a plain loop over ``self.blocks``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import vidtune_kernels as K

from ..attention import attention, check_backend
from ..diffusers_config import DiffusersConfig

# Parameters kept in fp32 whatever the model dtype (diffusers' _keep_in_fp32_modules): matched
# against the components of a parameter's dotted name.
KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


@dataclass
class WanConfig(DiffusersConfig):
    """The diffusers ``WanTransformer3DModel`` config (same keys and defaults)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    extra: dict = field(default_factory=dict, repr=False)
    CLASS_NAME: ClassVar[str] = "WanTransformer3DModel"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos, sin] order (diffusers Timesteps, flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(self.act_1(self.linear_1(x)))


class GELUProj(nn.Module):
    """``net.0`` of a diffusers FeedForward: a Linear whose output goes through GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def activate(self, x):
        return K.gelu_tanh(x) if self.approximate == "tanh" else F.gelu(x)

    def forward(self, x):
        return self.activate(self.proj(x))


class FeedForward(nn.Module):
    """diffusers FeedForward layout (net.0.proj, net.1 dropout, net.2) with token chunking.

    ``chunk_size`` (tokens per chunk, None = off) bounds the tokens × ffn_dim intermediate in
    forward and backward; it calls this module's own Linears so LoRA or int8 Linears compose.
    """

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, inner_dim, approximate), nn.Dropout(0.0), nn.Linear(inner_dim, dim_out or dim)]
        )
        self.chunk_size: int | None = None

    def _ff(self, x):
        act = self.net[0]
        pre = act.proj(x)
        h = act.activate(pre)
        # net.2 keeps its input for its weight's (or its LoRA's) gradient: the activation's input
        # is kept anyway, so backward recomputes the tokens x ffn_dim activation from it.
        with K.recomputed_when_saved(h, lambda: act.activate(pre)):
            return self.net[2](self.net[1](h))

    def forward(self, x):
        return K.chunked_feed_forward(self._ff, x, self.chunk_size)


class WanAttention(nn.Module):
    """Self- or cross-attention with diffusers' parameter names (to_q/k/v, to_out.0, norm_q/k)."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.backend = "sdpa"
        self.sequence_parallel = None  # set by vidtune.distributed.apply_sequence_parallel
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x):
        return x.unflatten(-1, (self.heads, -1))

    def _out(self, x):
        return self.to_out[1](self.to_out[0](x.flatten(2)))

    def self_attention(self, x, rope):
        cos, sin = rope
        sp = self.sequence_parallel
        if sp is not None:  # x holds this rank's tokens; the RoPE tables cover the whole sequence
            n = cos.shape[-2]
            cos, sin = sp.shard(cos, -2), sp.shard(sin, -2)
        q = K.qk_norm_rope(self.to_q(x), self.norm_q.weight, self.eps, cos, sin, self.heads)
        k = K.qk_norm_rope(self.to_k(x), self.norm_k.weight, self.eps, cos, sin, self.heads)
        v = self._heads(self.to_v(x))
        if sp is None:
            return self._out(attention(q, k, v, self.backend).type_as(q))
        # Ulysses: one all-to-all swaps the token split for a head split, attention sees every token.
        q, k, v = sp.to_heads(torch.cat((q, k, v)), n).chunk(3)
        return self._out(sp.to_tokens(attention(q, k, v, self.backend).type_as(q)))

    def cross_attention(self, x, context, context_image=None, mask=None):
        """``mask``: bool (B, 1, Sq, Sk), True where a query may attend (torch SDPA)."""
        q = self._heads(K.rms_norm(self.to_q(x), self.norm_q.weight, self.eps))
        k = self._heads(K.rms_norm(self.to_k(context), self.norm_k.weight, self.eps))
        v = self._heads(self.to_v(context))
        out = attention(q, k, v, self.backend if mask is None else "sdpa", mask).type_as(q)
        if context_image is not None:
            k_img = K.rms_norm(self.add_k_proj(context_image), self.norm_added_k.weight, self.eps)
            k_img = self._heads(k_img)
            v_img = self._heads(self.add_v_proj(context_image))
            out = out + attention(q, k_img, v_img, self.backend).type_as(q)
        return self._out(out)


def _segmented(fn, lens, tokens, rows, *args):
    """``fn`` over each group of consecutive tokens (``lens`` per group), group g given row g of
    every (B, G, D) tensor in ``rows``: per-segment modulation without a per-token table."""
    splits = [t.split(lens, dim=1) for t in tokens]
    return torch.cat([fn(*(s[g] for s in splits), *(r[:, g:g + 1] for r in rows), *args)
                      for g in range(len(lens))], dim=1)


def _segmented_modulate(lens, x, shift, scale, eps):
    return _segmented(K.modulate, lens, (x,), (shift, scale), eps)


def _segmented_residual(lens, x, y, gate):
    return _segmented(K.gated_residual, lens, (x, y), (gate,))


class WanBlock(nn.Module):
    """One Wan transformer block. Called as ``block(x, context, temb, rope, context_image, segments)``.

    temb is the block's (B, 6, D) or per-token (B, S, 6, D) modulation input, or with ``segments``
    (token counts of consecutive groups, e.g. Wan S2V's video tokens then its clean reference and
    motion tokens) one row per group, (B, G, 6, D); rope is the (cos, sin) pair of compact fp32
    tables, shared (S, Dh/2) or per sample (B, S, Dh/2).
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, eps = cfg.inner_dim, cfg.eps
        self.eps = eps
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, eps, cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, temb, rope, context_image=None, segments=None):
        if temb.ndim == 4:  # per-token (B, S, 6, D) or per-segment (B, G, 6, D) modulation
            mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
        else:
            mod = (self.scale_shift_table + temb.float()).split(1, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod
        modulate, residual = K.modulate, K.gated_residual
        if segments is not None:
            modulate = functools.partial(_segmented_modulate, segments)
            residual = functools.partial(_segmented_residual, segments)

        h = modulate(x, shift_msa, scale_msa, self.eps)
        x = residual(x, self.attn1.self_attention(h, rope), gate_msa)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2.cross_attention(h, context, context_image)

        h = modulate(x, c_shift, c_scale, self.eps)
        return residual(x, self.ffn(h), c_gate)


class ImageEmbedding(nn.Module):
    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)
        self.ff = FeedForward(in_features, in_features, out_features, approximate="none")
        self.norm2 = FP32LayerNorm(out_features)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features)) if pos_embed_seq_len else None

    def forward(self, x):
        if self.pos_embed is not None:
            b, s, d = x.shape
            x = x.view(-1, 2 * s, d) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = TextProjection(cfg.text_dim, dim)
        self.image_embedder = (
            ImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len) if cfg.image_dim is not None else None
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.freq_dim)

    def forward(self, timestep, context, context_image, dtype):
        """timestep (B,) or (B, S) -> temb (B[, S], D) and timestep_proj (B[, S], 6D)."""
        t = self.sinusoid(timestep.flatten()).unflatten(0, timestep.shape)
        w = self.time_embedder.linear_1.weight
        if w.dtype != torch.int8:
            t = t.to(w.dtype)
        temb = self.time_embedder(t).to(dtype)
        timestep_proj = self.time_proj(self.act_fn(temb))
        context = self.text_embedder(context)
        if context_image is not None:
            context_image = self.image_embedder(context_image)
        return temb, timestep_proj, context, context_image


def _routes(routes) -> list[tuple[float, int, int]]:
    routes = list(routes or ())
    if any(not isinstance(r, tuple) or len(r) != 3 for r in routes):
        raise TypeError(f"routes must be resolved (ratio, start, end) tuples, got {routes!r}: resolve them "
                        f"once with vidtune.config.resolve_routes(routes, num_layers)")
    return routes


class WanTransformer(nn.Module):
    """Wan T2V / I2V transformer. ``forward`` takes diffusers' arguments and returns a tensor."""

    family = "wan"
    block_class = WanBlock  # families built on Wan (S2V) swap in their own block and embedder
    embedder_class = ConditionEmbedder

    def __init__(self, cfg: WanConfig, *, force_2_1_time_embedding: bool = False):
        super().__init__()
        self.config = cfg
        self.force_2_1_time_embedding = force_2_1_time_embedding
        dim = cfg.inner_dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = self.embedder_class(cfg)
        self.blocks = nn.ModuleList([self.block_class(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        # vidtune.distributed.apply_sequence_parallel: this rank then runs the blocks on its share of
        # the video tokens (the head and the output stay whole).
        self.sequence_parallel = None

    # -- knobs set from outside (config sections), never read from a global config -------------
    def set_attention_backend(self, name: str) -> None:
        check_backend(name)
        for m in self.modules():
            if isinstance(m, WanAttention):
                m.backend = name

    def set_ff_chunk_size(self, chunk_size: int | None) -> None:
        """Tokens per feed-forward chunk (None = unchunked); WAN_FEED_FORWARD_CHUNK_SIZE overrides."""
        chunk_size = K.resolve_chunk_size(chunk_size)
        for block in self.blocks:
            block.ffn.chunk_size = chunk_size

    def rope_tables(self, f: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return K.wan_rope_freqs(
            self.config.attention_head_dim, f, h, w, max_seq_len=self.config.rope_max_seq_len, device=device
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = False,
        attention_kwargs: dict | None = None,
        *,
        routes=None,
        force_keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        skip_layers=(),
        capture_hidden=(),
    ):
        """Denoiser prediction for latents ``hidden_states`` (B, C, F, H, W).

        timestep: (B,) or per-token (B, F'*H'*W') like diffusers. Keyword-only extras:
        routes: TREAD routes as resolved ``(ratio, start, end)`` tuples (absolute, inclusive layer
        indices; ``vidtune.config.resolve_routes`` makes them), used in training mode only.
        force_keep: bool (B, tokens) of video tokens a route must keep (e.g. masked-loss regions).
        generator: torch.Generator for the routing draws (seed it for reproducible routing).
        skip_layers: block indices to skip (skip-layer guidance).
        capture_hidden: block indices whose output hidden states (B, tokens, D) are returned too,
        as ``(output, {index: hidden})``.
        """
        cfg = self.config
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = f // pt, h // ph, w // pw

        rope = self.rope_tables(f, h, w, hidden_states.device)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        if timestep.ndim == 2 and self.force_2_1_time_embedding:
            # One embedding per sample, Wan 2.1 style: the noise level of the denoised tokens.
            timestep = timestep.amax(dim=1)
        temb, tproj, context, context_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, encoder_hidden_states.dtype
        )
        tproj = tproj.unflatten(-1, (6, -1))  # (B, 6, D) or (B, S, 6, D)

        # Under sequence parallelism the blocks see this rank's share of the tokens (``own``) and a
        # route or a capture first gathers them whole; without it both are the identity.
        sp = self.sequence_parallel

        def own(t):
            return t if sp is None else sp.shard(t)

        def whole(t, n):
            return t if sp is None else sp.gather(t, n)

        per_token = tproj.ndim == 4
        n = x.shape[1]  # tokens the blocks run on (fewer inside a route)
        x = own(x)
        mod = own(tproj) if per_token else tproj
        route_at = {start: (ratio, end) for ratio, start, end in _routes(routes)} if self.training else {}
        skip = set(skip_layers)
        want = set(capture_hidden)
        captured = {}
        saved = None  # (x_full, rope_full, mod, idx, end) while a route is active
        for i, block in enumerate(self.blocks):
            if i in route_at:
                ratio, end = route_at[i]
                x_all = whole(x, n)
                idx = K.select_tokens(b, n, ratio, generator=generator, force_keep=force_keep, device=x.device)
                saved = (x_all, rope, mod, idx, end)
                n = idx.shape[1]
                x = own(K.tread_gather(x_all, idx))
                rope = (K.tread_gather(rope[0], idx, shared=True), K.tread_gather(rope[1], idx, shared=True))
                if per_token:
                    mod = own(K.tread_gather(tproj, idx))
            if i not in skip:
                x = block(x, context, mod, rope, context_image)
            if saved is not None and i == saved[4]:
                x_all, rope, mod, idx, _ = saved
                x = own(K.tread_scatter(x_all, whole(x, n), idx))
                n = x_all.shape[1]
                saved = None
            if i in want:
                captured[i] = K.tread_scatter(saved[0], whole(x, n), saved[3]) if saved is not None else whole(x, n)

        out = self.head(whole(x, n), temb, (f, h, w))  # every rank: the whole sequence's output
        return (out, captured) if capture_hidden else out

    def head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Output norm, modulation by temb (B, D) or per-token (B, S, D), projection, unpatchify
        the (F', H', W') token grid to latents (B, C, F, H, W)."""
        cfg = self.config
        if temb.ndim == 3:  # per-token: (B, S, D)
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).split(1, dim=1)
        x = self.proj_out(K.modulate(x, shift, scale, cfg.eps))

        pt, ph, pw = cfg.patch_size
        x = x.reshape(x.shape[0], *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
