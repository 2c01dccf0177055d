"""int8 base (torchao Int8WeightOnlyConfig): SNR against the unquantized model, weight bytes,
LoRA on top, chunked FF composing with it, 4-bit refused for Wan."""
import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from vidtune.memory.quant import QuantConfig, apply_quantization, weight_bytes
from vidtune.testing import tiny_wan_inputs, tiny_wan_transformer

tiny_model, inputs = tiny_wan_transformer, tiny_wan_inputs
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2"]


def snr_db(x, ref):
    return (10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum())).item()


def fwd_bwd(m):
    x, t, ctx = inputs()
    x.requires_grad_(True)
    y = m(x, t, ctx)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad


def test_int8_snr_output_and_input_grad():
    ref = tiny_model(num_layers=3).requires_grad_(False)
    q = copy.deepcopy(ref)
    n = apply_quantization(q, QuantConfig(base_precision="int8"))
    assert n == 3 * 10  # every block linear: 4 self-attn, 4 cross-attn, 2 FFN
    assert type(q.blocks[0].ffn.net[0].proj.weight).__name__ == "Int8Tensor"
    assert type(q.proj_out.weight) is nn.Parameter  # outside the blocks: untouched
    (y, gx), (yr, gxr) = fwd_bwd(q), fwd_bwd(ref)
    assert snr_db(y, yr) > 20 and snr_db(gx, gxr) > 20
    assert not torch.equal(y, yr)


def test_int8_weight_bytes_vs_bf16():
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList([nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)) for _ in range(2)])
    blocks.to(torch.bfloat16)
    bf16 = weight_bytes(blocks)
    apply_quantization(blocks, QuantConfig(base_precision="int8"), family="wan")
    assert weight_bytes(blocks) <= 0.55 * bf16


def test_lora_trains_on_int8_and_chunked_ff_composes():
    base = tiny_model(num_layers=2).requires_grad_(False)
    apply_quantization(base, QuantConfig(base_precision="int8", quantize_via="device"), device="cpu")
    m = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), base)
    chunked = copy.deepcopy(m)
    chunked.set_ff_chunk_size(5)
    (y, gx), (yc, gxc) = fwd_bwd(m), fwd_bwd(chunked)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxc, gx, rtol=1e-5, atol=1e-5)
    for (n, p), (_, pc) in zip(m.named_parameters(), chunked.named_parameters()):
        if p.requires_grad:
            assert "lora_" in n and p.grad is not None
            torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["nf4", "int4", "NF4"])
def test_four_bit_refused_for_wan(precision):
    with pytest.raises(ValueError, match="too sensitive to 4-bit"):
        apply_quantization(tiny_model(num_layers=1), QuantConfig(base_precision=precision))


def test_bad_options():
    with pytest.raises(ValueError, match="quantize_via"):
        QuantConfig(base_precision="int8", quantize_via="gpu").validate()
    assert apply_quantization(tiny_model(num_layers=1), QuantConfig(base_precision="bf16")) == 0
