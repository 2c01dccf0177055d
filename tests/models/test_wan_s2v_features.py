"""Wan S2V beyond the goldens: TREAD on S2V, checkpointing, the full-size architecture."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtune.config import resolve_routes
from vidtune.measure.counters import count
from vidtune.memory.checkpointing import apply_activation_checkpointing
from vidtune.models.load import apply_dtype_policy
from vidtune.models.wan_s2v import KEEP_FP32, WanS2VConfig, WanS2VTransformer, checkpoint_key
from vidtune.models.wan_s2v.model import AudioInjection
from vidtune.testing import tiny_s2v_config, tiny_wan_s2v_inputs, tiny_wan_s2v_transformer


def fwd_bwd(model, args, kwargs, **kw):
    x = args[0].clone().requires_grad_(True)
    audio = kwargs["audio"].clone().requires_grad_(True)
    out = model(x, *args[1:], **{**kwargs, "audio": audio}, **kw)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, audio.grad, grads


def route(ratio, start, end, layers=3):
    return resolve_routes([{"selection_ratio": ratio, "start_layer": start, "end_layer": end}], layers)


def test_tread_ratio_zero_equals_no_routing_bitwise():
    m = tiny_wan_s2v_transformer()
    args, kwargs = tiny_wan_s2v_inputs()
    plain = fwd_bwd(m, args, kwargs)
    routed = fwd_bwd(m, args, kwargs, routes=route(0.0, 0, 2), generator=torch.Generator().manual_seed(0))
    for a, b in zip(routed[:3], plain[:3]):
        assert torch.equal(a, b)
    assert all(torch.equal(routed[3][n], g) for n, g in plain[3].items())


def test_tread_routes_video_tokens_only():
    """Blocks inside a route see the kept video tokens followed by every reference and motion token,
    unchanged; outside it, all tokens. Seeded routing repeats; the route changes the output."""
    m = tiny_wan_s2v_transformer()
    args, kwargs = tiny_wan_s2v_inputs(b=1)
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, blk in enumerate(m.blocks)]
    with torch.no_grad():
        plain = m(*args, **kwargs)
        full = dict(seen)
        out = m(*args, **kwargs, routes=route(0.5, 1, 1), generator=torch.Generator().manual_seed(3))
        again = m(*args, **kwargs, routes=route(0.5, 1, 1), generator=torch.Generator().manual_seed(3))
    for h in hooks:
        h.remove()
    video = 3 * 4 * 4
    rest = full[1].shape[1] - video
    assert rest == 16 + 16 + 4 + 4  # reference, then motion at 1x, 2x, 4x
    assert seen[1].shape[1] == video - round(0.5 * video) + rest
    assert torch.equal(seen[1][:, -rest:], full[1][:, -rest:])
    assert seen[2].shape[1] == full[2].shape[1]
    assert torch.equal(out, again) and not torch.allclose(out, plain)


def test_injection_sees_each_frames_kept_tokens():
    """The injection on the kept tokens of a route equals the per-frame injection of all tokens,
    restricted to the kept ones: each token still attends to its own frame's audio tokens only."""
    m = tiny_wan_s2v_transformer()
    d, frames, hw = m.config.inner_dim, 3, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, frames * hw + 5, d, generator=g)
    local, glob = torch.randn(2, frames, 5, d, generator=g), torch.randn(2, frames, d, generator=g)
    attn, ada = m.audio_injector.injector[1], m.audio_injector.injector_adain_layers[1]
    with torch.no_grad():
        full = AudioInjection(attn, ada, local, glob, frames * hw)(x)
        keep = torch.sort(torch.randperm(frames * hw, generator=g)[:20]).values.expand(2, -1)
        idx = torch.cat([keep, torch.arange(frames * hw, x.shape[1]).expand(2, -1)], dim=1)
        kept = torch.gather(x, 1, idx[..., None].expand(-1, -1, d))
        routed = AudioInjection(attn, ada, local, glob, 20, keep // hw)(kept)
    torch.testing.assert_close(routed, torch.gather(full, 1, idx[..., None].expand(-1, -1, d)), rtol=1e-5, atol=1e-6)


def block_flops(s, text, d, ffn):
    """Forward matmul + attention FLOPs of one block over s tokens (2 per multiply-add)."""
    return 12 * s * d * d + 4 * s * s * d + 4 * s * text * d + 4 * s * d * ffn + 4 * text * d * d


def injection_flops(k, frames, d, keys_per_query, tokens=5):
    """AdaLN linear per frame, q/o on k tokens, k/v on the audio tokens, attention over keys_per_query."""
    return 4 * frames * d * d + 4 * k * d * d + 4 * frames * tokens * d * d + 4 * k * keys_per_query * d


def test_tread_flop_cut_matches_the_analytic_model():
    cfg = tiny_s2v_config(num_layers=6, audio_inject_layers=(0, 2, 3), num_attention_heads=4)
    m = tiny_wan_s2v_transformer(**{k: v for k, v in cfg.items() if k in ("num_layers", "audio_inject_layers",
                                                                         "num_attention_heads")})
    b, f, h, w, text = 1, 5, 16, 16, 7
    args, kwargs = tiny_wan_s2v_inputs(b=b, f=f, h=h, w=w, text_len=text)
    d, ffn = m.config.inner_dim, m.config.ffn_dim
    video, rest = f * (h // 2) * (w // 2), (h // 2) * (w // 2) * 2 + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    ratio, start, end = 0.5, 1, 4
    kept = video - round(ratio * video)
    with torch.no_grad():
        plain = count(m, *args, **kwargs)[0].flops
        routed = count(m, *args, **kwargs, routes=route(ratio, start, end, 6), generator=torch.Generator())[0].flops
    analytic = 0
    for i in range(start, end + 1):
        analytic += block_flops(video + rest, text, d, ffn) - block_flops(kept + rest, text, d, ffn)
        if i in m.config.audio_inject_layers:
            analytic += injection_flops(video, f, d, 5) - injection_flops(kept, f, d, 5 * f)
    analytic *= b
    assert abs((plain - routed) - analytic) <= 0.03 * analytic, (plain - routed, analytic)


def test_checkpointing_equals_plain():
    m = tiny_wan_s2v_transformer()
    args, kwargs = tiny_wan_s2v_inputs()
    r = route(0.5, 0, 1)
    plain = fwd_bwd(m, args, kwargs, routes=r, generator=torch.Generator().manual_seed(1))
    assert apply_activation_checkpointing(m.blocks) == 3
    ckpt = fwd_bwd(m, args, kwargs, routes=r, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ckpt[0], plain[0])
    for a, b in zip(ckpt[1:3], plain[1:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(n.startswith("audio_injector.") and g.abs().sum() > 0 for n, g in ckpt[3].items())


def test_audio_length_must_match_the_clip():
    m = tiny_wan_s2v_transformer()
    args, kwargs = tiny_wan_s2v_inputs(b=1)
    kwargs["audio"] = kwargs["audio"][..., :-4]
    with pytest.raises(ValueError, match="4 frames per latent"):
        m(*args, **kwargs)


def test_full_size_14b_matches_the_official_key_count_and_runs_on_fake_tensors():
    cfg = WanS2VConfig()  # defaults: the 14B S2V (official wan/configs/wan_s2v_14B.py)
    with torch.device("meta"):
        model = WanS2VTransformer(cfg)
    assert len(model.state_dict()) == 1260  # the official state dict's key count
    n = sum(p.numel() for p in model.parameters())
    assert 15.5e9 < n < 17e9
    with FakeTensorMode():
        model = apply_dtype_policy(WanS2VTransformer(cfg), torch.bfloat16, KEEP_FP32)
        assert model.condition_embedder.causal_audio_encoder.encoder.conv3.conv.conv.weight.dtype == torch.float32
        out = model(torch.randn(1, 16, 2, 60, 104, dtype=torch.bfloat16), torch.tensor([500.0]),
                    torch.randn(1, 512, 4096, dtype=torch.bfloat16),
                    audio=torch.randn(1, 25, 1024, 8), ref_latents=torch.randn(1, 16, 1, 60, 104, dtype=torch.bfloat16),
                    motion_latents=torch.randn(1, 16, 19, 60, 104, dtype=torch.bfloat16))
    assert out.shape == (1, 16, 2, 60, 104)


def test_official_keys_map_one_to_one():
    with torch.device("meta"):
        ours = set(WanS2VTransformer(WanS2VConfig(**tiny_s2v_config())).state_dict())
    official = {"casual_audio_encoder.weights", "casual_audio_encoder.encoder.conv2.conv.weight",
                "blocks.1.self_attn.o.bias", "blocks.2.cross_attn.norm_k.weight", "blocks.0.norm3.weight",
                "audio_injector.injector.1.o.weight", "head.head.weight", "head.modulation",
                "time_projection.1.weight", "cond_encoder.bias", "trainable_cond_mask.weight"}
    assert {checkpoint_key(k) for k in official} <= ours
    assert all(checkpoint_key(k) == k for k in ours)


def test_no_pose_video_is_zero_pose_latents():
    m = tiny_wan_s2v_transformer().eval()
    args, kwargs = tiny_wan_s2v_inputs(b=1)
    with torch.no_grad():
        none = m(*args, **kwargs)
        zeros = m(*args, **kwargs, pose_latents=torch.zeros(1, 16, *args[0].shape[2:]))
    assert torch.equal(none, zeros)


@pytest.mark.parametrize("lead", [1, 19])
def test_training_inputs_reference_motion_and_dropped_audio(lead):
    """The S2V training forward: the window's first latent (+ 18 motion latents) is conditioning,
    not target; a dropped caption zeroes the audio (the unconditional branch)."""
    from vidtune.data import Batch
    from vidtune.train.forward import wan_s2v_forward

    m = tiny_wan_s2v_transformer().eval()
    g = torch.Generator().manual_seed(0)
    f = 2
    latents = torch.randn(2, 16, lead + f, 8, 8, generator=g)
    audio = torch.randn(2, 4 * f, 25, 12, generator=g)

    def run(dropped, audio):
        batch = Batch(latents, torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 5]),
                      ["a", "b"], torch.tensor(dropped), ["d", "d"], ["x", "y"], {"audio": audio})
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            return wan_s2v_forward(m, batch, noise, torch.tensor([0.3, 0.8]), routes=(), generator=None)

    pred, target, weight = run([False, True], audio)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    assert pred.shape == target.shape == (2, 16, f, 8, 8) and weight is None
    assert torch.equal(target, noise[:, :, lead:] - latents[:, :, lead:])
    silent, _, _ = run([False, True], torch.cat([audio[:1], torch.zeros_like(audio[1:])]))
    assert torch.equal(pred, silent)  # sample 1's caption was dropped: its audio never counted
    heard, _, _ = run([False, False], audio)
    assert torch.equal(heard[0], pred[0]) and not torch.allclose(heard[1], pred[1])
