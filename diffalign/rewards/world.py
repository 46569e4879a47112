"""The embedded world's rule-based evaluator as a reward: graded credit, partial credit, or strict 0/1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.rewards.base import Reward
from diffalign.world.evaluator import Verdict, evaluate_batch


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


#: mode -> the verdict's value that the reward returns.
MODES: dict[str, Callable[[Verdict], float]] = {
    "graded": lambda v: v.graded,
    "score": lambda v: v.score,
    "correct": lambda v: float(v.correct),
}
