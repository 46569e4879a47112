"""Image I/O at the reward boundary: float ``(B, 3, H, W)`` tensors in [0, 1] <-> PIL images and PNG grids."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

log = logging.getLogger("diffalign")

CAPTION_FONT = ImageFont.load_default()  # Pillow's built-in font (10 px); no font file needed
WORD_GAP = 4  # pixels between words: the font's own space is 2 px and reads as none ("NOa square")
LINE_HEIGHT = 12
ELLIPSIS = "\u2026"
IMAGE_NAME = re.compile(r"^(\d{5})\.png$")  # what save_images writes


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` float in [0, 1] -> list of RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def from_pil(images: Sequence[Image.Image]) -> Tensor:
    """List of PIL images of one size -> ``(B, 3, H, W)`` float32 in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _atomic_save(image: Image.Image, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


def make_grid(
    images: Tensor,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    min_tile: int = 128,
    caption_colors: Sequence[tuple[int, int, int]] | None = None,
    max_caption_lines: int = 4,
) -> Image.Image:
    """Tile images into one picture, small images upscaled (nearest) to at least ``min_tile`` px, with an optional
    caption under each tile, wrapped to the tile's width and cut after ``max_caption_lines`` lines (ending in an
    ellipsis), so the grid's height never depends on how long a prompt is."""
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("no images to put in a grid")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"{len(captions)} captions for {len(tiles)} images")
    scale = max(1, math.ceil(min_tile / max(tiles[0].size)))
    w, h = tiles[0].size[0] * scale, tiles[0].size[1] * scale
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    wrapped = [caption_lines(c, w, max_caption_lines) for c in captions] if captions else None
    caption_h = 0 if wrapped is None else LINE_HEIGHT * max(len(lines) for lines in wrapped) + 4
    grid = Image.new("RGB", (ncols * (w + 4) + 4, nrows * (h + caption_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x0, y0 = 4 + c * (w + 4), 4 + r * (h + caption_h + 4)
        grid.paste(tile.resize((w, h), Image.NEAREST), (x0, y0))
        if wrapped is not None:
            color = caption_colors[i] if caption_colors is not None else (0, 0, 0)
            for k, line in enumerate(wrapped[i]):
                x = x0
                for word in line:
                    draw.text((x, y0 + h + 2 + LINE_HEIGHT * k), word, fill=color, font=CAPTION_FONT)
                    x += CAPTION_FONT.getlength(word) + WORD_GAP
    return grid


def _width(words: Sequence[str]) -> float:
    """Drawn width in pixels of ``words`` on one line (``WORD_GAP`` between them)."""
    return sum(CAPTION_FONT.getlength(w) for w in words) + WORD_GAP * max(len(words) - 1, 0)


def _break_word(word: str, width: int) -> list[str]:
    """``word`` cut into pieces of at most ``width`` pixels (at least one character each)."""
    pieces = []
    while len(word) > 1 and _width([word]) > width:
        cut = 1
        while cut < len(word) - 1 and _width([word[: cut + 1]]) <= width:
            cut += 1
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word]


def caption_lines(text: str, width: int, max_lines: int) -> list[list[str]]:
    """``text`` laid out as at most ``max_lines`` lines of words, each at most ``width`` pixels wide; a word too wide
    for a line is broken, and text that does not fit ends with an ellipsis. Always at least one (maybe empty) line."""
    words = [piece for word in text.split() for piece in _break_word(word, width)]
    lines: list[list[str]] = [[]]
    for word in words:
        if lines[-1] and _width([*lines[-1], word]) > width:
            lines.append([])
        lines[-1].append(word)
    if len(lines) <= max_lines:
        return lines
    lines = lines[:max_lines]
    last = lines[-1]
    while last and _width([*last[:-1], last[-1] + ELLIPSIS]) > width:
        last.pop()
    if last:
        last[-1] += ELLIPSIS
    else:
        last.append(ELLIPSIS)
    return lines


def save_grid(images: Tensor, path: str | os.PathLike, **kwargs) -> None:
    """``make_grid`` written to ``path`` atomically."""
    _atomic_save(make_grid(images, **kwargs), path)


def remove_stale_images(directory: str | os.PathLike, count: int) -> list[str]:
    """Delete the numbered images (``NNNNN.png``, as :func:`save_images` names them) from index ``count`` on, left
    in ``directory`` by an earlier run with more images, so that the folder matches its new ``index.jsonl``; logs
    and returns the deleted names."""
    directory = os.fspath(directory)
    stale = sorted(f for f in os.listdir(directory) if (m := IMAGE_NAME.match(f)) and int(m.group(1)) >= count)
    for name in stale:
        os.remove(os.path.join(directory, name))
    if stale:
        log.info("removed %d image(s) left in %s by an earlier run (%s to %s)", len(stale), directory, stale[0],
                 stale[-1])  # fmt: skip
    return stale


def save_images(images: Tensor, directory: str | os.PathLike, start: int = 0) -> list[str]:
    """Write each image as ``directory/{index:05d}.png``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, image in enumerate(to_pil(images)):
        path = os.path.join(directory, f"{start + k:05d}.png")
        _atomic_save(image, path)
        paths.append(path)
    return paths
