"""Evaluate a FlowModel on the embedded world: sample prompts, judge every image with the rule-based evaluator.

GenEval protocol on our world: each held-out prompt is sampled ``images_per_prompt`` times (GenEval uses 4) with
fixed per-image seeds; an image is correct when every requirement holds; the overall score is the mean of the
per-category accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from diffalign.config import SamplingConfig
from diffalign.pipelines.base import FlowModel
from diffalign.sampling.generate import generate
from diffalign.world.evaluator import Verdict, evaluate_batch, summarize
from diffalign.world.prompts import PromptSpec, as_spec


@dataclass
class WorldEvaluation:
    """Result of ``evaluate_world``: the ``summary`` dict (per-category and overall accuracy, mean score), the
    evaluated prompt texts (one per image), the images ``(N, 3, H, W)`` in [0, 1] and their verdicts."""

    summary: dict[str, Any]
    prompts: list[str]
    images: Tensor
    verdicts: list[Verdict]


def evaluate_world(
    flow: FlowModel,
    prompts: Sequence[str | PromptSpec],
    sampling: SamplingConfig,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> WorldEvaluation:
    """Sample every prompt ``images_per_prompt`` times and judge each image."""
    specs = [as_spec(p) for p in prompts]
    texts = [s.text for s in specs for _ in range(images_per_prompt)]
    images = generate(flow, texts, sampling, seed=seed, batch_size=batch_size, progress=progress)
    verdicts = evaluate_batch(images.numpy(), texts)
    return WorldEvaluation(summary=summarize(texts, verdicts), prompts=texts, images=images, verdicts=verdicts)


def format_summary(summary: dict[str, Any]) -> str:
    """A per-category accuracy table as text."""
    per = summary["per_category"]

    def ci(interval) -> str:
        return f"[{interval[0]:.3f}, {interval[1]:.3f}]"

    lines = [f"{'category':<16}{'accuracy':>10}{'95% interval':>18}{'images':>8}", "-" * 52]
    for name, row in per.items():
        lines.append(f"{name:<16}{row['accuracy']:>10.3f}{ci(row['ci95']):>18}{row['n']:>8d}")
    lines.append("-" * 52)
    lines.append(f"{'overall':<16}{summary['overall']:>10.3f}{ci(summary['overall_ci95']):>18}{summary['n']:>8d}")
    lines.append(f"{'image-level':<16}{summary['image_accuracy']:>10.3f}{ci(summary['image_accuracy_ci95']):>18}")
    lines.append(f"{'partial credit':<16}{summary['mean_score']:>10.3f}")
    if "mean_graded" in summary:
        lines.append(f"{'graded credit':<16}{summary['mean_graded']:>10.3f}")
    return "\n".join(lines)
