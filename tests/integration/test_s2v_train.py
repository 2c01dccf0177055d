"""vidtune-train on Wan S2V end to end: a tiny random S2V pipeline (diffusers-port layout, tiny
wav2vec2), ffmpeg clips with audio (mono, stereo, shorter than the video), without audio, and one
long enough for a continuation window; validation clips with their audio as the soundtrack."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vidtune.cli.extract_audio import main as extract_audio
from vidtune.cli.train import main as train
from vidtune.data.audio import write_wav
from vidtune.train.log import loss_values
from vidtune.testing import (build_tiny_wan_s2v_pipeline_dir, make_test_clip_with_audio, make_test_image,
                             make_test_video, tiny_run_toml)

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

SIDE = 64  # the frame packer's 4x motion tokens need 8x8 latents
CLIPS = {  # name: (caption, tones, audio seconds, frames)
    "mono": ("a red cat", (440.0,), None, 12),
    "stereo": ("a blue dog", (330.0, 990.0), None, 12),
    "short": ("the video of a cat", (660.0,), 0.3, 12),
    "long": ("a cat on the red video", (550.0,), None, 84),
}


@pytest.fixture(scope="module")
def s2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v")
    model = build_tiny_wan_s2v_pipeline_dir(root / "model")
    videos = root / "videos"
    for i, (name, (caption, tones, seconds, frames)) in enumerate(CLIPS.items()):
        make_test_clip_with_audio(videos / f"{name}.mp4", SIDE, SIDE, frames=frames, tones=tones,
                                  audio_seconds=seconds, pattern=["testsrc", "testsrc2", "smptebars", "rgbtestsrc"][i],
                                  sample_rate=48000 if name == "stereo" else 44100)
        (videos / f"{name}.txt").write_text(caption)
    make_test_video(videos / "mute.mp4", SIDE, SIDE, frames=12, pattern="smptehdbars")
    (videos / "mute.txt").write_text("a dog")
    val = root / "val"
    make_test_image(val / "face.png", SIDE, SIDE)
    t = torch.arange(16000) / 16000
    write_wav(0.5 * torch.sin(2 * torch.pi * 300 * t), val / "face.wav")
    make_test_clip_with_audio(val / "talk.mp4", SIDE, SIDE, frames=12, tones=(700.0,))
    return root, model


def config(root: Path, model: Path, out: str, dataset: str, extra: str = "") -> Path:
    path = root / f"{out}.toml"
    path.write_text(tiny_run_toml(
        model, root / "cache", {"clips": root / "videos"}, root / out,
        "max_train_steps = 2\nlearning_rate = 1e-3\ncheckpoint_every = 0\ncaption_dropout = 0.5\nseed = 3",
        "[[tread.routes]]\nselection_ratio = 0.5\nstart_layer = 1\nend_layer = 1\n" + extra,
        model_lines='family = "wan_s2v"\nflavour = "s2v-14b-2.2"', dataset_lines=dataset, resolution=SIDE))
    return path


def test_trains_on_audio_skips_silent_videos_and_validates_with_the_soundtrack(s2v, capsys):
    from torchcodec.decoders import AudioDecoder, VideoDecoder

    root, model = s2v
    val = f"""
[validation]
every = 2
baseline = false
prompts = ["a red cat", "a blue dog"]
reference_media = ["{root / 'val' / 'face.png'}", "{root / 'val' / 'talk.mp4'}"]
num_frames = 9
resolution = "{SIDE}x{SIDE}"
steps = 2
guidance = 2.0
"""
    cfg = config(root, model, "run_a", '[dataset.audio]\nmotion = "auto"\n', val)
    assert train([str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1 x no audio: mute.mp4" in out and "4 used, 1 skipped" in out
    assert "64x64@81 x1" in out and "64x64@9 x3" in out  # the long clip trains a continuation window
    summary = json.loads((root / "run_a" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_files"] == 1
    losses = loss_values(root / "run_a")
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)
    feats = sorted((load_file(f)["audio"] for f in (root / "cache" / "audio").rglob("*.safetensors")),
                   key=lambda a: int((a.flatten(1).abs().sum(1) == 0).sum()))
    assert len(feats) == 4 and all(f.shape == (8, 25, 12) for f in feats)
    # Audio 0.3 s long: frames past 0.3 s (30 Hz index >= 8 of ~8) are zero, the first ones not.
    short = feats[-1].flatten(1).abs().sum(1)
    assert (short[:3] > 0).all() and (short[4:] == 0).all()
    assert all((f.flatten(1).abs().sum(1) > 0).all() for f in feats[:-1])  # mono, stereo, long: audio everywhere
    for name, tone in (("a_red_cat", 300.0), ("a_blue_dog", 700.0)):
        mp4 = root / "run_a" / "validation" / "step_000002" / f"{name}.mp4"
        assert VideoDecoder(str(mp4)).metadata.num_frames == 8  # the reference frame is not in the clip
        wave = AudioDecoder(str(mp4)).get_all_samples().data[0]
        assert abs(wave.numel() / 16000 - 0.5) < 0.05
        spec = torch.fft.rfft(wave).abs()
        assert abs(float(torch.fft.rfftfreq(wave.numel(), 1 / 16000)[spec.argmax()]) - tone) < 0.01 * tone
    # The original (ComfyUI) layout, the audio injector under its official names; and the diffusers
    # layout beside it, as diffusers' Wan converter knows no audio injector.
    with safe_open(root / "run_a" / "wan_lora.safetensors", "pt") as f:
        assert "diffusion_model.audio_injector.injector.0.q.lora_down.weight" in f.keys()
    assert (root / "run_a" / "pytorch_lora_weights.safetensors").is_file()
    assert "wan_lora.safetensors is for ComfyUI; diffusers cannot read it (its converter has no key for " \
           "audio_injector." in out


def test_zero_audio_and_a_separate_audio_folder(s2v, capsys):
    """auto_split = false reads the WAVs extract-audio wrote, matched by stem; the silent video has
    none and, with allow_zero_audio, trains on zero features instead of being skipped."""
    root, model = s2v
    assert extract_audio(["--input-dir", str(root / "videos"), "--output-dir", str(root / "wav")]) == 0
    dataset = f'[dataset.audio]\nauto_split = false\npath = "{root / "wav"}"\nallow_zero_audio = true\n'
    cfg = config(root, model, "run_b", dataset)
    assert train([str(cfg), "--set", "train.max_train_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "5 used, 0 skipped" in out and "64x64@9 x5" in out
    zero = [a for f in (root / "cache" / "audio").rglob("*.safetensors") for a in [load_file(f)["audio"]]
            if a.abs().sum() == 0]
    assert len(zero) == 1 and zero[0].shape == (8, 25, 12)
