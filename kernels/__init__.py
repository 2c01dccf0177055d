"""vidtune_kernels: fused ops for video diffusion transformers. Depends on torch (+ triton).

Every op comes as: Triton kernel(s) + launchers (``*_forward`` / ``*_backward``), torch custom
ops (``torch.ops.vidtune.*``, with fake impls for torch.compile / meta / FakeTensorMode), an
``autograd.Function``, a functional API and an ``nn.Module``. ``reference.py`` holds the
pure-torch specs. Path selection: ``VIDTUNE_KERNELS=auto|triton|torch`` (see ``_dispatch``).
"""
from ._dispatch import HAS_TRITON, mode, use_triton
from .ffn import ChunkedFeedForward, chunked_feed_forward, recomputed_when_saved, resolve_chunk_size
from .gelu import GeluTanh, gelu_tanh
from .linear_attention import LinearAttention, linear_attention
from .modulate import Modulate, modulate
from .norm import RMSNorm, rms_norm
from .residual import GatedResidual, gated_residual
from .rope import QKNormRope, Rope, qk_norm_rope, rope, rope_freqs_at, wan_rope_freqs
from .tread import TreadGather, TreadScatter, select_tokens, tread_gather, tread_scatter

__all__ = [
    "HAS_TRITON", "mode", "use_triton",
    "rope", "Rope", "wan_rope_freqs", "rope_freqs_at", "qk_norm_rope", "QKNormRope",
    "rms_norm", "RMSNorm",
    "modulate", "Modulate",
    "gated_residual", "GatedResidual",
    "linear_attention", "LinearAttention",
    "gelu_tanh", "GeluTanh", "chunked_feed_forward", "ChunkedFeedForward", "resolve_chunk_size",
    "recomputed_when_saved",
    "tread_gather", "tread_scatter", "TreadGather", "TreadScatter", "select_tokens",
]
