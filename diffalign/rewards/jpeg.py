"""Rule-based rewards from the JPEG-encoded file size (DDPO; Black et al. 2023, arXiv 2305.13301, section 6.1).

An image is quantised to 8 bits (``round(255 x)``), encoded as JPEG at quality 95 with PIL, and the size of the
encoding in kilobytes (1 kB = 1000 bytes) is the raw measurement, exactly as ``ddpo-pytorch``'s
``jpeg_incompressibility``. ``jpeg_incompressibility`` returns the size (higher = more detail), and
``jpeg_compressibility`` its negative (higher = simpler, smoother images). Not differentiable.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.rewards.base import Reward


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` float32 JPEG sizes in kB (8-bit quantisation, PIL encoder)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegIncompressibilityReward(Reward):
    """JPEG size in kB at ``quality`` (DDPO's incompressibility reward); larger = harder to compress.

    Args:
        quality: JPEG quality passed to PIL (DDPO: 95).
    """

    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        return jpeg_sizes_kb(images, self.quality)


class JpegCompressibilityReward(JpegIncompressibilityReward):
    """Negative JPEG size in kB at ``quality`` (DDPO's compressibility reward); larger = easier to compress."""

    name = "jpeg_compressibility"

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        return -jpeg_sizes_kb(images, self.quality)
