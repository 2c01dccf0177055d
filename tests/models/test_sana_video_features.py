"""Sana Video's memory and speed features: frame-chunked Mix-FFN with a one-frame halo equals the
unchunked FFN (forward and grads) while bounding its intermediate; TREAD routes go around the
attention only, so the convolutions always see the full grid, and the FLOP cut is what the routed
attention saves; the model builds through vidtune.build with checkpointing."""
import pytest
import torch

from vidtune.config import resolve_routes
from vidtune.measure.counters import count
from vidtune.testing import tiny_sana_transformer

B, F, H, W, L = 2, 4, 6, 8, 5  # 4 x 3 x 4 = 48 tokens


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 4, F, H, W, generator=g), timestep=torch.tensor([800.0, 120.0]),
                encoder_hidden_states=torch.randn(B, L, 12, generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def _step(model, **kw):
    model.zero_grad(set_to_none=True)
    x = _inputs()
    x["hidden_states"].requires_grad_()
    out = model(**x, **kw)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x["hidden_states"].grad, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [1, 48, 60, 1000])  # 1 frame (halo both sides), 2 frames, 2, off
def test_frame_chunked_ffn_equals_unchunked_and_bounds_frames(chunk):
    model = tiny_sana_transformer()
    ref = _step(model)
    seen = []
    hook = model.blocks[0].ff.conv_inverted.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    model.set_ff_chunk_size(chunk)
    got = _step(model)
    hook.remove()
    assert _rel(got[0], ref[0]) < 1e-6 and _rel(got[1], ref[1]) < 1e-5
    assert max(_rel(got[2][n], ref[2][n]) for n in ref[2]) < 1e-5
    frames = max(1, chunk // (B * (H // 2) * (W // 2)))
    # every conv call sees at most its frames plus one halo frame on each side, never more
    assert max(seen) <= B * min(F, frames + 2)
    if chunk < B * F * (H // 2) * (W // 2):
        assert max(seen) < B * F


def test_tread_routes_the_attention_only():
    model = tiny_sana_transformer()
    routes = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 1}], 3)
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: sizes.setdefault(name, []).append(a[0].shape[1]))
             for name, m in model.named_modules() if name.endswith(("attn1", "attn2"))]
    hooks += [b.ff.register_forward_hook(lambda mod, a, o, i=i: sizes.setdefault(f"ff{i}", []).append(a[0].shape[1]))
              for i, b in enumerate(model.blocks)]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    routed = _step(model, routes=routes, generator=gen())
    for h in hooks:
        h.remove()
    S = F * (H // 2) * (W // 2)
    # the routed block attends over half the tokens, the others over all
    assert sizes["transformer_blocks.1.attn1"] == sizes["transformer_blocks.1.attn2"] == [S // 2]
    assert sizes["transformer_blocks.0.attn1"] == sizes["transformer_blocks.2.attn1"] == [S]
    assert all(sizes[f"ff{i}"] == [S] for i in range(3))  # the convolutions always see the full grid
    plain = _step(model)
    assert _rel(routed[0], plain[0]) > 1e-3  # the route changed the result...
    assert torch.equal(_step(model, routes=routes, generator=gen())[0], routed[0])  # ...reproducibly
    assert all(torch.isfinite(g).all() for g in routed[2].values())
    model.eval()  # validation: routes are ignored
    with torch.no_grad():
        assert torch.equal(model(**_inputs(), routes=routes, generator=gen()), model(**_inputs()))


def test_tread_per_frame_timesteps_and_force_keep():
    """I2V routes: per-frame modulation follows each kept token's frame; forced tokens stay."""
    model = tiny_sana_transformer()
    S = F * (H // 2) * (W // 2)
    routes = resolve_routes([{"selection_ratio": 0.75, "start_layer": 0, "end_layer": 1}], 3)
    keep = torch.zeros(B, S, dtype=torch.bool)
    keep[:, :12] = True  # frame 0, e.g. a clean conditioning frame
    seen = []
    hook = model.blocks[0].attn1.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    x = _inputs()
    t = torch.tensor([[0.0, 600.0, 600.0, 600.0], [0.0, 90.0, 90.0, 90.0]])
    out = model(**{**x, "timestep": t}, routes=routes, force_keep=keep, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen == [S - round(0.75 * S)] and torch.isfinite(out).all()
    # per-frame and the same timesteps per token give the same routed result (same draws)
    per_token = t.repeat_interleave(S // F, dim=1)
    again = model(**{**x, "timestep": per_token}, routes=routes, force_keep=keep,
                  generator=torch.Generator().manual_seed(0))
    assert _rel(again, out) < 1e-6


def test_tread_flop_cut_is_the_routed_attention():
    """Counted FLOPs of fwd + bwd: a 0.5 route over blocks 1..2 cuts exactly the attention FLOPs
    of the routed tokens; the Mix-FFN convolutions are unchanged."""
    model = tiny_sana_transformer()
    routes = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 2}], 3)

    def flops(**kw):
        c, _ = count(lambda: _step(model, **kw))
        return c

    plain, routed = flops(), flops(routes=routes, generator=torch.Generator().manual_seed(0))
    conv = lambda c: sum(v for k, v in c.flops_by_op.items() if "conv" in k)  # noqa: E731
    attn = lambda c: sum(v for k, v in c.flops_by_op.items() if "linear_attention" in k)  # noqa: E731
    assert conv(routed) == conv(plain) > 0
    assert attn(routed) == pytest.approx(attn(plain) * (1 + 0.5 * 2) / 3)
    assert routed.flops < plain.flops


def test_builds_through_vidtune_build_with_checkpointing(tmp_path):
    """The build path (LoRA, checkpointing, chunked FF) gives the same step as the bare model."""
    from vidtune.build import build_training_model
    from vidtune.config import AdapterConfig, ChunkedFFConfig, CompileConfig, MemoryConfig, ModelConfig
    from vidtune.models.sana_video import SanaVideoConfig

    arch = tiny_sana_transformer().config
    mem = MemoryConfig(gradient_checkpointing=True, chunked_ff=ChunkedFFConfig(enabled=True, chunk_size=24))
    built = build_training_model(ModelConfig(family="sana_video", flavour="2b-480p", dtype="fp32"),
                                 AdapterConfig(type="lora", rank=4, alpha=4.0, target_modules=["to_q", "conv_temp"]),
                                 mem, CompileConfig(enabled="off"), "cpu", init="random", arch=arch)
    assert isinstance(arch, SanaVideoConfig) and len(built.model.blocks) == 3
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert any("attn1.to_q.lora_A" in n for n in names) and any("ff.conv_temp.lora_B" in n for n in names)
    out, dx, grads = _step(built.model)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_counters_count_a_grouped_conv_backward_like_its_forward():
    """torch's formula overcounts a depthwise conv's weight grad by its channel count; ours: each
    of grad_input and grad_weight costs one forward (the Mix-FFN's conv_depth is depthwise)."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    c, _ = count(lambda: conv(x).sum().backward())
    assert c.flops_by_op["convolution_backward"] == 2 * c.flops_by_op["convolution"] > 0


def test_compiled_blocks_equal_eager():
    """apply_compile (aot_eager: Dynamo + AOTAutograd, no codegen) traces a Sana block whole: the
    linear-attention custom ops, the frame-chunked FFN and a route inside the checkpointed block."""
    import torch._dynamo

    from vidtune.build import build_training_model
    from vidtune.config import AdapterConfig, ChunkedFFConfig, CompileConfig, MemoryConfig, ModelConfig

    arch = tiny_sana_transformer().config
    routes = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 1}], 3)
    runs = []
    for enabled in ("off", "on"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        built = build_training_model(
            ModelConfig(family="sana_video", flavour="2b-480p", dtype="fp32"),
            AdapterConfig(type="lora", rank=4, alpha=4.0),
            MemoryConfig(gradient_checkpointing=True, chunked_ff=ChunkedFFConfig(enabled=True, chunk_size=24)),
            CompileConfig(enabled=enabled, backend="aot_eager"), "cpu", init="random", arch=arch, seed=1)
        with torch.no_grad():
            for p in built.params:  # non-zero LoRA B
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        assert built.compiled == (3 if enabled == "on" else 0)
        runs.append(_step(built.model, routes=routes, generator=torch.Generator().manual_seed(0)))
    (a, _, ga), (b, _, gb) = runs
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6, msg=n)


def test_triton_path_equals_torch_path(monkeypatch):
    """The whole model with every op on its Triton kernel (interpreter: tiny grid) gives the torch
    path's output and grads: per-frame modulation views, a route, the linear attention's strides."""
    model = tiny_sana_transformer(num_layers=2)
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 4, 2, 4, 6, generator=g), timestep=torch.tensor([[0.0, 600.0], [0.0, 90.0]]),
              encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
              encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    routes = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 1}], 2)
    runs = []
    for path in ("torch", "triton"):
        monkeypatch.setenv("VIDTUNE_KERNELS", path)
        model.zero_grad(set_to_none=True)
        out = model(**kw, routes=routes, generator=torch.Generator().manual_seed(0))
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = runs
    assert _rel(b, a) < 1e-5
    assert max(_rel(gb[n], ga[n]) for n in ga) < 1e-4
