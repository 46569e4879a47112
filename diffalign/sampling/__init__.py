"""Sampling: pure step maths (``steps``) and the one denoising loop (``sampler``)."""

from diffalign.sampling.sampler import (
    SDE,
    SteeringHook,
    StepInfo,
    guided_velocity,
    sample,
    transition_log_prob,
    window,
)
from diffalign.sampling.steps import STEP_KINDS, StepOutput, gaussian_log_prob, step

__all__ = [
    "SDE",
    "STEP_KINDS",
    "SteeringHook",
    "StepInfo",
    "StepOutput",
    "gaussian_log_prob",
    "guided_velocity",
    "sample",
    "step",
    "transition_log_prob",
    "window",
]
