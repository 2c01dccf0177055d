"""Target sizes (pixel_area / pixel, multiples of 16) and clip frame counts (4k+1)."""
import pytest

from vidtune.config import DatasetConfig
from vidtune.data.buckets import Bucket, bucket_for, clip_frames, target_size


@pytest.mark.parametrize("w, h", [(1920, 1080), (1080, 1920), (640, 480), (512, 512), (333, 1001)])
def test_pixel_area_keeps_area_and_aspect(w, h):
    tw, th = target_size(w, h, 480, "pixel_area")
    assert tw % 16 == 0 and th % 16 == 0
    assert abs(tw * th - 480 * 480) / (480 * 480) < 0.12
    assert abs(tw / th - w / h) / (w / h) < 0.08


def test_pixel_area_examples():
    assert target_size(1920, 1080, 480) == (640, 352)
    assert target_size(512, 512, 480) == (480, 480)
    # Same rounded aspect -> same bucket size, whatever the source resolution.
    assert target_size(1280, 720, 480) == target_size(854, 480, 480)


def test_pixel_short_edge():
    assert target_size(1920, 1080, 480, "pixel") == (848, 480)
    assert target_size(1080, 1920, 480, "pixel") == (480, 864)  # aspect rounded to 0.56 first


def ds(**kw):
    return DatasetConfig(id="d", path="p", **kw)


def test_clip_frames_aspect_ratio():
    d = ds(num_frames=17, min_frames=9)
    assert clip_frames(40, d) == (17, "")
    assert clip_frames(12, d) == (9, "")  # shorter than num_frames: its own 4k+1 count
    frames, reason = clip_frames(8, d)
    assert frames is None and reason.startswith("too short")
    assert clip_frames(100, ds(num_frames=17, max_frames=50))[1].startswith("too long")
    assert clip_frames(100, ds(num_frames=17, type="image")) == (1, "")


def test_clip_frames_resolution_frames_interval():
    d = ds(num_frames=49, min_frames=17, frame_interval=16, bucket_strategy="resolution_frames")
    assert clip_frames(40, d) == (33, "")
    assert clip_frames(100, d) == (49, "")
    assert clip_frames(20, d) == (17, "")


def test_bucket_names():
    b, _ = bucket_for(1920, 1080, 100, ds(num_frames=33))
    assert b == Bucket(640, 352, 33)
    assert b.name("resolution_frames") == "640x352@33"
    assert b.name("aspect_ratio") == "1.82"
