"""Counter-checked claims: TREAD's FLOP cut is the analytic one; chunked FF bounds the FF
intermediate. Shapes are bench-sized, so the runs are on fake tensors (no compute, exact counts)."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtune.config import resolve_routes
from vidtune.measure.counters import count, count_train_step
from vidtune.models.wan import WanConfig, WanTransformer
from vidtune.models.wan.model import FeedForward

D, FFN, LAYERS, TEXT = 512, 3072, 8, 512
FF_D = 384  # differs from the chunk size, so weight grads and chunk activations differ in shape
CFG = dict(num_attention_heads=4, attention_head_dim=128, text_dim=512, freq_dim=256, ffn_dim=FFN, num_layers=LAYERS)


def block_flops(n: int) -> float:
    """Matmul FLOPs of one Wan block, forward + backward, at n video tokens and TEXT context tokens.

    Linears cost 2mnk forward and twice that backward; attention's two matmuls 4n*m*D forward and
    five (2.5x) backward, as torch's SDPA formulas count them.
    """
    linear = 2 * n * D * D * 4 + 2 * n * D * D * 2 + 2 * TEXT * D * D * 2 + 2 * 2 * n * D * FFN
    attn = 4 * n * n * D + 4 * n * TEXT * D
    return 3 * linear + 3.5 * attn


def test_tread_cuts_flops_by_the_analytic_amount():
    with FakeTensorMode():
        model = WanTransformer(WanConfig(**CFG)).train()

        def inputs(**kw):
            return (torch.randn(1, 16, 7, 24, 40), torch.tensor([500.0]), torch.randn(1, TEXT, 512)), kw

        full = count_train_step(model, lambda: inputs())
        routed = count_train_step(model, lambda: (inputs()[0], dict(
            routes=resolve_routes([{"selection_ratio": 0.5, "start_layer": 2, "end_layer": -2}], LAYERS),
            generator=torch.Generator().manual_seed(0))))
    n = 7 * 12 * 20
    kept = n - round(0.5 * n)
    routed_blocks = LAYERS - 3  # layers 2..5 inclusive of an 8-block model
    expected = full.flops - routed_blocks * (block_flops(n) - block_flops(kept))
    assert abs(routed.flops / expected - 1) < 0.03, (routed.flops, expected)
    assert routed.flops < 0.7 * full.flops


def test_chunked_ff_bounds_the_intermediate():
    with FakeTensorMode():
        ff = FeedForward(FF_D, FFN)
        h = torch.randn(1, 4096, FF_D, requires_grad=True)
        peaks = {}
        for chunk in (None, 512):
            ff.chunk_size = chunk
            c, _ = count(lambda: ff(h).sum().backward(), existing=[h, *ff.parameters()])
            peaks[chunk] = c
            ff.zero_grad(set_to_none=True)
            h.grad = None
    def intermediate(c):  # live tokens x ffn_dim activations (not the (D, ffn_dim) weight grads)
        return sum(b for shape, b in c.peak_by_shape.items() if shape and shape[-1] == FFN and shape[-2:] != (FF_D, FFN))

    plain, chunked = intermediate(peaks[None]), intermediate(peaks[512])
    assert plain >= 4096 * FFN * 4 * 2  # pre-activation and activation, fp32
    assert plain >= 4 * chunked, (plain, chunked)
    assert peaks[512].peak_live_bytes < peaks[None].peak_live_bytes / 2
