"""The embedded world's rule-based evaluator as a reward: graded credit, partial credit, or strict 0/1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.rewards.base import Reward
from diffalign.world.evaluator import Verdict, evaluate_batch
from diffalign.world.prompts import CATEGORIES, as_spec


class WorldReward(Reward):
    """Score each image against its world prompt.

    Args:
        mode: ``"graded"`` (the graded credit in [0, 1]: a product of count, shape-quality and relation-margin
            factors over what the prompt asks, lowered by every object it does not ask for; extra or wrong
            objects never raise it, see :mod:`diffalign.world.evaluator`), ``"score"`` (partial credit in
            [0, 1]: the mean of the prompt's check credits; drawing extra objects can raise it) or ``"correct"``
            (1 when every requirement holds, else 0; GenEval's strict accuracy).

    Not differentiable (connected components and counting). Prompts must be world prompts (``parse_prompt``
    raises a ``ValueError`` naming the prompt otherwise).
    """

    name = "world"

    def __init__(self, mode: Literal["graded", "score", "correct"] = "score") -> None:
        if mode not in MODES:
            raise ValueError(f"WorldReward mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        verdicts = evaluate_batch(images.detach().float().cpu().numpy(), prompts)
        values = [MODES[self.mode](v) for v in verdicts]
        return torch.tensor(values, dtype=torch.float32, device=images.device)


class WorldSpecialistReward(WorldReward):
    """A specialist: ``WorldReward`` on the prompts of some categories of the world, NaN (abstains: not applicable)
    on every other prompt, like MARBLE's OCR and GenEval rewards outside their prompt sets.

    Args:
        categories: the world categories it scores (of :data:`diffalign.world.prompts.CATEGORIES`).
        mode: as ``WorldReward``'s (default ``graded``).
    """

    name = "world_specialist"
    may_abstain = True

    def __init__(self, categories: list[str], mode: Literal["graded", "score", "correct"] = "graded") -> None:
        super().__init__(mode)
        unknown = sorted(set(categories) - set(CATEGORIES))
        if not categories or unknown:
            raise ValueError(f"world_specialist: categories must be a non-empty list of {', '.join(CATEGORIES)}; "
                             f"got {list(categories)}")  # fmt: skip
        self.categories = set(categories)

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        applies = [as_spec(p).category in self.categories for p in prompts]
        out = torch.full((len(prompts),), float("nan"), dtype=torch.float32, device=images.device)
        rows = [i for i, a in enumerate(applies) if a]
        if rows:
            out[rows] = super().score(images[rows], [prompts[i] for i in rows], **meta)
        return out


#: mode -> the verdict's value that the reward returns.
MODES: dict[str, Callable[[Verdict], float]] = {
    "graded": lambda v: v.graded,
    "score": lambda v: v.score,
    "correct": lambda v: float(v.correct),
}
