"""Discover -> cache -> load on real ffmpeg-made videos with a tiny random Wan pipeline."""
import shutil
from pathlib import Path

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.config import CacheConfig, DatasetConfig, ModelConfig, load_config
from vidtune.data import CachedLoader, DataError, Encoders, pad_prompt_embeds, prepare_data
from vidtune.data.video import load_video_clip, probe_video
from vidtune.testing import make_test_image, make_test_video

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

PROMPTS = ["a red cat on the video", "the dog", "  a   blue&amp;dog  ", ""]


def model_cfg(path, **kw):
    return ModelConfig(path=str(path), vae_dtype="fp32", text_encoder_dtype="fp32", **kw)


def make_clips(root: Path, n=3, frames=9, size=(32, 32), fps=16, caption="a red cat"):
    for i in range(n):
        make_test_video(root / f"clip{i}.mp4", *size, frames=frames, fps=fps,
                        pattern="testsrc" if i % 2 == 0 else "testsrc2")
        (root / f"clip{i}.txt").write_text(f"{caption} {i}")
    return root


def run(ds_list, cache_dir, model, **kw):
    kw.setdefault("log", lambda s: None)
    return prepare_data(ds_list, CacheConfig(dir=str(cache_dir), vae_batch_size=2), model, **kw)


def test_text_embeddings_equal_wan_pipeline(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    with torch.no_grad():  # as WanPipeline.__call__ runs it (grad mode picks other CPU kernels)
        ref = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    enc = Encoders(model_cfg(tiny_wan_dir))
    ours = pad_prompt_embeds(enc.encode_text(PROMPTS), 512)
    assert ours.shape == ref.shape == (4, 512, 32)
    assert torch.equal(ours, ref)


def test_latents_normalised_like_wan(tiny_wan_dir, tmp_path):
    from diffusers import AutoencoderKLWan

    make_clips(tmp_path / "d", n=2)
    model = model_cfg(tiny_wan_dir)
    ds = DatasetConfig(id="d", path=str(tmp_path / "d"), resolution=32, num_frames=9, min_frames=9)
    data = run([ds], tmp_path / "cache", model)
    entry = data.entries[0]
    cached = data.store.load("latents", entry.latent_key)["latents"]
    assert cached.shape == (16, 3, 4, 4)
    vae = AutoencoderKLWan.from_pretrained(tiny_wan_dir, subfolder="vae")
    px = load_video_clip(entry.source, 9, 16, 32, 32)
    with torch.no_grad():
        mu = vae.encode(px[None]).latent_dist.mode()[0]
    # WanPipeline's inverse: latents / (1 / std) + mean must give back the posterior mean.
    std = torch.tensor(vae.config.latents_std).view(16, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(16, 1, 1, 1)
    torch.testing.assert_close(cached / (1.0 / std) + mean, mu, rtol=1e-5, atol=1e-5)


def test_fps_resampling_by_timestamp(tmp_path):
    # 8 fps source, 9 frames = 1.125 s -> 18 frames at 16 fps, each source frame shown twice.
    src = make_test_video(tmp_path / "slow.mp4", 32, 32, frames=9, fps=8, pattern="testsrc2")
    assert probe_video(src).frames(16) == 18
    clip = load_video_clip(src, 17, 16, 32, 32)
    assert clip.shape == (3, 17, 32, 32) and -1 <= clip.min() and clip.max() <= 1
    from torchcodec.decoders import VideoDecoder

    source = VideoDecoder(str(src)).get_frames_at(list(range(9))).data.float() / 127.5 - 1.0
    for i in range(17):  # same size as the source: no resize, so frames compare exactly
        assert torch.equal(clip[:, i], source[i // 2])
    # 30 fps source: 16 fps clip frame i is the source frame shown at i / 16 s.
    fast = make_test_video(tmp_path / "fast.mp4", 32, 32, frames=30, fps=30, pattern="testsrc2")
    assert probe_video(fast).frames(16) == 16


def test_bad_files_skipped_and_counted(tiny_wan_dir, tmp_path):
    d = make_clips(tmp_path / "d", n=2)
    (d / "zero.mp4").write_bytes(b"")
    (d / "zero.txt").write_text("x")
    (d / "noise.mp4").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                dtype=torch.uint8).numpy().tobytes())
    (d / "noise.txt").write_text("x")
    good = (d / "clip0.mp4").read_bytes()
    (d / "trunc.mp4").write_bytes(good[: len(good) // 2])
    (d / "trunc.txt").write_text("x")
    make_test_video(d / "short.mp4", 32, 32, frames=5)
    (d / "short.txt").write_text("x")
    make_test_video(d / "nocap.mp4", 32, 32, frames=9)
    (d / "blank.txt").write_text("   ")
    make_test_video(d / "blank.mp4", 32, 32, frames=9)
    (d / "notes.txt").write_text("not a sample")
    logs = []
    ds = DatasetConfig(id="clips", path=str(d), resolution=32, num_frames=9)
    data = run([ds], tmp_path / "cache", model_cfg(tiny_wan_dir), log=logs.append)
    assert sorted(e.source.name for e in data.entries) == ["clip0.mp4", "clip1.mp4"]
    counts = data.skips.counts()["clips"]
    assert counts["zero-byte file"] == 1 and counts["too short"] == 1 and counts["no caption"] == 2
    assert counts["unreadable"] + counts.get("decode failed", 0) == 2  # noise + truncated
    summary = logs[-1]
    assert "8 files found, 2 used, 6 skipped" in summary and "missing nocap.txt" in summary


def test_second_run_reuses_cache_and_changed_settings_do_not(tiny_wan_dir, tmp_path):
    d = make_clips(tmp_path / "d", n=3)
    model = model_cfg(tiny_wan_dir)
    ds = DatasetConfig(id="d", path=str(d), resolution=32, num_frames=9)
    first = run([ds], tmp_path / "cache", model)
    assert first.stats["latents encoded"] == 3 and first.stats["text encoded"] == 4  # 3 captions + ""

    enc = Encoders(model)
    again = run([ds], tmp_path / "cache", model, encoders=enc, release_encoders=False)
    assert again.stats["latents encoded"] == 0 and again.stats["text encoded"] == 0
    assert enc.placement() == {"vae": None, "text_encoder": None}  # nothing loaded at all
    assert [e.latent_key for e in again.entries] == [e.latent_key for e in first.entries]
    import json
    index = json.loads((tmp_path / "cache" / "sources.json").read_text())
    assert len(index) == 3 and all({"sha256", "probe"} <= set(rec) for rec in index.values())

    for change in (dict(resolution=48), dict(crop=True, resolution=24), dict(num_frames=5, min_frames=5)):
        other = run([DatasetConfig(id="d", path=str(d), **{"resolution": 32, "num_frames": 9, **change})],
                    tmp_path / "cache", model)
        assert other.stats["latents encoded"] == 3, change
        assert not {e.latent_key for e in other.entries} & {e.latent_key for e in first.entries}

    # New content under the same name, and a new caption: only those entries are redone.
    make_test_video(d / "clip0.mp4", 32, 32, frames=9, pattern="smptebars")
    (d / "clip1.txt").write_text("a new caption")
    changed = run([ds], tmp_path / "cache", model)
    assert changed.stats["latents encoded"] == 1 and changed.stats["text encoded"] == 1

    # Another VAE (other weights) never reuses the old latents.
    vae2 = tmp_path / "model2"
    shutil.copytree(tiny_wan_dir, vae2)
    from diffusers import AutoencoderKLWan
    from vidtune.testing import tiny_vae_config
    torch.manual_seed(123)
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(vae2 / "vae")
    other_vae = run([ds], tmp_path / "cache", model_cfg(tiny_wan_dir, vae_path=str(vae2)))
    assert other_vae.stats["latents encoded"] == 3 and other_vae.stats["text encoded"] == 0


def test_images_buckets_compression_and_loader(tiny_wan_dir, tmp_path):
    vids = make_clips(tmp_path / "v", n=4, frames=13)
    make_test_video(vids / "wide.mp4", 64, 32, frames=13)
    (vids / "wide.txt").write_text("wide")
    imgs = tmp_path / "i"
    for i in range(3):
        make_test_image(imgs / f"im{i}.png", 48, 32, seed=i)
    datasets = [
        DatasetConfig(id="v", path=str(vids), resolution=32, num_frames=13, min_frames=9, frame_interval=4,
                      bucket_strategy="resolution_frames", caption_prefix="ohwx"),
        DatasetConfig(id="i", path=str(imgs), type="image", resolution=48, caption_strategy="filename",
                      crop=True, crop_style="random", weight=2.0),
    ]
    data = prepare_data(datasets, CacheConfig(dir=str(tmp_path / "c"), compress=True, vae_batch_size=3),
                        model_cfg(tiny_wan_dir), batch_size=1, log=lambda s: None)
    assert all(p.name.endswith(".zlib") for p in (tmp_path / "c").rglob("*.safetensors*"))
    buckets = {(e.dataset_id, e.bucket.name()) for e in data.entries}
    assert buckets == {("v", "32x32@13"), ("v", "48x16@13"), ("i", "64x32@1")}
    assert {e.caption for e in data.entries if e.dataset_id == "i"} == {"im0", "im1", "im2"}
    assert all(e.caption.startswith("ohwx ") for e in data.entries if e.dataset_id == "v")
    loader = CachedLoader(data, batch_size=1, seed=0)
    shapes = {tuple(next(loader).latents.shape) for _ in range(30)}
    assert shapes == {(1, 16, 4, 4, 4), (1, 16, 4, 2, 6), (1, 16, 1, 4, 8)}


def test_too_small_dataset_says_raise_repeats(tiny_wan_dir, tmp_path):
    d = make_clips(tmp_path / "d", n=2)
    ds = DatasetConfig(id="small", path=str(d), resolution=32, num_frames=9)
    with pytest.raises(DataError, match=r"no samples detected in dataset 'small'.*repeats = 1"):
        run([ds], tmp_path / "cache", model_cfg(tiny_wan_dir), batch_size=2, gradient_accumulation_steps=2)
    ds.repeats = 1
    data = run([ds], tmp_path / "cache", model_cfg(tiny_wan_dir), batch_size=2, gradient_accumulation_steps=2)
    CachedLoader(data, 2, gradient_accumulation_steps=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_during_startup_keeps_one_encoder_on_device(tiny_wan_dir):
    enc = Encoders(model_cfg(tiny_wan_dir), device="cuda", offload_during_startup=True)
    enc.encode_text(["a cat"])
    assert enc.placement() == {"vae": None, "text_encoder": "cuda:0"}
    enc.encode_video(torch.zeros(1, 3, 5, 32, 32))
    assert enc.placement() == {"vae": "cuda:0", "text_encoder": "cpu"}


def test_cli_prepare_only_writes_resolved_config_and_caches(tiny_wan_dir, tmp_path):
    d = make_clips(tmp_path / "d", n=2)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
path = "{tiny_wan_dir}"
vae_dtype = "fp32"
text_encoder_dtype = "fp32"
[train]
output_dir = "{tmp_path / 'out'}"
device = "cpu"
[cache]
dir = "{tmp_path / 'cache'}"
[[dataset]]
id = "clips"
path = "{d}"
resolution = 32
num_frames = 9
""")
    assert cli_main([str(cfg), "--prepare-only", "--set", "dataset.clips.repeats=2"]) == 0
    resolved = load_config(tmp_path / "out" / "config.resolved.toml")
    assert resolved.dataset[0].repeats == 2 and resolved.dataset[0].min_frames == 9
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 2
