"""Wan model features beyond diffusers parity: loading paths, TREAD, chunked FF, checkpointing,
skip layers, captured hidden states, per-token time embedding, full-size shapes on fake tensors."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtune.config import resolve_routes
from vidtune.measure.counters import count_train_step
from vidtune.memory.checkpointing import apply_activation_checkpointing
from vidtune.models import from_pretrained
from vidtune.models.load import apply_dtype_policy
from vidtune.models.wan import WanConfig, WanTransformer
from vidtune.models.wan.model import KEEP_FP32
from vidtune.testing import tiny_wan_inputs, tiny_wan_transformer

tiny_model, inputs = tiny_wan_transformer, tiny_wan_inputs


def fwd_bwd(model, x, t, ctx, **kw):
    x = x.clone().requires_grad_(True)
    out = model(x, t, ctx, **kw)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def assert_close(a, b, tol=1e-5):
    assert ((a - b).norm() / b.norm()).item() < tol


# -- loading ---------------------------------------------------------------------------------
def save_diffusers_dir(model, d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "diffusion_pytorch_model.safetensors"))


def test_load_pipeline_dir_single_file_and_metadata(tmp_path):
    m = tiny_model()
    save_diffusers_dir(m, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    x, t, ctx = inputs()
    with torch.no_grad():
        want = m(x, t, ctx)
        assert torch.equal(from_pretrained(tmp_path / "pipe")(x, t, ctx), want)
        single = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"
        assert torch.equal(from_pretrained(single)(x, t, ctx), want)  # config.json beside it
        lone = tmp_path / "lone.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(lone),
                  metadata={"config": json.dumps(m.config.to_dict())})
        assert torch.equal(from_pretrained(lone)(x, t, ctx), want)


def test_load_errors_list_keys(tmp_path):
    m = tiny_model()
    d = tmp_path / "t"
    save_diffusers_dir(m, d)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["blocks.0.attn1.bogus.weight"] = torch.zeros(1)
    del sd["proj_out.bias"]
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(KeyError) as e:
        from_pretrained(d)
    assert "blocks.0.attn1.bogus.weight" in str(e.value) and "proj_out.bias" in str(e.value)
    (d / "config.json").write_text(json.dumps({**m.config.to_dict(), "_class_name": "UNetModel"}))
    with pytest.raises(ValueError, match="_class_name"):
        from_pretrained(d)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nope")


# -- TREAD -----------------------------------------------------------------------------------
def test_tread_ratio_zero_equals_no_routing():
    m = tiny_model()
    x, t, ctx = inputs()
    plain = fwd_bwd(m, x, t, ctx)
    route = resolve_routes([{"selection_ratio": 0.0, "start_layer": 1, "end_layer": -2}], len(m.blocks))
    routed = fwd_bwd(m, x, t, ctx, routes=route,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(routed[0], plain[0]) and torch.equal(routed[1], plain[1])


def test_tread_seeded_routing_and_force_keep():
    m = tiny_model()
    x, t, ctx = inputs()
    route = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 2}], len(m.blocks))
    a = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(3))
    b = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(3))
    c = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(4))
    plain = fwd_bwd(m, x, t, ctx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[0], plain[0])
    keep_all = torch.ones(2, 18, dtype=torch.bool)  # forcing every token: nothing is routed
    forced = fwd_bwd(m, x, t, ctx, routes=route, force_keep=keep_all, generator=torch.Generator().manual_seed(3))
    assert_close(forced[0], plain[0], 1e-6)
    m.eval()  # routes are a training-only feature
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx, routes=route), m(x, t, ctx))


def test_tread_with_per_token_timesteps_runs_and_differs():
    m = tiny_model()
    x, _, ctx = inputs()
    t = torch.rand(2, 18) * 1000
    route = resolve_routes([{"selection_ratio": 0.4, "start_layer": 0, "end_layer": 1}], len(m.blocks))
    out, dx, grads = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(dx).all()


def test_route_validation():
    m = tiny_model()
    x, t, ctx = inputs()
    route = lambda r, s, e: {"selection_ratio": r, "start_layer": s, "end_layer": e}  # noqa: E731
    with pytest.raises(ValueError, match="overlap"):
        resolve_routes([route(0.5, 0, 2), route(0.5, 2, 3)], len(m.blocks))
    with pytest.raises(ValueError, match="outside"):
        resolve_routes([route(0.5, 1, 9)], len(m.blocks))
    with pytest.raises(TypeError, match="resolve_routes"):  # the model takes resolved routes only
        m(x, t, ctx, routes=[route(0.5, 1, 2)])


# -- chunked FF, checkpointing, skip layers, capture, time embedding -----------------------------
def test_chunked_ff_equals_unchunked(monkeypatch):
    m = tiny_model()
    x, t, ctx = inputs(b=1)
    plain = fwd_bwd(m, x, t, ctx)
    m.set_ff_chunk_size(5)  # 18 tokens: chunks of 5,5,5,3
    assert m.blocks[0].ffn.chunk_size == 5
    chunked = fwd_bwd(m, x, t, ctx)
    assert_close(chunked[0], plain[0], 1e-6)
    assert_close(chunked[1], plain[1], 1e-6)
    for n in plain[2]:
        assert_close(chunked[2][n], plain[2][n], 1e-5)
    monkeypatch.setenv("WAN_FEED_FORWARD_CHUNK_SIZE", "7")
    m.set_ff_chunk_size(5)
    assert m.blocks[0].ffn.chunk_size == 7


def test_checkpointing_equals_plain():
    m = tiny_model()
    x, t, ctx = inputs()
    route = resolve_routes([{"selection_ratio": 0.5, "start_layer": 1, "end_layer": 2}], len(m.blocks))
    plain = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(1))
    assert apply_activation_checkpointing(m.blocks, every_n=2) == 2
    ckpt = fwd_bwd(m, x, t, ctx, routes=route, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ckpt[0], plain[0])
    for n in plain[2]:
        assert_close(ckpt[2][n], plain[2][n], 1e-6)
    assert list(dict(m.named_parameters())) == list(plain[2])  # names unchanged


def test_skip_layers_and_capture_hidden():
    m = tiny_model()
    x, t, ctx = inputs()
    with torch.no_grad():
        out, hidden = m(x, t, ctx, skip_layers=[1], capture_hidden=[0, 1, 3])
        assert set(hidden) == {0, 1, 3} and hidden[0].shape == (2, 18, 32)
        assert torch.equal(hidden[0], hidden[1])  # block 1 skipped
        ref = tiny_model()
        ref.blocks = torch.nn.ModuleList([ref.blocks[0], ref.blocks[2], ref.blocks[3]])
        assert torch.equal(ref(x, t, ctx), out)


def test_force_2_1_time_embedding():
    m = tiny_model()
    x, _, ctx = inputs()
    t = torch.tensor([[700.0] * 18, [20.0] * 18])
    m.force_2_1_time_embedding = True
    with torch.no_grad():
        assert_close(m(x, t, ctx), m(x, t[:, 0], ctx), 1e-6)


def test_kernels_import_without_diffusers():
    code = "import sys, vidtune_kernels; print(any(m.split('.')[0] in ('diffusers', 'transformers') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# -- full size, no weights -------------------------------------------------------------------
FULL = {
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
    "wan-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
}


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_fwd_bwd_on_fake_tensors(name):
    cfg = WanConfig(**FULL[name])
    with FakeTensorMode():
        model = apply_dtype_policy(WanTransformer(cfg), torch.bfloat16, KEEP_FP32)
        apply_activation_checkpointing(model.blocks)
        model.set_ff_chunk_size(4096)

        def make():  # 832x480x81 frames -> latents 21x60x104 -> 32,760 tokens
            return (torch.randn(1, 16, 21, 60, 104, dtype=torch.bfloat16), torch.tensor([500.0]),
                    torch.randn(1, 512, 4096, dtype=torch.bfloat16)), {}

        c = count_train_step(model, make)
    n_params = sum(p.numel() for p in model.parameters())
    assert (1.2e9 < n_params < 1.6e9) if name == "wan-1.3b" else (13e9 < n_params < 15e9)
    # fwd+bwd ~ 6 * params * tokens for the linears alone
    assert c.flops > 6 * n_params * 32760 * 0.9


def test_traces_under_torch_compile_fullgraph():
    """The custom ops (with fakes) let dynamo capture the whole model, fwd and bwd, no graph breaks."""
    m = tiny_model(num_layers=2)
    x, t, ctx = inputs(b=1)
    want = fwd_bwd(m, x, t, ctx)
    got = fwd_bwd(torch.compile(m, backend="aot_eager", fullgraph=True), x, t, ctx)
    assert_close(got[0], want[0], 1e-6)
    for n in want[2]:
        assert_close(got[2]["_orig_mod." + n], want[2][n], 1e-5)


def test_builds_and_runs_on_meta():
    with torch.device("meta"):
        m = WanTransformer(WanConfig(**FULL["wan-14b"]))
        out = m(torch.randn(1, 16, 21, 60, 104), torch.tensor([500.0]), torch.randn(1, 512, 4096))
    assert out.shape == (1, 16, 21, 60, 104) and out.device.type == "meta"
