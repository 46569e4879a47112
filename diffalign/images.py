"""Image I/O at the reward boundary: float ``(B, 3, H, W)`` tensors in [0, 1] <-> PIL images and PNG grids."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


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
) -> Image.Image:
    """Tile images into one picture, small images upscaled (nearest) to at least ``min_tile`` px, with an optional
    caption (wrapped) under each tile."""
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("no images to put in a grid")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"{len(captions)} captions for {len(tiles)} images")
    scale = max(1, math.ceil(min_tile / max(tiles[0].size)))
    w, h = tiles[0].size[0] * scale, tiles[0].size[1] * scale
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    font = ImageFont.load_default()
    chars_per_line = max(8, w // 6)
    wrapped = [_wrap(c, chars_per_line) for c in captions] if captions else None
    caption_h = 0 if wrapped is None else 12 * max(len(lines) for lines in wrapped) + 4
    grid = Image.new("RGB", (ncols * (w + 4) + 4, nrows * (h + caption_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x0, y0 = 4 + c * (w + 4), 4 + r * (h + caption_h + 4)
        grid.paste(tile.resize((w, h), Image.NEAREST), (x0, y0))
        if wrapped is not None:
            color = caption_colors[i] if caption_colors is not None else (0, 0, 0)
            for k, line in enumerate(wrapped[i]):
                draw.text((x0, y0 + h + 2 + 12 * k), line, fill=color, font=font)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current] if current else lines or [""]


def save_grid(images: Tensor, path: str | os.PathLike, **kwargs) -> None:
    """``make_grid`` written to ``path`` atomically."""
    _atomic_save(make_grid(images, **kwargs), path)


def save_images(images: Tensor, directory: str | os.PathLike, start: int = 0) -> list[str]:
    """Write each image as ``directory/{index:05d}.png``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, image in enumerate(to_pil(images)):
        path = os.path.join(directory, f"{start + k:05d}.png")
        _atomic_save(image, path)
        paths.append(path)
    return paths
