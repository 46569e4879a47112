"""Synthetic image artifacts: the failure modes of reward hacking, applied to clean images.

Reward-optimised text-to-image models drift into images that score well but look wrong: high-frequency grid /
checkerboard textures, oversaturated high-contrast colour, noise, blotchy colour stains and blur (Hong et al. 2026,
"Understanding Reward Hacking in Text-to-Image Reinforcement Learning", arXiv 2601.03468; section 5.10 of the
reference notes). Their remedy is an artifact reward trained on artifact-free vs artifact-containing images and
added as a regulariser; :mod:`diffalign.rewards.models` trains such a classifier on clean world renders and the
corruptions below.

Every function takes images ``(B, 3, H, W)`` float in [0, 1] and a per-sample ``severity`` ``(B,)`` in [0, 1]
(0 = barely visible, 1 = strong), returns ``(B, 3, H, W)`` in [0, 1], and draws all randomness from the
``torch.Generator`` it is given (on the images' device). Lengths are in pixels at 64 px and scale with the image
height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Artifact kinds, in the order of the integer ids returned by :func:`add_random_artifacts`.
ARTIFACT_KINDS: tuple[str, ...] = ("grid", "oversaturation", "noise", "blotches", "blur")


def _rand(n: int, generator: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.rand((n, *shape), generator=generator, device=device)


def _as_severity(severity: Tensor | float, batch: int, device: torch.device) -> Tensor:
    s = torch.as_tensor(severity, dtype=torch.float32, device=device)
    s = s.expand(batch) if s.ndim == 0 else s
    if s.shape != (batch,):
        raise ValueError(f"severity must be a float or a ({batch},) tensor, got shape {tuple(s.shape)}")
    return s.clamp(0.0, 1.0)


def grid_artifact(images: Tensor, severity: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Add a periodic high-frequency pattern (checkerboard, stripes or a dot lattice; period 2-4 px) in a random
    colour direction, amplitude ``0.05 + 0.15 * severity``: the grid texture of over-optimised diffusion models."""
    b, _, h, w = images.shape
    dev = images.device
    s = _as_severity(severity, b, dev)
    period = 2 + (_rand(b, generator, dev) * 3).floor().clamp(max=2)  # 2, 3 or 4 px
    offset = _rand(b, generator, dev, 2) * period[:, None]
    style = (_rand(b, generator, dev) * 4).floor().clamp(max=3)  # checker, vertical, horizontal, dots
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    p = period.view(b, 1, 1)
    cx = torch.floor((xx + offset[:, 0].view(b, 1, 1)) / p) % 2  # (B, 1, W) in {0, 1}
    cy = torch.floor((yy + offset[:, 1].view(b, 1, 1)) / p) % 2  # (B, H, 1)
    st = style.view(b, 1, 1)
    checker = (cx + cy) % 2
    pattern = torch.where(st == 0, checker, torch.where(st == 1, cx.expand(b, h, w),
                          torch.where(st == 2, cy.expand(b, h, w), cx * cy)))  # fmt: skip
    pattern = 2 * pattern - 1  # +-1
    color = F.normalize(_rand(b, generator, dev, 3) * 2 - 1 + 0.3, dim=1)  # (B, 3), mostly towards brighter
    amp = (0.05 + 0.15 * s).view(b, 1, 1, 1)
    return (images + amp * pattern[:, None] * color[:, :, None, None] * math.sqrt(3)).clamp(0, 1)


def oversaturation_artifact(
    images: Tensor, severity: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Push chroma away from the luminance by ``1.5 + 2.5 * severity`` and contrast by ``1.1 + 0.6 * severity``
    about mid-grey, clipping: the burnt, over-vivid look of aesthetic-reward hacking."""
    b = images.shape[0]
    s = _as_severity(severity, b, images.device).view(b, 1, 1, 1)
    luma = 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]
    sat = luma + (1.5 + 2.5 * s) * (images - luma)
    return (0.5 + (1.1 + 0.6 * s) * (sat - 0.5)).clamp(0, 1)


def noise_artifact(images: Tensor, severity: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Add i.i.d. Gaussian noise of standard deviation ``0.03 + 0.12 * severity`` per pixel and channel."""
    b = images.shape[0]
    s = _as_severity(severity, b, images.device).view(b, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + (0.03 + 0.12 * s) * noise).clamp(0, 1)


def blotch_artifact(images: Tensor, severity: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Blend 2-5 soft Gaussian colour stains (radius 3-9 px, random colours, opacity ``0.35 + 0.55 * severity``)
    into the image."""
    b, _, h, w = images.shape
    dev = images.device
    s = _as_severity(severity, b, dev)
    scale = h / 64.0
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + 0.5
    xx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + 0.5
    count = 2 + (_rand(b, generator, dev) * 4).floor().clamp(max=3)  # 2..5
    out = images
    for k in range(5):
        centre = _rand(b, generator, dev, 2) * torch.tensor([w, h], device=dev, dtype=torch.float32)
        radius = (3.0 + 6.0 * _rand(b, generator, dev)) * scale
        color = _rand(b, generator, dev, 3)
        d2 = (xx - centre[:, 0].view(b, 1, 1)) ** 2 + (yy - centre[:, 1].view(b, 1, 1)) ** 2
        alpha = (0.35 + 0.55 * s).view(b, 1, 1) * torch.exp(-d2 / (2 * radius.view(b, 1, 1) ** 2))
        alpha = alpha * (k < count).float().view(b, 1, 1)
        out = out * (1 - alpha[:, None]) + color[:, :, None, None] * alpha[:, None]
    return out.clamp(0, 1)


def blur_artifact(images: Tensor, severity: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with standard deviation ``0.7 + 1.6 * severity`` px (reflect padding)."""
    b, c, h, w = images.shape
    dev = images.device
    s = _as_severity(severity, b, dev)
    sigma = (0.7 + 1.6 * s) * (h / 64.0)  # (B,)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w).clamp(0, 1)


ARTIFACTS: dict[str, Callable[[Tensor, Tensor | float, torch.Generator | None], Tensor]] = {
    "grid": grid_artifact,
    "oversaturation": oversaturation_artifact,
    "noise": noise_artifact,
    "blotches": blotch_artifact,
    "blur": blur_artifact,
}


def apply_artifact(
    images: Tensor, kind: str, severity: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Apply artifact ``kind`` (one of :data:`ARTIFACT_KINDS`) to every image."""
    if kind not in ARTIFACTS:
        raise ValueError(f"unknown artifact {kind!r}; expected one of {', '.join(ARTIFACT_KINDS)}")
    return ARTIFACTS[kind](images, severity, generator)


def add_random_artifacts(
    images: Tensor,
    generator: torch.Generator | None = None,
    kinds: Sequence[str] = ARTIFACT_KINDS,
    min_severity: float = 0.0,
    max_severity: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Corrupt every image with one artifact drawn uniformly from ``kinds``, severity uniform in
    ``[min_severity, max_severity]``.

    Returns:
        ``(corrupted (B, 3, H, W), kind ids (B,) int64 into ARTIFACT_KINDS, severity (B,) float32)``.
    """
    unknown = [k for k in kinds if k not in ARTIFACTS]
    if unknown or not kinds:
        raise ValueError(f"unknown artifact kinds {unknown}; expected a non-empty subset of {ARTIFACT_KINDS}")
    if not 0.0 <= min_severity <= max_severity <= 1.0:
        raise ValueError(f"need 0 <= min_severity <= max_severity <= 1, got {min_severity}, {max_severity}")
    b, dev = images.shape[0], images.device
    choice = (torch.rand(b, generator=generator, device=dev) * len(kinds)).floor().long().clamp(max=len(kinds) - 1)
    severity = min_severity + (max_severity - min_severity) * torch.rand(b, generator=generator, device=dev)
    out = images.clone()
    ids = torch.empty(b, dtype=torch.long, device=dev)
    for j, kind in enumerate(kinds):
        rows = (choice == j).nonzero().flatten()
        ids[rows] = ARTIFACT_KINDS.index(kind)
        if len(rows):
            out[rows] = apply_artifact(images[rows], kind, severity[rows], generator)
    return out, ids, severity


def mild_variation(images: Tensor, generator: torch.Generator | None = None, max_noise: float = 0.008) -> Tensor:
    """The variation a clean image may carry (sensor-level noise of std up to ``max_noise`` and a brightness shift
    of up to +-1%), used on the artifact-free side so that a classifier does not flag any deviation from a
    perfect render."""
    b, dev = images.shape[0], images.device
    sigma = max_noise * torch.rand(b, 1, 1, 1, generator=generator, device=dev)
    shift = 0.02 * (torch.rand(b, 1, 1, 1, generator=generator, device=dev) - 0.5)
    noise = torch.randn(images.shape, generator=generator, device=dev)
    return (images + shift + sigma * noise).clamp(0, 1)
