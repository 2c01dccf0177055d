"""Wan S2V sample planning: audio source, skips, the training window (truncation_mode, motion,
duration buckets)."""
import dataclasses

import pytest

from vidtune.config import AudioConfig, DatasetConfig
from vidtune.data import SkipLog, discover_dataset
from vidtune.data.cache import SourceIndex
from vidtune.data.s2v import ZERO_AUDIO, plan, window_start
from vidtune.testing import make_test_clip_with_audio, make_test_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v_plan")
    make_test_clip_with_audio(root / "v" / "talk.mp4", 64, 64, frames=100, tones=(440.0,))
    make_test_clip_with_audio(root / "v" / "sub" / "brief.mp4", 32, 32, frames=30, tones=(440.0,), audio_seconds=0.5)
    make_test_video(root / "v" / "mute.mp4", 32, 32, frames=30)
    for p in (root / "v").rglob("*.mp4"):
        p.with_suffix(".txt").write_text("a cat")
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "sub" / "brief.flac").write_bytes((root / "v" / "sub" / "brief.mp4").read_bytes())  # any container
    (root / "a" / "talk.wav").write_bytes((root / "v" / "talk.mp4").read_bytes())
    return root


def planned(root, tmp_path, resolution=32, **audio):
    ds = DatasetConfig(id="d", path=str(root / "v"), resolution=resolution, num_frames=17,
                       audio=AudioConfig(**audio))
    skips, index = SkipLog(), SourceIndex(tmp_path / "idx.json")
    items = plan(discover_dataset(ds, 16, skips, index), ds, 16, skips, index)
    return {i.path.stem: i for i in items}, skips


def test_own_track_skips_silent_videos_unless_zero_audio(clips, tmp_path):
    items, skips = planned(clips, tmp_path)
    assert sorted(items) == ["brief", "talk"]
    assert [(p.name, r.split(":")[0]) for _, p, r in skips.entries] == [("mute.mp4", "no audio")]
    assert items["talk"].audio == str(clips / "v" / "talk.mp4")
    items, skips = planned(clips, tmp_path, allow_zero_audio=True)
    assert items["mute"].audio == ZERO_AUDIO and not skips.entries


def test_separate_folder_matched_by_stem_and_max_duration(clips, tmp_path):
    items, skips = planned(clips, tmp_path, auto_split=False, path=str(clips / "a"), max_duration_seconds=1.0)
    assert items["brief"].audio == str(clips / "a" / "sub" / "brief.flac")  # same subfolder first
    reasons = sorted((p.name, r.split(":")[0]) for _, p, r in skips.entries)
    assert reasons == [("mute.mp4", "no audio"), ("talk.mp4", "audio too long")]


def test_windows_first_end_random_and_continuation(clips, tmp_path):
    items, _ = planned(clips, tmp_path)
    talk = items["talk"]  # 100 frames at 16 fps, clip 17: a first window from frame 0
    assert (talk.start, talk.lead, talk.bucket.frames) == (0, 1, 17)
    items, _ = planned(clips, tmp_path, truncation_mode="end")
    assert items["talk"].start == 100 - 17 and items["brief"].start == 30 - 17
    a, _ = planned(clips, tmp_path, truncation_mode="random")
    b, _ = planned(clips, tmp_path, truncation_mode="random")
    assert a["talk"].start == b["talk"].start and 0 <= a["talk"].start <= 83
    assert {window_start(100, 17, "random", str(s)) for s in range(20)} != {a["talk"].start}
    assert planned(clips, tmp_path, motion="auto")[0]["talk"].lead == 1  # 32 pixels: too small to pack motion
    items, _ = planned(clips, tmp_path, resolution=64, motion="auto")
    # 100 >= 16 + 73 frames and 64 pixels a side: a continuation window; brief is too short for one.
    assert (items["talk"].lead, items["talk"].bucket.frames) == (73, 16 + 73)
    assert (items["brief"].lead, items["brief"].bucket.frames) == (1, 17)


def test_duration_interval_buckets_clip_lengths(clips, tmp_path):
    ds = DatasetConfig(id="d", path=str(clips / "v"), resolution=32, num_frames=81, min_frames=9,
                       bucket_strategy="resolution_frames", audio=AudioConfig(duration_interval=0.5))
    skips, index = SkipLog(), SourceIndex(None)
    found = discover_dataset(ds, 16, skips, index)
    items = {i.path.stem: i for i in plan(found, ds, 16, skips, index)}
    # brief: 30 frames -> clip 29 -> steps of 0.5 s x 16 fps = 8 frames -> 25; talk: 81 -> 81
    assert (items["brief"].bucket.frames, items["talk"].bucket.frames) == (25, 81)
    ds = dataclasses.replace(ds, audio=AudioConfig(duration_interval=0))
    items = {i.path.stem: i for i in plan(found, ds, 16, skips, index)}
    assert items["brief"].bucket.frames == 29


def test_s2v_dataset_settings_are_checked():
    from vidtune.config import ConfigError, config_from_dict

    def load(**dataset):
        return config_from_dict({"model": {"family": "wan_s2v", "flavour": "s2v-14b-2.2"},
                                 "dataset": [{"id": "d", "path": "x", **dataset}]})

    with pytest.raises(ConfigError) as e:
        load(type="image", audio={"sample_rate": 44100, "auto_split": False})
    msg = str(e.value)
    assert "not images" in msg and "sample_rate = 16000" in msg and "audio.path" in msg
    with pytest.raises(ConfigError, match="at least 4 more"):
        load(num_frames=1)
    assert load(num_frames=9).dataset[0].audio.auto_split
