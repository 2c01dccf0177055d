"""The validation sampler against diffusers' WanPipeline on a tiny random checkpoint.

Our transformer + our loop must give WanPipeline's latents (same scheduler config, seed, CFG,
steps) for UniPC and flow-match Euler; decoding must give its frames; files must be readable.
"""
import json

import pytest
import torch

from vidtune.config import ModelConfig
from vidtune.data.cache import pad_prompt_embeds
from vidtune.data.encode import Encoders
from vidtune.models import from_pretrained
from vidtune.sample import (initial_latents, load_prompts, load_scheduler_config, make_scheduler, sample,
                              save_outputs)

PROMPT, NEGATIVE = "a red cat on the video", "the blue dog"
SHAPE = dict(num_frames=9, height=32, width=48)  # latents (3, 4, 6): catches an H/W swap


@pytest.fixture(scope="module")
def parts(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_dir, dtype=torch.float32)
    ours = from_pretrained(tiny_wan_dir, subfolder="transformer", torch_dtype=torch.float32)
    # The trainer samples from cached embeddings: the same encoder path and padding.
    enc = Encoders(ModelConfig(path=str(tiny_wan_dir), text_encoder_dtype="fp32", vae_dtype="fp32"))
    pe = pad_prompt_embeds(enc.encode_text([PROMPT]))
    ne = pad_prompt_embeds(enc.encode_text([NEGATIVE]))
    return pipe, ours, pe, ne, load_scheduler_config(tiny_wan_dir)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_latents_match_wan_pipeline(parts, kind):
    pipe, ours, pe, ne, scfg = parts
    pipe.scheduler = make_scheduler(kind, 5.0, scfg)
    ref = pipe(PROMPT, NEGATIVE, num_inference_steps=6, guidance_scale=4.5,
               generator=torch.Generator().manual_seed(7), output_type="latent", **SHAPE).frames
    got = sample(ours, prompt_embeds=pe, negative_prompt_embeds=ne, steps=6, guidance=4.5, seed=7,
                 scheduler=kind, flow_shift=5.0, scheduler_config=scfg, **SHAPE)
    assert got.shape == ref.shape == (1, 16, 3, 4, 6)
    assert _rel(got, ref) < 1e-5
    # The noise itself is WanPipeline's: a different seed must move the result.
    other = sample(ours, prompt_embeds=pe, negative_prompt_embeds=ne, steps=6, guidance=4.5, seed=8,
                   scheduler=kind, flow_shift=5.0, scheduler_config=scfg, **SHAPE)
    assert _rel(other, ref) > 1e-2


def test_scheduler_settings():
    unipc = make_scheduler("unipc", 7.0)  # Wan's published UniPC config, shift overridden
    assert unipc.config.prediction_type == "flow_prediction" and unipc.config.use_flow_sigmas
    assert unipc.config.flow_shift == 7.0
    euler = make_scheduler("euler", None, dict(unipc.config, _class_name="UniPCMultistepScheduler"))
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 7.0
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler("ddim")


def test_skip_layer_guidance_formula_and_window(parts):
    _, ours, pe, ne, scfg = parts
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance=3.0, seed=3, scheduler="euler",
              flow_shift=3.0, scheduler_config=scfg, **SHAPE)
    # One Euler step by hand: x1 = x0 + (sigma1 - sigma0) * prediction, prediction = CFG + SLG term.
    sched = make_scheduler("euler", 3.0, scfg)
    sched.set_timesteps(1)
    t, (s0, s1) = sched.timesteps[0], sched.sigmas[:2]
    x0 = initial_latents(1, 16, SHAPE["num_frames"], SHAPE["height"], SHAPE["width"], 3, "cpu")
    tt = t.expand(1)
    with torch.no_grad():
        c, u, cs = ours(x0, tt, pe), ours(x0, tt, ne), ours(x0, tt, pe, skip_layers=(1,))
    pred = u + 3.0 * (c - u) + (c - cs) * 2.0
    got = sample(ours, steps=1, skip_layers=[1], skip_layers_scale=2.0, **kw)
    assert _rel(got, x0 + (s1 - s0) * pred) < 1e-5
    assert _rel(got, sample(ours, steps=1, **kw)) > 1e-3  # the skip term did something

    # Window: SLG runs on steps with start <= i/steps <= stop, one extra forward each.
    calls = []
    ours.train()  # as during training: sampling switches to eval and back
    handle = ours.register_forward_hook(lambda *a: calls.append(1))
    try:
        sample(ours, steps=4, skip_layers=[0], skip_layers_start=0.5, skip_layers_stop=1.0, **kw)
    finally:
        handle.remove()
        training, _ = ours.training, ours.eval()
    assert len(calls) == 4 * 2 + 2  # cond + uncond every step, skip pass on steps 2 and 3
    assert training


def test_decode_and_files(parts, tiny_wan_dir, tmp_path):
    from diffusers import AutoencoderKLWan
    from PIL import Image
    from torchcodec.decoders import VideoDecoder

    pipe, ours, pe, ne, scfg = parts
    pipe.scheduler = make_scheduler("unipc", 3.0, scfg)
    ref = pipe(PROMPT, NEGATIVE, num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(1), output_type="np", **SHAPE).frames  # (1, F, H, W, 3)
    vae = AutoencoderKLWan.from_pretrained(tiny_wan_dir, subfolder="vae", dtype=torch.float32)
    frames = sample(ours, prompt_embeds=pe, negative_prompt_embeds=ne, steps=3, guidance=4.0, seed=1,
                    scheduler="unipc", flow_shift=3.0, scheduler_config=scfg, vae=vae, output_type="video", **SHAPE)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 9, 3, 32, 48)
    ref_u8 = torch.from_numpy(ref).permute(0, 1, 4, 2, 3) * 255
    assert (frames.float() - ref_u8).abs().max() <= 0.5 + 1e-3  # same pixels up to rounding

    mp4, png = save_outputs(frames[0], tmp_path / "val", "anime_<token>", fps=16)
    assert mp4.name == "anime_token.mp4" and png.name == "anime_token.png"
    dec = VideoDecoder(str(mp4))
    assert dec.metadata.num_frames == 9 and tuple(dec[0].shape) == (3, 32, 48)
    with Image.open(png) as im:  # 8 frames of 9 shown, 4 per row, enlarged x3 and numbered (tests/unit/test_sheets.py)
        assert im.size == (4 * (3 * 48 + 4) + 4, 2 * (3 * 32 + 20 + 4))
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["anime_token.mp4", "anime_token.png"]


def test_load_prompts(tmp_path):
    lib = tmp_path / "lib.json"
    lib.write_text(json.dumps({"cat": "a red cat", "dog_<token>": "a blue dog"}))
    assert load_prompts(["First, a cat!"], lib) == [("first_a_cat", "First, a cat!"), ("cat", "a red cat"),
                                                     ("dog_<token>", "a blue dog")]
    assert load_prompts([], {"x": "y"}) == [("x", "y")]
    # Named from the text (any script, cut at 48 characters between words); repeats numbered.
    long = "a very long prompt about a cat that walks along the river bank at dusk"
    assert [n for n, _ in load_prompts([long, "两只猫，在舞台上", "A cat", "a cat", "!!"])] == [
        "a_very_long_prompt_about_a_cat_that_walks_along", "两只猫_在舞台上", "a_cat", "a_cat_2", "prompt4"]
    (tmp_path / "bad.json").write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(ValueError, match="bad.json: expected a JSON object"):
        load_prompts([], tmp_path / "bad.json")
    with pytest.raises(ValueError, match="used twice"):
        load_prompts(["a"], {"a": "b"})
