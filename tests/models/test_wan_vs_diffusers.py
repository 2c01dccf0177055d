"""Our Wan transformer vs diffusers' WanTransformer3DModel at the same tiny configs and weights.

The checkpoint goes through diffusers' ``save_pretrained`` and our ``from_pretrained``; both models
run in train mode; output, input gradient and every parameter gradient must agree to 1e-4
relative. Each case runs on the torch path and on the Triton kernels (interpreter on CPU).
"""
import pytest
import torch
from diffusers import WanTransformer3DModel

from vidtune.models import from_pretrained

BASE = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=24, freq_dim=16, ffn_dim=40, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
CASES = {
    "t2v": dict(config={}, per_token=False, text_len=7),
    "i2v": dict(config=dict(in_channels=8, image_dim=20, added_kv_proj_dim=32), per_token=False, text_len=512),
    "per_token_t": dict(config=dict(cross_attn_norm=False), per_token=True, text_len=5),
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_reference(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**{**BASE, **config})
    with torch.no_grad():  # random everything, so no term is trivially zero
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    return ref


def make_inputs(cfg, case, b=2, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg["in_channels"], f, h, w, generator=g)
    tokens = f * (h // 2) * (w // 2)
    t = torch.rand(b, tokens, generator=g) * 1000 if case["per_token"] else torch.tensor([900.0, 37.5])[:b]
    ctx = torch.randn(b, case["text_len"], cfg["text_dim"], generator=g)
    img = torch.randn(b, 6, cfg["image_dim"], generator=g) if cfg.get("image_dim") else None
    return x, t, ctx, img


def run(model, x, t, ctx, img, **kw):
    x = x.clone().requires_grad_(True)
    out = model(x, t, ctx, img, return_dict=False, **kw)
    out = out[0] if isinstance(out, tuple) else out
    # A weighted loss so every output element has its own gradient.
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(tmp_path, monkeypatch, name, path):
    monkeypatch.setenv("VIDTUNE_KERNELS", path)
    case = CASES[name]
    cfg = {**BASE, **case["config"]}
    ref = make_reference(tmp_path, case["config"]).train()
    ours = from_pretrained(tmp_path).train()
    assert ours.config.num_layers == cfg["num_layers"]
    inputs = make_inputs(cfg, case, b=1 if path == "triton" else 2)

    r_out, r_dx, r_grads = run(ref, *inputs)
    o_out, o_dx, o_grads = run(ours, *inputs)

    assert rel(o_out, r_out) < 1e-4
    assert rel(o_dx, r_dx) < 1e-4
    assert set(o_grads) == set(r_grads), set(o_grads) ^ set(r_grads)
    bad = {n: rel(o_grads[n], r_grads[n]) for n in r_grads if rel(o_grads[n], r_grads[n]) >= 1e-4}
    assert not bad, bad
    total_o = torch.sqrt(sum(g.double().pow(2).sum() for g in o_grads.values()))
    total_r = torch.sqrt(sum(g.double().pow(2).sum() for g in r_grads.values()))
    assert abs(total_o - total_r) / total_r < 1e-4


def test_eval_mode_and_no_grad_match(tmp_path):
    ref = make_reference(tmp_path, {}).eval()
    ours = from_pretrained(tmp_path).eval()
    x, t, ctx, _ = make_inputs(BASE, CASES["t2v"])
    with torch.no_grad():
        assert rel(ours(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]) < 1e-5


def test_bf16_policy_matches_diffusers(tmp_path):
    """bf16 weights with fp32 norms/time embedding/tables, as diffusers loads them."""
    make_reference(tmp_path, {})
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    ours = from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    our_dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert our_dtypes == ref_dtypes
    assert our_dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert our_dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert our_dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    x, t, ctx, _ = make_inputs(BASE, CASES["t2v"], b=1, f=1)
    ref32 = from_pretrained(tmp_path)  # fp32 reference of the same weights
    with torch.no_grad():
        exact = ref32(x, t, ctx)
        ours_out = ours(x.bfloat16(), t, ctx.bfloat16())
        ref_out = ref(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0]
    assert ours_out.dtype == torch.bfloat16
    # flash-attn rule: our bf16 error is at most twice diffusers' bf16 error.
    assert (ours_out.float() - exact).abs().max() <= 2 * (ref_out.float() - exact).abs().max() + 1e-6
