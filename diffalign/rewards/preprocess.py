"""Differentiable re-implementations of the image preprocessing of the upstream reward models.

Every CLIP-family reward (PickScore, HPSv2, ImageReward's BLIP, the LAION aesthetic predictor, CLIP score) feeds
its network ``Resize(shortest side -> S, bicubic) -> CenterCrop(C) -> Normalize(mean, std)`` of an RGB image. The
upstream code does this with PIL on uint8 images (torchvision ``Resize`` on a PIL image, or the transformers
``CLIPImageProcessor``); here the same geometry runs as torch ops on float ``(B, 3, H, W)`` tensors in [0, 1] so
that gradients reach the images:

* the output size of the resize is computed exactly as upstream (``new_long = int(S * long / short)``; torchvision
  skips the resize when the short side already equals ``S``);
* bicubic (Keys ``a = -0.5``, PIL's kernel) with antialiasing, i.e. ``F.interpolate(..., antialias=True)``, which
  widens the kernel when downsampling exactly as PIL does; the result is clamped to [0, 1] as PIL's uint8 output
  is;
* the crop offset is ``round((H - C) / 2)`` (torchvision ``CenterCrop``: OpenAI CLIP, open_clip, HPSv2,
  ImageReward) or ``floor((H - C) / 2)`` (transformers ``CLIPImageProcessor``: PickScore, CLIP score).

What differs from upstream: PIL resamples 8-bit images and rounds the result to 8 bits, so the two agree to within
the 8-bit quantisation plus interpolation rounding (the tests pin the tolerance: mean |diff| < 2e-3 and
max |diff| < 0.02 in [0, 1] units before normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: OpenAI CLIP normalisation (also used by open_clip ViT-H-14, PickScore, HPSv2, ImageReward, the aesthetic MLP).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """An upstream eval-time image transform, ``Resize -> CenterCrop -> Normalize``.

    Attributes:
        size: target length of the shortest side after the resize, pixels.
        crop: side of the square center crop, pixels.
        mean, std: per-channel normalisation, applied to [0, 1] values.
        interpolation: ``bicubic`` (every model here) or ``bilinear``.
        crop_rounding: ``round`` (torchvision ``CenterCrop``) or ``floor`` (transformers image processors).
        skip_same_size: skip the resize when the short side already equals ``size`` (torchvision does; PIL's resize
            to the same size is an exact copy too, so this only saves time).
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    crop_rounding: Literal["round", "floor"] = "round"
    skip_same_size: bool = True

    def __post_init__(self) -> None:
        if self.size < 1 or self.crop < 1:
            raise ValueError(f"ImageTransform size and crop must be positive, got size={self.size} crop={self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImageTransform needs 3 means and 3 positive stds, got {self.mean} / {self.std}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"unknown crop_rounding {self.crop_rounding!r}")

    def __call__(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, crop, crop)`` normalised float32 (differentiable)."""
        return normalize(self.resize_crop(images), self.mean, self.std)

    def resize_crop(self, images: Tensor) -> Tensor:
        """The geometric part only: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, crop, crop)`` in [0, 1]."""
        x = resize_shortest(images, self.size, self.interpolation, skip_same_size=self.skip_same_size)
        return center_crop(x, self.crop, self.crop_rounding)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(H', W')`` of resizing the shortest side to ``size`` (torchvision / transformers rule:
    ``new_long = int(size * long / short)``, truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shortest(
    images: Tensor, size: int, interpolation: str = "bicubic", *, antialias: bool = True, skip_same_size: bool = True
) -> Tensor:
    """Resize ``(B, C, H, W)`` so that the shortest side is ``size``; antialiased (PIL-like), clamped to [0, 1]."""
    height, width = images.shape[-2:]
    out_h, out_w = shortest_side_size(height, width, size)
    if skip_same_size and (out_h, out_w) == (height, width):
        return images
    return resize(images, (out_h, out_w), interpolation, antialias=antialias)


def resize(images: Tensor, size: tuple[int, int], interpolation: str = "bicubic", *, antialias: bool = True) -> Tensor:
    """Resize ``(B, C, H, W)`` float images in [0, 1] to ``size = (H', W')``; clamped to [0, 1] like an 8-bit
    PIL resize (bicubic overshoots at edges). Differentiable."""
    x = images.float()
    out = F.interpolate(x, size=tuple(size), mode=interpolation, align_corners=False, antialias=antialias)
    return out.clamp(0.0, 1.0)


def center_crop(images: Tensor, crop: int, rounding: str = "round") -> Tensor:
    """Square center crop of side ``crop`` (zero padding when the image is smaller, as torchvision pads)."""
    height, width = images.shape[-2:]
    if crop > height or crop > width:
        pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = images.shape[-2:]
    if rounding == "round":
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    else:
        top, left = (height - crop) // 2, (width - crop) // 2
    return images[..., top : top + crop, left : left + crop]


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel; ``(B, 3, H, W)``."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s
