"""Sana Video's caches on a tiny random pipeline and ffmpeg clips: Gemma2 text entries equal
(torch.equal) to SanaVideoPipeline.encode_prompt with the arguments its __call__ uses; I2V image
latents cached like latents; loss masks matched by stem, aligned with the clip, pooled to the latent
grid, and masked-out latents get zero gradient."""
import shutil

import pytest
import torch
from PIL import Image

from vidtune.config import CacheConfig, DatasetConfig, ModelConfig
from vidtune.data import CachedLoader, Encoders, prepare_data
from vidtune.data.encode import sana_instruction
from vidtune.data.prepare import LATENTS, TEXT
from vidtune.testing import write_captioned_clips
from vidtune.train.flow import flow_loss
from vidtune.train.forward import sana_video_forward

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

PROMPTS = ["a red cat", "The Blue dog, on a video"]


def _model(tiny_sana_dir, flavour="2b-480p"):
    return ModelConfig(family="sana_video", flavour=flavour, path=str(tiny_sana_dir), text_encoder_dtype="fp32",
                       vae_dtype="fp32")


def test_text_entries_equal_the_pipelines_encode_prompt(tiny_sana_dir):
    from diffusers import SanaVideoPipeline

    pipe = SanaVideoPipeline.from_pretrained(tiny_sana_dir, dtype=torch.float32)
    chi = sana_instruction()
    assert chi[0].startswith("Given a user prompt") and chi[-1] == "User Prompt: "
    want, want_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                               complex_human_instruction=chi, max_sequence_length=300)
    # the negative prompt as __call__ encodes it: CFG on, no instruction prefix
    _, _, neg, neg_mask = pipe.encode_prompt(PROMPTS[:1], negative_prompt="blurry", device="cpu",
                                             complex_human_instruction=chi, max_sequence_length=300)
    enc = Encoders(_model(tiny_sana_dir))
    got = enc.text_entries(PROMPTS)
    (got_neg,) = enc.text_entries(["blurry"], negative=True)
    assert want.shape == (2, 300, 32) and want_mask[0].sum() < 300  # padded: the mask matters
    for i, e in enumerate(got):
        assert torch.equal(e["prompt_embeds"], want[i]) and torch.equal(e["prompt_attention_mask"], want_mask[i])
    assert torch.equal(got_neg["prompt_embeds"], neg[0]) and torch.equal(got_neg["prompt_attention_mask"], neg_mask[0])
    assert not torch.equal(got_neg["prompt_embeds"], enc.text_entries(["blurry"])[0]["prompt_embeds"])


@pytest.fixture(scope="module")
def masked(tiny_sana_dir, tmp_path_factory):
    """Two clips, masks for clip0 (left half white) and a third clip without one; I2V flavour."""
    root = tmp_path_factory.mktemp("sana_data")
    clips = write_captioned_clips(root / "clips")
    shutil.copy(clips / "clip0.mp4", clips / "nomask.mp4")
    (clips / "nomask.txt").write_text("a cat")
    (root / "masks").mkdir()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(root / "masks" / "clip0.png")
    Image.new("L", (32, 32), 255).save(root / "masks" / "clip1.PNG")
    ds = DatasetConfig(id="d", path=str(clips), resolution=32, num_frames=9, loss_mask_path=str(root / "masks"))
    model = _model(tiny_sana_dir, "i2v-2b-480p")
    prepared = prepare_data([ds], CacheConfig(dir=str(root / "cache")), model, log=lambda m: None,
                            negative_texts=["blurry"])
    return prepared, model


def test_masks_by_stem_and_image_latents_cached(masked, tiny_sana_dir):
    prepared, model = masked
    assert sorted(e.source.name for e in prepared.entries) == ["clip0.mp4", "clip1.mp4"]
    (reason,) = [r for _, p, r in prepared.skips.entries if p.name == "nomask.mp4"]
    assert reason.startswith("no loss mask: no nomask.*")
    e0 = next(e for e in prepared.entries if e.source.name == "clip0.mp4")
    entry = prepared.store.load(LATENTS, e0.latent_key)
    lat, first, m = entry["latents"], entry["image_latents"], entry["loss_mask"]
    assert lat.shape == (16, 3, 4, 4) and first.shape == (16, 1, 4, 4) and m.shape == (1, 1, 4, 4)
    # the white left half of the 32x32 mask covers latent columns 0-1 (8 pixels each)
    assert torch.equal(m[0, 0], torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4))
    # SanaImageToVideoPipeline encodes the image alone: with the causal Wan VAE that is frame 0
    assert torch.allclose(first, lat[:, :1], atol=1e-6)
    assert set(prepared.negative_keys) == {"blurry"}
    neg = prepared.store.load(TEXT, prepared.negative_keys["blurry"])
    assert neg["prompt_embeds"].shape == (300, 32) and neg["prompt_attention_mask"].shape == (300,)


def test_masked_out_latents_get_zero_gradient(masked, tiny_sana_dir):
    """The loss through the training forward: I2V frame 0 and the black half of the mask carry no
    gradient back to the prediction; the rest does."""
    from vidtune.models import from_pretrained

    prepared, _ = masked
    loader = CachedLoader(prepared, 1, seed=0, text_max_length=300)
    batch = next(b for b in (next(loader) for _ in range(8)) if b.sources[0].endswith("clip0.mp4"))
    assert batch.prompt_mask.shape == (1, 300) and batch.prompt_embeds.shape == (1, 300, 32)
    model = from_pretrained(tiny_sana_dir, torch_dtype=torch.float32).train()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents.shape, generator=g)
    pred, target, weight = sana_video_forward(model, batch, noise, torch.tensor([0.6]), routes=[], generator=g)
    pred.retain_grad()
    flow_loss(pred, target, weight).backward()
    grad = pred.grad[0]  # (C, F, h, w)
    assert grad[:, 0].abs().max() == 0  # frame 0: the conditioning image
    assert grad[:, 1:, :, 2:].abs().max() == 0  # black half of the mask
    assert (grad[:, 1:, :, :2].abs() > 0).float().mean() > 0.99  # white half: everything learns
