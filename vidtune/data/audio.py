"""Speech-to-video audio: decoding (torchcodec), wav2vec2 features, and their alignment to frames.

What Wan S2V sees of a clip's audio, as the official pipeline makes it (``wan/modules/s2v/
audio_encoder.py``; ``../shared/reference/wan_s2v/README.md``):

1. the audio decoded at 16 kHz, every channel averaged to mono;
2. ``Wav2Vec2ForCTC`` (XLS-R-53 fine-tuned on English) on the whole track, normalised by its
   feature extractor (zero mean, unit variance), keeping all 25 hidden states at ~50 Hz;
3. linear interpolation of those to 30 Hz (``align_corners=True``);
4. for each video frame k at ``fps`` (16), the 30 Hz feature at ``round(k / fps * 30)``
   (round half to even, like numpy), zeros past the end of the audio.

The model's causal audio encoder then turns 4 frames into one latent frame. Decoding a video's
own track and reading a separate audio file go through the same function, so both give the same
samples.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg", ".m4a")
WAV2VEC_RATE = 50  # wav2vec2 hidden states per second (20 ms hop)
FEATURE_RATE = 30  # the official pipeline's interpolated rate ("video_rate")
SAMPLE_RATE = 16000  # what wav2vec2 was trained on


class NoAudio(ValueError):
    """A media file without a decodable audio stream."""


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 samples of ``path``'s (best) audio stream at ``sample_rate``: FFmpeg resamples,
    the channels are averaged (an exact downmix; FFmpeg's own mono mix weights them at -3 dB)."""
    from torchcodec.decoders import AudioDecoder

    try:
        dec = AudioDecoder(str(path), sample_rate=sample_rate)
    except (RuntimeError, ValueError) as exc:
        raise NoAudio(f"{Path(path).name}: no audio stream ({str(exc).splitlines()[0]})") from None
    return dec.get_all_samples().data.mean(dim=0)


def audio_duration(path: str | Path) -> float:
    """Seconds of audio in ``path`` (header, else a decode); NoAudio when it has none."""
    from torchcodec.decoders import AudioDecoder

    try:
        md = AudioDecoder(str(path)).metadata
    except (RuntimeError, ValueError) as exc:
        raise NoAudio(f"{Path(path).name}: no audio stream ({str(exc).splitlines()[0]})") from None
    if md.duration_seconds:
        return float(md.duration_seconds)
    return decode_audio(path).numel() / SAMPLE_RATE


def find_audio_file(directory: str | Path, stem: str) -> Path | None:
    """The audio file of ``directory`` whose stem is ``stem`` (first extension of AUDIO_EXTS)."""
    for ext in AUDIO_EXTS:
        for cand in (Path(directory) / f"{stem}{ext}", Path(directory) / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def frame_indices(first_frame: int, num_frames: int, fps: float) -> list[int]:
    """30 Hz feature index of each video frame ``first_frame + k`` (the official get_sample_indices
    with fixed_start=0: time k / fps, rounded half to even)."""
    return [round((first_frame + k) / fps * FEATURE_RATE) for k in range(num_frames)]


def frame_features(hidden: torch.Tensor, first_frame: int, num_frames: int, fps: float) -> torch.Tensor:
    """wav2vec2 hidden states (L, T50, C) of a whole track -> one (L, C) vector per video frame
    ``first_frame .. first_frame + num_frames - 1``: (num_frames, L, C), zeros past the audio's end."""
    layers, t50, dim = hidden.shape
    t30 = int(t50 / float(WAV2VEC_RATE) * FEATURE_RATE)
    feat = F.interpolate(hidden.transpose(1, 2).float(), size=t30, mode="linear", align_corners=True)
    out = feat.new_zeros(num_frames, layers, dim)
    idx = torch.tensor(frame_indices(first_frame, num_frames, fps))
    valid = idx < t30
    out[valid] = feat[:, :, idx[valid]].permute(2, 0, 1)
    return out


def wav2vec2_hidden_states(model, feature_extractor, wave: torch.Tensor) -> torch.Tensor:
    """All hidden states (num_layers + 1, T50, C) of ``Wav2Vec2ForCTC`` for one mono 16 kHz wave.

    transformers 5.x returns the last entry of ``hidden_states`` before the encoder's final layer
    norm (4.x, which the official code pins, after it): the last one is taken from
    ``last_hidden_state`` instead, which is after it in both."""
    inputs = feature_extractor(wave.float().cpu().numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    values = inputs.input_values.to(model.device, model.dtype)
    out = model.wav2vec2(values, output_hidden_states=True)
    return torch.cat([*out.hidden_states[:-1], out.last_hidden_state]).float()


def write_wav(samples: torch.Tensor, path: str | Path, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono float samples as a WAV file, atomically (torchcodec's encoder)."""
    from torchcodec.encoders import AudioEncoder

    from ..fsutil import atomic_path

    with atomic_path(path) as tmp:
        AudioEncoder(samples.reshape(1, -1).float().cpu(), sample_rate=sample_rate).to_file(tmp)
    return Path(path)


def strip_audio(video: str | Path) -> Path:
    """Rewrite ``video`` without its audio streams (stream copy, no re-encode). The new file is
    written beside it and renamed over it only once complete: a failure leaves the original."""
    import shutil
    import subprocess

    from ..fsutil import atomic_path

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("--strip-audio needs the ffmpeg command: sudo apt-get install -y ffmpeg")
    video = Path(video)
    with atomic_path(video) as tmp:
        done = subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(video), "-map", "0", "-map", "-0:a",
                               "-c", "copy", str(tmp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{video.name}: ffmpeg could not remove the audio: {done.stderr.strip()[-300:]}")
    return video
