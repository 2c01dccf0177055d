"""S2V audio: decode + resample + downmix, the frame alignment of wav2vec2 features, the
transformers 5.x hidden-state pitfall, and ``vidtune extract-audio``."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidtune.cli.extract_audio import main as extract_audio
from vidtune.data.audio import (NoAudio, decode_audio, frame_features, strip_audio, wav2vec2_hidden_states)
from vidtune.data.video import probe_video
from vidtune.testing import build_tiny_wav2vec2, make_test_clip_with_audio, make_test_video


def peak_frequencies(wave: torch.Tensor, rate: int, n: int) -> list[float]:
    """The n strongest FFT peaks (Hann window), at least 50 Hz apart."""
    spec = torch.fft.rfft(wave * torch.hann_window(wave.numel())).abs()
    freqs = torch.fft.rfftfreq(wave.numel(), 1 / rate)
    found = []
    for i in spec.argsort(descending=True).tolist():
        if all(abs(freqs[i] - f) > 50 for f in found):
            found.append(float(freqs[i]))
        if len(found) == n:
            return found
    return found


def _external_tone_clips():
    """VIDTUNE_TONE_CLIP="clip.mp4=440.0[,other.mkv=1000]": clips with a known tone, checked too."""
    spec = os.environ.get("VIDTUNE_TONE_CLIP", "")
    return [(Path(p), (float(f),)) for p, f in (item.rsplit("=", 1) for item in spec.split(",") if item)]


TONES = [("mono44k", (440.0,), 44100), ("stereo48k", (311.0, 1234.5), 48000), ("mono22k", (3001.0,), 22050)]


@pytest.mark.parametrize("name,tones,rate", TONES, ids=[t[0] for t in TONES])
def test_extract_audio_keeps_the_tone(tmp_path, name, tones, rate):
    make_test_clip_with_audio(tmp_path / "in" / f"{name}.mp4", frames=24, tones=tones, sample_rate=rate)
    assert extract_audio(["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]) == 0
    check_wav_tone(tmp_path / "out" / f"{name}.wav", tones)


@pytest.mark.skipif(not _external_tone_clips(), reason="set VIDTUNE_TONE_CLIP=clip=freq to check another clip")
@pytest.mark.parametrize("clip,tones", _external_tone_clips())
def test_external_tone_clip(tmp_path, clip, tones):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / clip.name).symlink_to(clip.resolve())
    assert extract_audio(["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]) == 0
    check_wav_tone((tmp_path / "out" / clip.name).with_suffix(".wav"), tones)


def check_wav_tone(wav: Path, tones):
    from torchcodec.decoders import AudioDecoder

    dec = AudioDecoder(str(wav))
    assert (dec.metadata.sample_rate, dec.metadata.num_channels) == (16000, 1)
    wave = dec.get_all_samples().data[0]
    assert wave.abs().max() > 0.05
    found = sorted(peak_frequencies(wave, 16000, len(tones)))
    for got, want in zip(found, sorted(tones)):
        assert abs(got - want) <= 0.01 * want, (found, tones)


def test_extract_audio_skips_silent_videos_and_strips_atomically(tmp_path, capsys):
    src = tmp_path / "in"
    make_test_clip_with_audio(src / "talk.mp4", frames=16)
    make_test_clip_with_audio(src / "sub" / "more.mkv", frames=16, tones=(880.0, 660.0))
    make_test_video(src / "mute.mp4", frames=16)
    assert extract_audio(["--input-dir", str(src), "--output-dir", str(tmp_path / "wav"), "--strip-audio"]) == 0
    out = capsys.readouterr().out
    assert "3 video(s), 2 WAV file(s)" in out and "1 without audio skipped: mute.mp4" in out
    assert sorted(p.relative_to(tmp_path / "wav").as_posix() for p in (tmp_path / "wav").rglob("*.wav")) == [
        "sub/more.wav", "talk.wav"]
    for video in (src / "talk.mp4", src / "sub" / "more.mkv"):
        with pytest.raises(NoAudio):
            decode_audio(video)
        assert probe_video(video).frames(16) == 16  # the picture is untouched
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(RuntimeError, match="could not remove the audio"):
        strip_audio(bad)
    assert bad.read_bytes() == b"not a video at all" and sorted(tmp_path.glob("*broken*")) == [bad]


def official_frame_features(hidden: np.ndarray, num_frames: int, fps: int) -> np.ndarray:
    """The official pipeline's steps (linear_interpolation, get_audio_embed_bucket_fps with m = 0)
    restated with numpy, frames from 0: the spec the implementation is checked against."""
    feat = F.interpolate(torch.from_numpy(hidden).transpose(1, 2), size=int(hidden.shape[1] / 50.0 * 30),
                         align_corners=True, mode="linear").transpose(1, 2).numpy()
    t30 = feat.shape[1]
    times = np.linspace(0, num_frames / fps, num_frames, endpoint=False)
    idx = np.round(times * 30).astype(int)
    return np.stack([feat[:, i] if i < t30 else np.zeros(feat[:, 0].shape, feat.dtype) for i in idx])


@pytest.mark.parametrize("t50,start,frames", [(101, 0, 40), (37, 0, 33), (250, 5, 21)])
def test_frame_alignment_matches_the_official_pipeline(t50, start, frames):
    hidden = torch.randn(3, t50, 4)
    got = frame_features(hidden, start, frames, 16)
    want = official_frame_features(hidden.numpy(), start + frames, 16)[start:]
    assert got.shape == (frames, 3, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    t30 = int(t50 / 50 * 30)
    past = [k for k in range(frames) if round((start + k) / 16 * 30) >= t30]
    assert all(got[k].abs().sum() == 0 for k in past) and (not past or past[0] > 0 or start > 0)


def test_one_feature_frame_per_video_frame_not_per_latent():
    """16 fps frames step through the 30 Hz features ~1.875 at a time: 4 video frames (one latent)
    span 4 distinct features, where interpolating straight to latents would give one."""
    hidden = torch.arange(100.0).view(1, 100, 1).expand(2, 100, 3).contiguous()
    feats = frame_features(hidden, 0, 8, 16)[:, 0, 0]
    assert (feats.diff() > 0).all()
    # frame k shows time k / 16 s; the ramp rises 99 over the 2 s of audio
    assert all(abs(float(feats[k]) - k / 16 * 99 / 2) < 1.5 for k in range(8))


def test_wav2vec2_last_hidden_state_is_after_the_final_layer_norm():
    """transformers 5.x puts the pre-norm state last in hidden_states; we take last_hidden_state."""
    model, fe = build_tiny_wav2vec2()
    wave = torch.randn(8000)
    with torch.no_grad():
        hs = wav2vec2_hidden_states(model, fe, wave)
        values = torch.from_numpy(fe(wave.numpy(), sampling_rate=16000).input_values[0])[None]
        raw = model.wav2vec2(values, output_hidden_states=True)
    assert hs.shape[0] == model.config.num_hidden_layers + 1 == len(raw.hidden_states)
    torch.testing.assert_close(hs[-1], raw.last_hidden_state[0])
    torch.testing.assert_close(hs[:-1], torch.cat(raw.hidden_states[:-1]))
    assert not torch.allclose(hs[-1], raw.hidden_states[-1][0])
    torch.testing.assert_close(hs[-1], model.wav2vec2.encoder.layer_norm(raw.hidden_states[-1][0]))


def test_the_base_xlsr_model_is_refused(tmp_path):
    """Wan S2V was trained on the English CTC fine-tune: a checkpoint of another architecture (the
    base wav2vec2-large-xlsr-53 is Wav2Vec2ForPreTraining) is an error naming the fix."""
    from vidtune.config import ModelConfig
    from vidtune.data import Encoders

    import json

    model, fe = build_tiny_wav2vec2()
    model.save_pretrained(tmp_path / "audio_encoder")
    fe.save_pretrained(tmp_path / "audio_processor")
    cfg = tmp_path / "audio_encoder" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "architectures": ["Wav2Vec2ForPreTraining"]}))
    enc = Encoders(ModelConfig(family="wan_s2v", flavour="s2v-14b-2.2", audio_encoder_path=str(tmp_path)))
    with pytest.raises(ValueError, match="not Wav2Vec2ForCTC.*English CTC fine-tune"):
        enc.encode_audio(torch.zeros(16000))


def test_vidtune_dispatcher_runs_extract_audio(tmp_path, capsys):
    from vidtune.cli import main

    make_test_clip_with_audio(tmp_path / "in" / "a.mp4", frames=8)
    assert main(["extract-audio", "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "a.wav").is_file() and "1 WAV file(s)" in capsys.readouterr().out
    assert main(["extract-audio", "--input-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path)]) == 2
