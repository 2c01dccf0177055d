"""vidtune's Sana Video transformer against diffusers' SanaVideoTransformer3DModel on the same
weights: forward, input grads and every parameter grad within 1e-4 relative, in train mode, called
with diffusers' keyword arguments, loaded by ``from_pretrained`` from a ``save_pretrained`` dir;
odd patch grid (5 x 7), padded captions, batch 2; the timestep forms of T2V and I2V."""
import json

import pytest
import torch

from vidtune.models import from_pretrained, save_pretrained

CFG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
           num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
           mlp_ratio=2.0, sample_size=30, patch_size=(1, 2, 2), rope_max_seq_len=32)
B, F, H, W, L = 2, 3, 10, 14, 7  # latents -> 3 x 5 x 7 patches


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(0)
    ref = SanaVideoTransformer3DModel(**CFG)
    with torch.no_grad():
        for p in ref.parameters():  # no zero-initialised term hides a wrong path
            p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("sana") / "transformer"
    ref.save_pretrained(d)
    return ref.train(), from_pretrained(d).train(), d


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, F, H, W, generator=g)
    ctx = torch.randn(B, L, 12, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0  # padded captions of different lengths
    mask[1, 3:] = 0
    return x, ctx, mask, torch.tensor([900.0, 40.0]), torch.randn(B, 4, F, H, W, generator=g)


def test_forward_and_every_grad_equal_diffusers(pair):
    ref, ours, _ = pair
    x, ctx, mask, t, g_out = _inputs()
    results = {}
    for name, model in (("diffusers", ref), ("vidtune", ours)):
        model.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        out = model(hidden_states=xi, encoder_hidden_states=ci, timestep=t, encoder_attention_mask=mask,
                    return_dict=False)
        out = out[0] if isinstance(out, tuple) else out
        (out * g_out).sum().backward()
        results[name] = (out.detach(), xi.grad, ci.grad, {n: p.grad for n, p in model.named_parameters()})
    (o_r, dx_r, dc_r, g_r), (o, dx, dc, g) = results["diffusers"], results["vidtune"]
    assert o.shape == (B, 4, F, H, W)
    assert _rel(o, o_r) < 1e-4 and _rel(dx, dx_r) < 1e-4 and _rel(dc, dc_r) < 1e-4
    assert set(g) == set(g_r) and len(g) == len(list(ref.parameters()))
    bad = {n: _rel(g[n], g_r[n]) for n in g if _rel(g[n], g_r[n]) >= 1e-4}
    assert not bad, bad
    # the mask matters: the padded tokens of sample 1 are ignored, sample 0 would see them
    assert dc[1, 3:].abs().max() == 0 and dc[0, :5].abs().max() > 0


def test_i2v_and_per_frame_timesteps_equal_diffusers(pair):
    """SanaImageToVideoPipeline's per-token timesteps (B, 1, F, H', W'), frame 0 at t = 0: the same
    through our per-token path and our per-frame (B, F) form."""
    ref, ours, _ = pair
    x, ctx, mask, _, _ = _inputs(2)
    cond = torch.zeros(B, 1, F, H // 2, W // 2)
    cond[:, :, 0] = 1.0
    t = torch.tensor([700.0, 300.0]).view(B, 1, 1, 1, 1) * (1 - cond)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                   return_dict=False)[0]
        per_token = ours(hidden_states=x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask)
        per_frame = ours(hidden_states=x, encoder_hidden_states=ctx, timestep=t[:, 0, :, 0, 0],
                         encoder_attention_mask=mask)
        per_sample = ours(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([700.0, 300.0]),
                          encoder_attention_mask=mask)
    assert _rel(per_token, want) < 1e-5 and _rel(per_frame, want) < 1e-5
    assert _rel(per_sample, want) > 1e-3  # frame 0 at t = 0 really changed the result


def test_save_pretrained_round_trip_and_stray_leading_dim(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    from vidtune.models.load import WEIGHTS_NAME

    _, ours, d = pair
    out = save_pretrained(ours, tmp_path / "again")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "SanaVideoTransformer3DModel" and cfg["patch_size"] == [1, 2, 2]
    again = from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    # Some exports store the output scale_shift_table as (1, 2, D) (SimpleTuner patches it after load).
    sd = load_file(d / WEIGHTS_NAME)
    sd["scale_shift_table"] = sd["scale_shift_table"][None]
    (tmp_path / "odd").mkdir()
    save_file(sd, tmp_path / "odd" / WEIGHTS_NAME)
    (tmp_path / "odd" / "config.json").write_text((d / "config.json").read_text())
    assert torch.equal(from_pretrained(tmp_path / "odd").scale_shift_table, ours.scale_shift_table)


def test_unsupported_configs_are_named():
    from vidtune.models.sana_video import SanaVideoConfig

    with pytest.raises(ValueError, match="guidance_embeds"):
        SanaVideoConfig(guidance_embeds=True)
    with pytest.raises(ValueError, match="cross_attention_dim = 64 must equal"):
        SanaVideoConfig(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=64)
