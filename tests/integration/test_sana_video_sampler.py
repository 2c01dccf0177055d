"""Sana Video validation sampling against diffusers' pipelines on a tiny random checkpoint: our
transformer + our loop + the pipeline's own scheduler give SanaVideoPipeline's latents (CFG,
padded captions from our text cache), and SanaImageToVideoPipeline's for an image."""
import pytest
import torch

from vidtune.config import ModelConfig
from vidtune.data.encode import Encoders
from vidtune.models import from_pretrained
from vidtune.sample import load_scheduler_config, sample_sana

PROMPT, NEGATIVE = "a red cat on the video", "the blue dog"
SHAPE = dict(num_frames=9, height=32, width=64)  # latents (3, 4, 8): catches an H/W swap; the pipeline wants 32 | H, W


@pytest.fixture(scope="module")
def parts(tiny_sana_dir):
    ours = from_pretrained(tiny_sana_dir, torch_dtype=torch.float32)
    enc = Encoders(ModelConfig(family="sana_video", flavour="2b-480p", path=str(tiny_sana_dir),
                               text_encoder_dtype="fp32", vae_dtype="fp32"))
    (pos,), (neg,) = enc.text_entries([PROMPT]), enc.text_entries([NEGATIVE], negative=True)
    return ours, enc, pos, neg, load_scheduler_config(tiny_sana_dir)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_latents_match_sana_video_pipeline(parts, tiny_sana_dir):
    from diffusers import SanaVideoPipeline

    ours, _, pos, neg, scfg = parts
    assert scfg["_class_name"] == "DPMSolverMultistepScheduler"  # the pipeline's own, not a vidtune default
    pipe = SanaVideoPipeline.from_pretrained(tiny_sana_dir, dtype=torch.float32)
    ref = pipe(PROMPT, NEGATIVE, num_inference_steps=5, guidance_scale=4.5, use_resolution_binning=False,
               generator=torch.Generator().manual_seed(7), output_type="latent", frames=9, height=32,
               width=64).frames
    kw = dict(prompt_embeds=pos["prompt_embeds"][None], prompt_mask=pos["prompt_attention_mask"][None],
              negative_prompt_embeds=neg["prompt_embeds"][None], negative_mask=neg["prompt_attention_mask"][None],
              steps=5, guidance=4.5, scheduler_config=scfg, **SHAPE)
    got = sample_sana(ours, seed=7, **kw)
    assert got.shape == ref.shape == (1, 16, 3, 4, 8)
    assert _rel(got, ref) < 1e-5
    assert _rel(sample_sana(ours, seed=8, **kw), ref) > 1e-2  # the noise itself is the pipeline's


def test_image_to_video_matches_sana_i2v_pipeline(parts, tiny_sana_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaImageToVideoPipeline

    ours, enc, pos, neg, _ = parts
    pipe = SanaImageToVideoPipeline.from_pretrained(tiny_sana_dir, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=8.0)  # the I2V pipeline's scheduler class
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(4))
    ref = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=3.0,
               use_resolution_binning=False, generator=torch.Generator().manual_seed(5), output_type="latent",
               frames=9, height=32, width=64).frames
    # the image as our caches encode it: [-1, 1] pixels, one frame, normalised latents
    image_latents = enc.encode_video((image * 2 - 1)[:, :, None])
    scfg = dict(pipe.scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler")
    got = sample_sana(ours, prompt_embeds=pos["prompt_embeds"][None], prompt_mask=pos["prompt_attention_mask"][None],
                      negative_prompt_embeds=neg["prompt_embeds"][None],
                      negative_mask=neg["prompt_attention_mask"][None], steps=4, guidance=3.0, seed=5,
                      scheduler_config=scfg, image_latents=image_latents, **SHAPE)
    assert got.shape == ref.shape
    assert torch.equal(got[:, :, :1], image_latents)  # frame 0 stays the clean image
    assert _rel(got, ref) < 1e-5
