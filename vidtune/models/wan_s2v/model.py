"""Wan 2.2 S2V (speech-to-video) transformer, built on the Wan model's blocks and kernels.

Parameter names follow the diffusers port (PR 12258, the ``tolgacangoz/Wan2.2-S2V-14B-Diffusers``
layout, its newer revision); ``load.py`` maps the official Wan2.2 names and the older PR revision
onto them. The model is the Wan transformer plus, in the order ``forward`` runs them:

1. the causal audio encoder: a weighted mean over the wav2vec2 layers, causal convs with stride
   1, 2, 2 (one group per latent frame after dropping the motion frames' 19), giving per latent
   frame 4 local tokens + 1 learned padding token, and one global token (AdaIN);
2. the tokens: the noisy video (+ pose), the clean reference frame and the clean motion frames
   (the frame packer's 1x / 2x / 4x compressions of the 19 latents before the clip), each group
   with its learned condition-mask row, RoPE positions video 0..F-1, reference 30, motion < 0;
3. the Wan blocks with per-segment modulation (reference and motion tokens at t = 0), each
   listed block followed by the audio injection: per latent frame, its video tokens go through
   AdaLayerNorm on the global audio token and cross-attend to that frame's 5 audio tokens;
4. the Wan head on the video tokens.

TREAD routes the video tokens only (reference and motion tokens always stay); the injection
then sees each frame's kept tokens (a block mask over all frames' audio tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vidtune_kernels as K

from ..wan.model import KEEP_FP32 as WAN_KEEP_FP32
from ..wan.model import ConditionEmbedder, WanAttention, WanBlock, WanConfig, WanTransformer, _routes

KEEP_FP32 = (*WAN_KEEP_FP32, "causal_audio_encoder")

# The clip before a window: 73 pixel frames -> 19 latents (official config motion_frames = 73).
MOTION_FRAMES = (73, 19)
REF_POSITION = 30  # temporal RoPE position of the reference frame
FRAMEPACK_BUCKETS = (1, 2, 16)  # latent frames packed at 1x, 2x, 4x compression (nearest first)
ADAIN_EPS = 1e-5  # diffusers AdaLayerNorm's LayerNorm
AUDIO_NORM_EPS = 1e-6  # the audio conv stack's LayerNorms and the injector's plain pre-norm


@dataclass
class WanS2VConfig(WanConfig):
    """The diffusers-port config (``WanS2VTransformer3DModel``); defaults are the 14B S2V."""

    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    pose_dim: int = 16
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    add_last_motion: bool = True
    zero_timestep: bool = True

    def __post_init__(self):
        # A model cut to fewer blocks (the planner's probes, benchmarks) keeps the injections it has.
        self.audio_inject_layers = tuple(i for i in self.audio_inject_layers if i < self.num_layers)
        bad = [f"{k}={v!r}" for k, v, ok in (
            ("enable_framepack", self.enable_framepack, self.enable_framepack),
            ("framepack_drop_mode", self.framepack_drop_mode, self.framepack_drop_mode == "padd"),
            ("adain_mode", self.adain_mode, self.adain_mode == "attn_norm" or not self.enable_adain),
            ("audio_inject_layers", self.audio_inject_layers, all(i >= 0 for i in self.audio_inject_layers)),
            # The official block calls .item() on the int its model passes without zero_timestep.
            ("zero_timestep", self.zero_timestep, self.zero_timestep),
        ) if not ok]
        if bad:
            raise ValueError(f"Wan S2V config: {', '.join(bad)} is not supported (the published S2V uses "
                             f"framepack motion with 'padd', AdaIN in 'attn_norm' mode, zero_timestep)")

    @classmethod
    def from_dict(cls, d: dict) -> "WanS2VConfig":
        """The diffusers-port config, or the official ``WanModel_S2V`` one (``dim``, ``num_heads``...)."""
        if "dim" in d and "num_heads" in d:
            d = _from_official(d)
        return super().from_dict(d)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["audio_inject_layers"] = list(self.audio_inject_layers)
        return {**d, "_class_name": "WanS2VTransformer3DModel"}


def _from_official(d: dict) -> dict:
    unsupported = {"enable_motioner": False, "enable_tsm": False, "trainable_token_pos_emb": False,
                   "model_type": "s2v"}
    bad = [f"{k}={d[k]!r}" for k, v in unsupported.items() if k in d and d[k] != v]
    if list(d.get("window_size", (-1, -1))) != [-1, -1]:
        bad.append(f"window_size={d['window_size']!r}")
    if bad:
        raise ValueError(f"official Wan S2V config: {', '.join(bad)} is not supported (the published S2V "
                         f"has none of them)")
    out = {"patch_size": d.get("patch_size", (1, 2, 2)), "num_attention_heads": d["num_heads"],
           "attention_head_dim": d["dim"] // d["num_heads"], "in_channels": d.get("in_dim", 16),
           "out_channels": d.get("out_dim", 16), "pose_dim": d.get("cond_dim", 16),
           "qk_norm": "rms_norm_across_heads" if d.get("qk_norm", True) else None}
    same = ("text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "audio_dim",
            "num_audio_token", "audio_inject_layers", "enable_adain", "adain_mode", "enable_framepack",
            "framepack_drop_mode", "add_last_motion", "zero_timestep")
    out.update({k: d[k] for k in same if k in d})
    # Kept for reference (text_len: the caller pads prompts to it, zero_init: an init choice).
    out.update({k: d[k] for k in ("text_len", "zero_init") if k in d})
    return out


# ---------------------------------------------------------------------------------------------
# Audio: wav2vec2 features -> per latent frame, 4 + 1 local tokens and 1 global token.

class CausalConv1d(nn.Module):
    """Conv1d over time whose input is padded on the left by repeating its first frame."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x):  # (B, C, T)
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class _Nested(nn.Module):
    """The diffusers port keeps the strided convs one level deeper (``conv2.conv.conv``)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class LayerAverage(nn.Module):
    """``sum_i silu(w_i) f_i / sum_i silu(w_i)`` over the wav2vec2 hidden states (no softmax)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, features):  # (B, L, C, T) -> (B, C, T)
        w = F.silu(self.weights)
        return ((features * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)


class AudioConvStack(nn.Module):
    """The official ``MotionEncoder_tc``: causal convs (x4 down in time) with LayerNorm + SiLU."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int, need_global: bool):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4) if need_global else None
        self.conv2 = _Nested(CausalConv1d(dim // 4, dim // 2, stride=2))
        self.conv3 = _Nested(CausalConv1d(dim // 2, dim, stride=2))
        self.final_linear = nn.Linear(dim, dim) if need_global else None
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def _norm_act(x):  # (N, C, T): LayerNorm over C, SiLU; back to (N, C, T)
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, x.shape[-1:], eps=AUDIO_NORM_EPS)).transpose(1, 2)

    def _down(self, x):  # (N, C/4, T) after conv1 -> (N, T', C)
        x = self.conv2(self._norm_act(x))
        return self._norm_act(self.conv3(self._norm_act(x))).transpose(1, 2)

    def forward(self, x):  # (B, C_a, T) -> local (B, T', n + 1, D), global (B, T', 1, D) or None
        b = x.shape[0]
        local = self.conv1_local(x).unflatten(1, (self.num_tokens, -1)).flatten(0, 1)
        local = self._down(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)
        local = torch.cat([local, self.padding_tokens.expand(b, local.shape[1], 1, -1)], dim=2)
        if self.conv1_global is None:
            return local, None
        glob = self.final_linear(self._down(self.conv1_global(x)))
        return local, glob.unsqueeze(2)


class CausalAudioEncoder(nn.Module):
    def __init__(self, audio_dim: int, dim: int, num_tokens: int, need_global: bool, num_layers: int = 25):
        super().__init__()
        self.weighted_avg = LayerAverage(num_layers)
        self.encoder = AudioConvStack(audio_dim, dim, num_tokens, need_global)

    def forward(self, features):  # (B, L, C_a, T) -> see AudioConvStack
        return self.encoder(self.weighted_avg(features.float()))


class S2VConditionEmbedder(ConditionEmbedder):
    """Wan's time/text embedder plus the causal audio encoder and the pose embedder."""

    def __init__(self, cfg: WanS2VConfig):
        super().__init__(cfg)
        dim = cfg.inner_dim
        self.causal_audio_encoder = CausalAudioEncoder(cfg.audio_dim, dim, cfg.num_audio_token, cfg.enable_adain)
        self.pose_embedder = nn.Conv3d(cfg.pose_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """The official S2V's float64 sinusoid ([cos, sin], 10000^(-i/half)), cast to fp32: the
        fp32 one of diffusers (and its S2V port) is 1e-5 off at t ~ 700 after the time MLPs."""
        half = self.freq_dim // 2
        pos = t.double()
        args = torch.outer(pos, torch.pow(10000, -torch.arange(half, device=t.device).to(pos).div(half)))
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class AdaNorm(nn.Module):
    """diffusers ``AdaLayerNorm(chunk_dim=1)``: LayerNorm (eps 1e-5, no affine), then shift and
    scale (in that order) from ``linear(silu(emb))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def shift_scale(self, emb):
        return self.linear(F.silu(emb)).float().chunk(2, dim=-1)


class AudioInjector(nn.Module):
    def __init__(self, cfg: WanS2VConfig):
        super().__init__()
        n, dim = len(cfg.audio_inject_layers), cfg.inner_dim
        self.injector = nn.ModuleList([WanAttention(dim, cfg.num_attention_heads, cfg.eps) for _ in range(n)])
        self.injector_adain_layers = nn.ModuleList([AdaNorm(dim) for _ in range(n)]) if cfg.enable_adain else None


class FramePacker(nn.Module):
    """Motion latents -> tokens: the last 1 latent at 1x, the 2 before at 2x (2, 4, 4), the 16
    before those at 4x (4, 8, 8); fewer than 19 latents are zero-padded at the far end."""

    def __init__(self, dim: int, channels: int = 16, add_last_motion: bool = True):
        super().__init__()
        self.add_last_motion = add_last_motion
        self.proj = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion):  # (B, C, T, H, W) -> (B, S_m, D)
        if min(motion.shape[-2:]) < 8:
            raise ValueError(f"motion latents of {tuple(motion.shape[-2:])} are smaller than the 4x packing's 8x8 "
                             f"(clips of at least 64x64 pixels)")
        n = sum(FRAMEPACK_BUCKETS)
        t = motion.shape[2]
        if t >= n:
            packed = motion[:, :, t - n:]
        else:
            packed = torch.cat([motion.new_zeros(*motion.shape[:2], n - t, *motion.shape[3:]), motion], dim=2)
        if not self.add_last_motion:  # "padd" mode: the 1x and 2x latents are zeroed, not dropped
            keep = n - FRAMEPACK_BUCKETS[0] - FRAMEPACK_BUCKETS[1]
            packed = torch.cat([packed[:, :, :keep], torch.zeros_like(packed[:, :, keep:])], dim=2)
        far, mid, near = packed.split(FRAMEPACK_BUCKETS[::-1], dim=2)
        return torch.cat([p(x).flatten(2).transpose(1, 2)
                          for p, x in ((self.proj, near), (self.proj_2x, mid), (self.proj_4x, far))], dim=1)


# ---------------------------------------------------------------------------------------------
# RoPE positions, exactly as the official rope_precompute picks them (numpy linspace, truncated).

def _linspace_int(start: int, stop: int, num: int) -> list[int]:
    """``np.linspace(start, stop, num).astype(int)`` in float64, without numpy."""
    if num == 1:
        return [int(start)]
    step = (stop - start) / (num - 1)
    return [int(i * step + start) for i in range(num - 1)] + [int(stop)]


def _grid(ts, hs, ws) -> torch.Tensor:
    """(len(ts) * len(hs) * len(ws), 3) positions, frame-major like the token order."""
    axes = [torch.tensor(a, dtype=torch.long) for a in (ts, hs, ws)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)


def token_positions(f: int, h: int, w: int, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """Positions of the video grid (f, h, w) after patching, then the reference frame, then (when
    ``latent_hw`` is given) the frame packer's motion tokens over a latent of that height/width."""
    parts = [_grid(range(f), range(h), range(w)), _grid([REF_POSITION], range(h), range(w))]
    if latent_hw is not None:
        lh, lw = latent_hw
        start = 0
        for bucket, div in zip(FRAMEPACK_BUCKETS, (2, 4, 8)):
            start -= bucket
            n_t = bucket // (div // 2)  # temporal tokens after the packer's temporal stride
            ts = [-p for p in _linspace_int(-start, -(bucket + start) + 1, n_t)]
            parts.append(_grid(ts, _linspace_int(0, lh // 2 - 1, lh // div), _linspace_int(0, lw // 2 - 1, lw // div)))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Blocks and the audio injection.

@dataclass
class AudioInjection:
    """The audio injection after one block, handed to that block's call (so checkpointing and
    offload treat it as part of the block). ``frame`` (B, K) is the latent frame of each of the
    first K tokens when TREAD dropped some video tokens; None when all F * HW are present in order."""

    attn: WanAttention
    ada: AdaNorm | None
    local: torch.Tensor  # (B, F, n + 1, D)
    glob: torch.Tensor | None  # (B, F, D)
    num_video: int
    frame: torch.Tensor | None = None

    def __call__(self, x):
        video = x[:, :self.num_video]
        b, nf = self.local.shape[:2]
        mod = None if self.ada is None else self.ada.shift_scale(self.glob)  # (B, F, D) each
        if self.frame is None:  # one group per latent frame, exactly the official regrouping
            v = video.reshape(b * nf, -1, video.shape[-1])
            h = self._norm(v, mod and [m.reshape(b * nf, 1, -1) for m in mod])
            out = self.attn.cross_attention(h, self.local.flatten(0, 1)).reshape(video.shape)
        else:  # kept tokens of every frame: each attends to its own frame's audio tokens only
            per_token = self.frame.unsqueeze(-1).expand(-1, -1, video.shape[-1])
            h = self._norm(video, mod and [torch.gather(m, 1, per_token) for m in mod])
            mask = self.frame[:, None, :, None] == torch.arange(nf, device=x.device).repeat_interleave(
                self.local.shape[2])[None, None, None, :]
            out = self.attn.cross_attention(h, self.local.flatten(1, 2), mask=mask)
        return torch.cat([video + out, x[:, self.num_video:]], dim=1)

    @staticmethod
    def _norm(v, mod):
        if mod is None:
            return F.layer_norm(v.float(), v.shape[-1:], eps=AUDIO_NORM_EPS).type_as(v)
        return K.modulate(v, mod[0], mod[1], ADAIN_EPS)


class WanS2VBlock(WanBlock):
    """A Wan block whose call ends with its audio injection, if it has one."""

    def forward(self, x, context, temb, rope, context_image=None, segments=None, audio=None):
        x = super().forward(x, context, temb, rope, context_image, segments)
        return x if audio is None else audio(x)


class WanS2VTransformer(WanTransformer):
    """Wan 2.2 S2V transformer; ``forward`` takes the noisy clip and its conditioning."""

    family = "wan_s2v"
    block_class = WanS2VBlock
    embedder_class = S2VConditionEmbedder
    quantize_also = ("audio_injector",)  # frozen Linears outside the blocks that int8 also takes (1.9B at 14B)

    def __init__(self, cfg: WanS2VConfig, *, force_2_1_time_embedding: bool = False):
        super().__init__(cfg, force_2_1_time_embedding=force_2_1_time_embedding)
        dim = cfg.inner_dim
        self.trainable_condition_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePacker(dim, cfg.in_channels, cfg.add_last_motion)
        self.audio_injector = AudioInjector(cfg)

    def encode_audio(self, audio: torch.Tensor, motion_frames: tuple[int, int], num_frames: int):
        """(B, L, C_a, 4F) wav2vec2 features -> local (B, F, n + 1, D), global (B, F, D) or None."""
        pixel, latent = motion_frames
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], pixel), audio], dim=-1)
        local, glob = self.condition_embedder.causal_audio_encoder(audio)
        if local.shape[1] - latent != num_frames:
            raise ValueError(f"audio has {audio.shape[-1] - pixel} frames, which give {local.shape[1] - latent} "
                             f"latent frames; the latents have {num_frames} (audio needs 4 frames per latent)")
        glob = None if glob is None else glob[:, latent:, 0]
        return local[:, latent:], glob

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        audio: torch.Tensor,
        ref_latents: torch.Tensor,
        motion_latents: torch.Tensor | None = None,
        pose_latents: torch.Tensor | None = None,
        motion_frames: tuple[int, int] = MOTION_FRAMES,
        routes=None,
        force_keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        skip_layers=(),
        capture_hidden=(),
    ):
        """Denoiser prediction for the clip latents ``hidden_states`` (B, C, F, H, W).

        timestep (B,); encoder_hidden_states (B, L, text_dim), zero-padded to the text length;
        audio (B, 25, C_a, 4F): wav2vec2 features, one per pixel frame of the clip (zeros: the
        unconditional branch); ref_latents (B, C, 1, H, W): the clean reference frame;
        motion_latents (B, C, T, H, W): the clean latents of the frames before the clip, None for
        a first window (the official ``drop_motion_frames``); pose_latents (B, pose_dim, F, H, W),
        None without a pose video (zeros: the pose embedder adds its bias only). ``routes``,
        ``force_keep``, ``generator``, ``skip_layers``, ``capture_hidden``: as for Wan; routes
        drop video tokens only.
        """
        cfg = self.config
        b, _, f, hh, ww = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, hh // ph, ww // pw)
        num_video = grid[0] * grid[1] * grid[2]
        x = self.patch_embedding(hidden_states)
        local, glob = self.encode_audio(audio, motion_frames, grid[0])
        local, glob = local.to(x.dtype), None if glob is None else glob.to(x.dtype)

        pose = self.condition_embedder.pose_embedder
        x = x + (pose(pose_latents) if pose_latents is not None else pose.bias.view(1, -1, 1, 1, 1).to(x.dtype))
        mask = self.trainable_condition_mask.weight.to(x.dtype)
        parts = [x.flatten(2).transpose(1, 2) + mask[0],
                 self.patch_embedding(ref_latents).flatten(2).transpose(1, 2) + mask[1]]
        if motion_latents is not None:
            parts.append(self.frame_packer(motion_latents) + mask[2])
        x = torch.cat(parts, dim=1)
        positions = token_positions(*grid, None if motion_latents is None else motion_latents.shape[-2:])
        rope = K.rope_freqs_at(cfg.attention_head_dim, positions, device=x.device)

        # Video tokens are modulated at their t, the reference and motion tokens at t = 0.
        t = torch.cat([timestep, timestep.new_zeros(1)])
        temb, tproj, context, _ = self.condition_embedder(t, encoder_hidden_states, None, encoder_hidden_states.dtype)
        tproj = tproj.unflatten(-1, (6, -1))
        temb, tproj = temb[:b], torch.stack([tproj[:b], tproj[b:].expand(b, -1, -1)], dim=1)

        inject = {layer: n for n, layer in enumerate(cfg.audio_inject_layers)}
        ada = self.audio_injector.injector_adain_layers
        route_at = {start: (ratio, end) for ratio, start, end in _routes(routes)} if self.training else {}
        skip, want, captured = set(skip_layers), set(capture_hidden), {}
        saved = None  # (x_full, rope_full, idx, end) while a route is active
        kept, frame = num_video, None
        for i, block in enumerate(self.blocks):
            if i in route_at:
                ratio, end = route_at[i]
                keep = K.select_tokens(b, num_video, ratio, generator=generator, force_keep=force_keep,
                                       device=x.device)
                rest = torch.arange(num_video, x.shape[1], device=x.device).expand(b, -1)
                idx = torch.cat([keep, rest], dim=1)
                saved = (x, rope, idx, end)
                x = K.tread_gather(x, idx)
                rope = (K.tread_gather(rope[0], idx, shared=True), K.tread_gather(rope[1], idx, shared=True))
                kept = keep.shape[1]
                frame = None if kept == num_video else keep // (grid[1] * grid[2])
            if i not in skip:
                segments = (kept, x.shape[1] - kept)
                audio_fn = None
                if i in inject:
                    n = inject[i]
                    audio_fn = AudioInjection(self.audio_injector.injector[n], None if ada is None else ada[n],
                                              local, glob, kept, frame)
                x = block(x, context, tproj, rope, None, segments, audio_fn)
            if saved is not None and i == saved[3]:
                x_full, rope, idx, _ = saved
                x = K.tread_scatter(x_full, x, idx)
                saved, kept, frame = None, num_video, None
            if i in want:
                captured[i] = (K.tread_scatter(saved[0], x, saved[2]) if saved is not None else x)[:, :num_video]

        out = self.head(x[:, :num_video], temb, grid)
        return (out, captured) if capture_hidden else out


def example_inputs(cfg: WanS2VConfig, hidden_states: torch.Tensor) -> dict:
    """Conditioning of the right shapes for ``hidden_states`` (probes and benchmarks): audio for its
    frames, a reference frame and the 19 motion latents of a continuation window (the longest
    sequence a sample can have)."""
    b, c, f, h, w = hidden_states.shape
    like = dict(dtype=hidden_states.dtype, device=hidden_states.device)
    return dict(audio=torch.randn(b, 25, cfg.audio_dim, 4 * f, **like), ref_latents=torch.randn(b, c, 1, h, w, **like),
                motion_latents=torch.randn(b, c, MOTION_FRAMES[1], h, w, **like))


__all__ = ["KEEP_FP32", "MOTION_FRAMES", "WanS2VBlock", "WanS2VConfig", "WanS2VTransformer", "example_inputs",
           "token_positions"]
