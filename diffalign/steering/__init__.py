"""Inference-time steering toward a reward, without training: DTS / DTS* tree sampling and search, Doob
h-transform steering, SMC / Feynman-Kac steering and best-of-N, all under one NFE budget accounting.

Example::

    from diffalign.steering import SteeringPipeline

    pipe = SteeringPipeline.from_pretrained("builtin:world-sd3", family="sd3")
    out = pipe(prompt="a photo of a red circle", reward="world", method="dts_star", budget=800,
               num_inference_steps=20, guidance_scale=3.0, height=64, width=64)
    out.images[0], out.rewards, out.nfe
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from diffalign.sampling.sampler import check_generator
from diffalign.steering.base import BudgetError, SteeringProblem, SteeringResult, image_reward
from diffalign.steering.best_of_n import best_of_n
from diffalign.steering.doob import doob
from diffalign.steering.smc import smc
from diffalign.steering.tree import DiffusionTree, tree_steering

METHODS: dict[str, Callable[..., SteeringResult]] = {
    "best_of_n": best_of_n,
    "smc": smc,
    "dts": partial(tree_steering, search=False),
    "dts_star": partial(tree_steering, search=True),
    "doob": doob,
}


def method_arguments(method: str) -> set[str]:
    """The extra keyword arguments ``steer(problem, method, budget, ...)`` accepts for ``method`` (tree methods:
    ``num_samples`` plus ``DiffusionTree``'s options)."""
    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; expected one of {sorted(METHODS)}")
    function = METHODS[method]
    signatures = [inspect.signature(function)]
    if isinstance(function, partial) and function.func is tree_steering:
        signatures.append(inspect.signature(DiffusionTree))
    fixed = ("generator", "progress", "search")
    return {
        name
        for signature in signatures
        for name, p in signature.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in fixed
    }


def steer(
    problem: SteeringProblem,
    method: str,
    budget: int | float,
    *,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> SteeringResult:
    """Run steering method ``method`` (a key of ``METHODS``) on ``problem`` with ``budget`` NFE (a whole number:
    ``800`` or ``800.0``)."""
    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; expected one of {sorted(METHODS)}")
    check_generator(generator, problem.flow.device)
    return METHODS[method](problem, budget, generator=generator, **kwargs)


from diffalign.steering.pipeline import SteeringPipeline, SteeringPipelineOutput  # noqa: E402

__all__ = [
    "METHODS",
    "BudgetError",
    "DiffusionTree",
    "SteeringPipeline",
    "SteeringPipelineOutput",
    "SteeringProblem",
    "SteeringResult",
    "best_of_n",
    "doob",
    "image_reward",
    "method_arguments",
    "smc",
    "steer",
    "tree_steering",
]
