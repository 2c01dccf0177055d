"""Contact sheets a user can read: a title (prompt, step), evenly spaced frames with their frame
numbers, and for a validation step one sheet that puts every prompt's row side by side.

Frames narrower than ``MIN_TILE`` pixels are enlarged (nearest neighbour) so the labels fit.
Text uses Pillow's default font; glyphs it lacks (CJK) show as boxes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_TILE = 128  # px: a tile's smallest width, so "frame 80" fits under it
PAD = 4
FONT_SIZE = 12
INK, PAPER = (20, 20, 20), (255, 255, 255)


def frame_indices(frames: int, max_frames: int = 8) -> list[int]:
    """Up to ``max_frames`` evenly spaced frame numbers, first and last included."""
    n = min(frames, max_frames)
    return sorted({round(i * (frames - 1) / max(n - 1, 1)) for i in range(n)})


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Lines of at most ``width`` pixels, broken at the last space when there is one."""
    lines, line = [], ""
    for ch in text:
        if font.getlength(line + ch) <= width or not line:
            line += ch
            continue
        cut = line.rfind(" ")
        if cut > 0:
            lines.append(line[:cut])
            line = line[cut + 1:] + ch
        else:
            lines.append(line)
            line = ch
    return lines + ([line] if line else [])


def _text(lines: Sequence[str], width: int, font):
    """A white band with ``lines`` wrapped to ``width`` pixels."""
    from PIL import Image, ImageDraw

    wrapped = [w for line in lines for w in _wrap(line, font, width - 2 * PAD)]
    step = FONT_SIZE + 4
    band = Image.new("RGB", (width, len(wrapped) * step + 2 * PAD), PAPER)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(wrapped):
        draw.text((PAD, PAD + i * step), line, fill=INK, font=font)
    return band


def _tile(frame: torch.Tensor, font, caption: str):
    """One frame (3, H, W uint8), enlarged to ``MIN_TILE`` wide if smaller, over its caption."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame.permute(1, 2, 0).cpu().numpy())
    if img.width < MIN_TILE:
        k = -(-MIN_TILE // img.width)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    out = Image.new("RGB", (img.width, img.height + FONT_SIZE + 2 * PAD), PAPER)
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).text((PAD, img.height + PAD // 2), caption, fill=INK, font=font)
    return out


def _stack(parts, width: int):
    from PIL import Image

    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), PAPER)
    y = 0
    for p in parts:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet


def _grid(tiles, columns: int):
    from PIL import Image

    tw, th = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * (tw + PAD) + PAD, rows * (th + PAD)), PAPER)
    for k, t in enumerate(tiles):
        grid.paste(t, (PAD + (k % columns) * (tw + PAD), (k // columns) * (th + PAD)))
    return grid


def contact_sheet(frames: torch.Tensor, title: Sequence[str] = (), max_frames: int = 8, columns: int = 4):
    """A PIL image: ``title`` lines, then up to ``max_frames`` evenly spaced frames of (F, 3, H, W)
    uint8 ``frames``, ``columns`` per row, each captioned with its frame number."""
    font = _font()
    idx = frame_indices(frames.shape[0], max_frames)
    grid = _grid([_tile(frames[i], font, f"frame {i}") for i in idx], min(columns, len(idx)))
    return _stack(([_text(title, grid.width, font)] if title else []) + [grid], grid.width)


def comparison_sheet(videos: Sequence[tuple[str, torch.Tensor]], numbers: Sequence[int], title: Sequence[str] = ()):
    """A PIL image comparing videos frame by frame: ``title``, then per video (label, (N, 3, H, W)
    uint8, the frames numbered ``numbers``) a labelled row of them."""
    font = _font()
    rows = [(label, _grid([_tile(f, font, f"frame {i}") for i, f in zip(numbers, v)], len(numbers)))
            for label, v in videos]
    width = max(g.width for _, g in rows)
    parts = [_text(title, width, font)] if title else []
    for label, grid in rows:
        parts += [_text([label], width, font), grid]
    return _stack(parts, width)
