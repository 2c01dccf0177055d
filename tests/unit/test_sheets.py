"""Contact sheets: the right frames in the right tiles, enlarged when small, numbered, titled; a
validation step's comparison sheet has one labelled row per video."""
import numpy as np
import torch

from vidtune.sample.sheets import MIN_TILE, PAD, comparison_sheet, contact_sheet, frame_indices


def frames(n=9, h=32, w=48, offset=0):
    """Frame i is a flat colour (20 * i + offset, 100, 200 - 10 * i)."""
    out = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    for i in range(n):
        out[i, 0], out[i, 1], out[i, 2] = 20 * i + offset, 100, 200 - 10 * i
    return out


def colour(im, x, y):
    return im.getpixel((x, y))


def has_ink(im, box):
    return bool((np.asarray(im.crop(box)) < 128).all(axis=-1).any())  # a dark (text) pixel


def test_frame_indices():
    assert frame_indices(9) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert frame_indices(81)[0] == 0 and frame_indices(81)[-1] == 80 and len(frame_indices(81)) == 8
    assert frame_indices(3) == [0, 1, 2]


def test_contact_sheet_tiles_captions_and_title():
    video = frames()
    im = contact_sheet(video, ["cat: a red cat", "step 100"])
    k = -(-MIN_TILE // 48)  # enlarged x3, nearest neighbour
    tw, th = 48 * k, 32 * k + 12 + 2 * PAD
    title_h = im.height - 2 * (th + PAD)
    assert im.width == 4 * (tw + PAD) + PAD and title_h > 24
    assert has_ink(im, (0, 0, im.width, title_h))  # the title is written
    for slot, i in enumerate(frame_indices(9)):
        x, y = PAD + (slot % 4) * (tw + PAD), title_h + (slot // 4) * (th + PAD)
        assert colour(im, x + tw // 2, y + 16) == (20 * i, 100, 200 - 10 * i)  # frame i, in order
        assert has_ink(im, (x, y + 32 * k, x + tw, y + th))  # its "frame i" caption


def test_comparison_sheet_rows():
    numbers = frame_indices(9)
    videos = [("cat", frames()[numbers]), ("cat (EMA weights)", frames(offset=5)[numbers])]
    sheet = comparison_sheet(videos, numbers, ["validation at step 4"])
    tile_h = 32 * 3 + 12 + 2 * PAD
    assert sheet.width == 8 * (48 * 3 + PAD) + PAD and has_ink(sheet, (0, 0, sheet.width, 20))
    # the last row is the EMA video; its last tile frame 8
    assert colour(sheet, sheet.width - PAD - 10, sheet.height - PAD - tile_h + 5) == (20 * 8 + 5, 100, 120)
    assert not has_ink(contact_sheet(frames(), ()), (0, 0, 100, 2))  # no title: the frames start at the top
