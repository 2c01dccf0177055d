"""apply_compile composes with checkpointing, TREAD, LoRA and offload: the aot_eager backend
(Dynamo + AOTAutograd, no code generation, so cheap) gives the eager numbers, and one graph
serves every block. The inductor case runs end to end in tests/integration/test_train.py."""
import pytest
import torch
import torch._dynamo

from vidtune.build import build_training_model
from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig, OffloadConfig, resolve_routes
from vidtune.models.wan import WanConfig
from vidtune.testing import tiny_wan_inputs

ARCH = WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=24, freq_dim=16, ffn_dim=40, num_layers=4, rope_max_seq_len=64)
ROUTE = [{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 2}]
CASES = {
    "plain": dict(),
    "checkpointing": dict(ckpt=True),
    "tread": dict(tread=True),
    "lora": dict(lora=True),
    "offload": dict(lora=True, offload=True),
    "all": dict(lora=True, offload=True, ckpt=True, tread=True, chunk=True),
}


def build(compile_: bool, lora=False, offload=False, ckpt=False, tread=False, chunk=False):
    memory = MemoryConfig(gradient_checkpointing=ckpt,
                          offload=OffloadConfig(type="block_level" if offload else "none", backend="python"))
    memory.chunked_ff.enabled, memory.chunked_ff.chunk_size = chunk, 7
    adapter = AdapterConfig(type="lora" if lora else "full", rank=4, alpha=4.0)
    torch.manual_seed(0)
    built = build_training_model(ModelConfig(dtype="fp32"), adapter, memory,
                                 CompileConfig(enabled="on" if compile_ else "off", backend="aot_eager"), "cpu",
                                 init="random", arch=ARCH, seed=1)
    with torch.no_grad():  # non-zero LoRA B, so the adapter path shows in the output
        for p in built.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return built, resolve_routes(ROUTE, ARCH.num_layers) if tread else None


def step(built, routes):
    x, t, ctx = tiny_wan_inputs()
    out = built.model(x, t, ctx, routes=routes, generator=torch.Generator().manual_seed(0))
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in built.trainable.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_eager(case):
    torch._dynamo.reset()
    eager, routes = build(False, **CASES[case])
    compiled, _ = build(True, **CASES[case])
    assert compiled.compiled == ARCH.num_layers and eager.compiled == 0
    a, b = step(eager, routes), step(compiled, routes)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(b[1][n], a[1][n], rtol=1e-5, atol=1e-6, msg=n)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_one_graph_serves_every_block_and_a_route_recompiles_once():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    built, routes = build(True, ckpt=True, tread=True)  # full fine-tune: every block input needs grad
    step(built, None)
    assert graphs() == 1  # 4 blocks, one graph
    step(built, routes)  # routed blocks see half the tokens: one recompile, with them symbolic
    assert graphs() == 2
    other = resolve_routes([{"selection_ratio": 0.25, "start_layer": 0, "end_layer": 3}], ARCH.num_layers)
    step(built, other)  # another token count reuses the symbolic graph
    assert graphs() == 2


def test_lora_compiles_block_zero_apart():
    """With a frozen patch embedding, block 0's input needs no grad: one more graph, not one per block."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    built, _ = build(True, lora=True, ckpt=True)
    step(built, None)
    assert graphs() == 2
