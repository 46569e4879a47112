"""The embedded world's rule-based evaluator as a reward (its GenEval-style partial credit, or strict 0/1)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.rewards.base import Reward
from diffalign.world.evaluator import evaluate_batch


class WorldReward(Reward):
    """Score each image against its world prompt.

    Args:
        mode: ``"score"`` (partial credit in [0, 1]: the fraction of the prompt's requirements that hold) or
            ``"correct"`` (1 when every requirement holds, else 0; GenEval's strict accuracy).

    Not differentiable (connected components and counting). Prompts must be world prompts (``parse_prompt``
    raises a ``ValueError`` naming the prompt otherwise).
    """

    name = "world"

    def __init__(self, mode: Literal["score", "correct"] = "score") -> None:
        if mode not in ("score", "correct"):
            raise ValueError(f"WorldReward mode must be 'score' or 'correct', got {mode!r}")
        self.mode = mode

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        verdicts = evaluate_batch(images.detach().float().cpu().numpy(), prompts)
        values = [v.score if self.mode == "score" else float(v.correct) for v in verdicts]
        return torch.tensor(values, dtype=torch.float32, device=images.device)
