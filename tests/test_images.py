"""Grids (caption layout and size) and image folders."""

import numpy as np
import pytest
import torch

from diffalign.images import ELLIPSIS, LINE_HEIGHT, _width, caption_lines, make_grid, remove_stale_images, save_images


def _blank_runs(strip: np.ndarray) -> list[int]:
    """Widths of the ink-free column runs between the first and the last inked column of a grey-level strip."""
    ink = (strip < 160).any(axis=0)
    columns = np.flatnonzero(ink)
    runs, run = [], 0
    for inked in ink[columns[0] : columns[-1] + 1]:
        if inked and run:
            runs.append(run)
        run = 0 if inked else run + 1
    return runs


@pytest.mark.parametrize("caption", ["NO a square", "OK two red circles", "NO a photo of a blue cat"])
def test_caption_words_are_visibly_apart(caption):
    """Every gap between words is wider than every gap between letters (the font's own 2-px space read as none:
    "NOa square")."""
    grid = np.asarray(make_grid(torch.ones(1, 3, 32, 32), captions=[caption]).convert("L"))
    strip = grid[4 + 128 :, 4 : 4 + 128]  # the caption under the (upscaled to 128 px) tile
    wide = [r for r in _blank_runs(strip) if r >= 4]
    assert len(wide) == len(caption.split()) - 1


def test_captions_wrap_to_the_tile_and_keep_every_word():
    text = "a photo of two red circles left of three blue squares above a green triangle"
    lines = caption_lines(text, 128, max_lines=4)
    assert len(lines) > 1 and all(_width(line) <= 128 for line in lines)
    assert " ".join(" ".join(line) for line in lines) == text
    assert caption_lines("", 128, 4) == [[]]


def test_long_captions_are_cut_with_an_ellipsis_and_the_grid_height_is_bounded():
    text = " ".join(["a photo of a very long prompt"] * 200) + " " + "x" * 400  # and one word wider than a tile
    lines = caption_lines(text, 96, max_lines=3)
    assert len(lines) == 3 and lines[-1][-1].endswith(ELLIPSIS) and all(_width(line) <= 96 for line in lines)
    word = caption_lines("y" * 400, 96, max_lines=50)
    assert len(word) > 1 and "".join(piece for line in word for piece in line) == "y" * 400
    assert all(_width(line) <= 96 for line in word)
    images = torch.ones(4, 3, 32, 32)
    grid = make_grid(images, captions=[text, "short", text, "short"], ncols=2)
    assert grid.size[1] == 2 * (128 + 4 * LINE_HEIGHT + 4 + 4) + 4  # two rows of tiles with at most 4 caption lines


def test_remove_stale_images_keeps_the_new_ones_and_other_files(tmp_path):
    save_images(torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), tmp_path)
    (tmp_path / "grid.png").write_bytes(b"")
    (tmp_path / "my_photo.png").write_bytes(b"")
    assert remove_stale_images(tmp_path, 2) == ["00002.png", "00003.png", "00004.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "grid.png", "my_photo.png"]
    assert remove_stale_images(tmp_path, 2) == []
