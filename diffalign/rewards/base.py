"""The reward interface and ``RewardSet``.

A reward maps images ``(B, 3, H, W)`` float in [0, 1] plus ``B`` prompts (plus optional per-sample metadata) to a
``(B,)`` float32 tensor, higher is better, on the images' device. It declares whether it is differentiable (so
gradients can flow to the images, for reward backprop and gradient guidance) and whether it may abstain: NaN
means "not applicable to this sample" only for rewards that declare ``may_abstain``; from any other reward a NaN,
and from every reward an inf, is an error that names the reward (never passed on silently).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.pipelines.base import check_images


class RewardError(RuntimeError):
    """A reward failed or produced values it must not (inf; NaN from a reward that cannot abstain)."""


class Reward(ABC):
    """Base class. Subclasses implement ``score`` and set the class attributes.

    Attributes:
        name: registry name.
        differentiable: gradients of the output reach the input images.
        may_abstain: NaN marks samples the reward does not apply to.
    """

    name: ClassVar[str] = "reward"
    differentiable: ClassVar[bool] = False
    may_abstain: ClassVar[bool] = False

    def __call__(self, images: Tensor, prompts: Sequence[str], **meta: Any) -> Tensor:
        """Validate inputs, score, validate the output: ``(B,)`` float32 on ``images.device``."""
        check_images(images)
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: need one prompt per image ({images.shape[0]} images)")
        grad_ctx = torch.enable_grad() if self.differentiable and images.requires_grad else torch.no_grad()
        with grad_ctx:
            out = self.score(images, list(prompts), **meta)
        if not isinstance(out, Tensor) or out.shape != (images.shape[0],):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RewardError(f"reward {self.name!r} returned {shape}, expected a ({images.shape[0]},) tensor")
        out = out.to(device=images.device, dtype=torch.float32)
        values = out.detach()
        if torch.isinf(values).any():
            raise RewardError(f"reward {self.name!r} returned inf for samples {_rows(torch.isinf(values))}")
        if torch.isnan(values).any() and not self.may_abstain:
            raise RewardError(f"reward {self.name!r} returned NaN for samples {_rows(torch.isnan(values))}")
        return out

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1], B prompts -> ``(B,)`` scores."""

    def to(self, device: torch.device | str) -> Reward:
        """Move any model the reward holds; returns self."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return self


def _rows(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()[:10]


@dataclass
class RewardOutput:
    """``total``: ``(B,)`` weighted sum of the components (NaN components skipped; NaN where all are NaN);
    ``components``: name -> ``(B,)`` raw score of each reward."""

    total: Tensor
    components: dict[str, Tensor]


class RewardSet:
    """Named, weighted rewards evaluated together; returns every component as well as the weighted total."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float] | None = None) -> None:
        if not rewards:
            raise ValueError("a RewardSet needs at least one reward")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"weights given for unknown rewards {sorted(unknown)}")
        self.rewards = dict(rewards)
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}

    @property
    def differentiable(self) -> bool:
        """True when every weighted reward is differentiable."""
        return all(r.differentiable for n, r in self.rewards.items() if self.weights[n] != 0)

    def __call__(self, images: Tensor, prompts: Sequence[str], **meta: Any) -> RewardOutput:
        components = {}
        for name, reward in self.rewards.items():
            try:
                components[name] = reward(images, prompts, **meta)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
        stacked = torch.stack([components[n] * self.weights[n] for n in self.rewards])
        missing = torch.isnan(stacked)
        total = torch.where(missing, torch.zeros_like(stacked), stacked).sum(dim=0)
        total = torch.where(missing.all(dim=0), torch.full_like(total, float("nan")), total)
        return RewardOutput(total=total, components=components)

    def to(self, device: torch.device | str) -> RewardSet:
        for reward in self.rewards.values():
            reward.to(device)
        return self
