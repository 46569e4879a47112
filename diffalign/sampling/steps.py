"""Pure, stateless transition maths for rectified-flow samplers, with Gaussian log-probabilities.

Conventions: ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0`` (so ``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``),
time runs from 1 (noise) to 0 (data), so ``dt = t_next - t < 0``. All maths in float32 whatever the model dtype.
Every step takes the current state ``x`` ``(B, C, H, W)``, the velocity ``v`` at ``(x, t)``, and per-sample times
``t``, ``t_next`` (floats or ``(B,)``), and returns the transition mean, its std ``(B,)``, the next state and the
log-density of that next state. Passing ``x_next`` re-scores a given transition instead of sampling one (same
formula, so a re-scored sampled transition returns exactly its sampling log-prob).

Steps (see ``shared/reference/anchors_training.md``):

- ``ode``: Euler, ``x' = x + dt v``; deterministic.
- ``flow_sde``: Flow-GRPO's marginal-preserving reverse SDE (Liu et al. 2025, arXiv 2505.05470, Eq. 9/12):
  ``sigma_t = a sqrt(t / (1 - t))`` (t = 1 replaced by ``t_next`` in the denominator, as the reference does),
  ``mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt``, ``std = sigma_t sqrt(-dt)``.
- ``cps``: coefficients-preserving sampling (Wang et al. 2025, arXiv 2509.05952):
  ``std = t_next sin(a pi / 2)``, ``mean = (1 - t_next) x0_hat + t_next cos(a pi / 2) eps_hat``; deterministic
  when ``t_next = 0``. The log-prob here is the true Gaussian density; the reference's unnormalised
  ``-(x' - mean)^2`` only differs by the variance scale and constants.
- ``dance``: DanceGRPO's step (Xue et al. 2025, arXiv 2505.07818): the same drift correction with a constant
  diffusion coefficient, ``mean = x + [v + a^2 / (2t) eps_hat] dt``, ``std = a sqrt(-dt)``.

The log-prob is reduced over ``(C, H, W)`` by ``reduce``: ``"mean"`` (Flow-GRPO: a per-element log-density,
which is why its clip ranges are ~1e-4) or ``"sum"`` (the full log-density of the latent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
StepKind = Literal["ode", "flow_sde", "cps", "dance"]
STEP_KINDS: tuple[str, ...] = ("ode", "flow_sde", "cps", "dance")


@dataclass
class StepOutput:
    """One transition.

    Attributes:
        x_next: ``(B, C, H, W)`` float32 next state.
        mean: ``(B, C, H, W)`` float32 transition mean.
        std: ``(B,)`` float32 transition std (0 for a deterministic transition).
        log_prob: ``(B,)`` float32 log-density of ``x_next``; NaN where the transition is deterministic.
    """

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def _times(t: Tensor | float, x: Tensor) -> Tensor:
    """A time as a ``(B, 1, 1, 1)`` float32 tensor on ``x``'s device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time has shape {tuple(t.shape)}, expected () or ({x.shape[0]},)")
    return t.view(-1, 1, 1, 1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: Reduction = "mean") -> Tensor:
    """``log N(x; mean, std^2 I)`` reduced over all but the batch dim: ``(B,)`` float32.

    ``std`` is ``(B,)``; where it is 0 the result is NaN (no density for a deterministic transition).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    x, mean = x.float(), mean.float()
    positive = std > 0
    s = torch.where(positive, std.float(), torch.ones_like(std, dtype=torch.float32)).view(-1, 1, 1, 1)
    elementwise = -((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.ndim))
    reduced = elementwise.mean(dim=dims) if reduce == "mean" else elementwise.sum(dim=dims)
    return torch.where(positive, reduced, torch.full_like(reduced, float("nan")))


def _finish(
    mean: Tensor,
    std: Tensor,
    *,
    generator: torch.Generator | None,
    noise: Tensor | None,
    x_next: Tensor | None,
    reduce: Reduction,
) -> StepOutput:
    if x_next is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        x_next = mean + std.view(-1, 1, 1, 1) * noise.float()
    x_next = x_next.float()
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std, reduce))


def _check(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> None:
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    if bool((t_next >= t).any()):
        raise ValueError("steps must go from noise to data: t_next < t")
    if bool((t > 1).any()) or bool((t_next < 0).any()):
        raise ValueError("times must lie in [0, 1]")


def ode_step(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, **_: object) -> StepOutput:
    """Deterministic Euler step ``x' = x + (t_next - t) v``; ``log_prob`` is NaN."""
    tt, tn = _times(t, x), _times(t_next, x)
    _check(x, v, tt, tn)
    mean = x.float() + (tn - tt) * v.float()
    std = torch.zeros(x.shape[0], device=x.device)
    return StepOutput(x_next=mean, mean=mean, std=std, log_prob=torch.full_like(std, float("nan")))


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    *,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    x_next: Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """Flow-GRPO SDE step (module docstring); ``noise_level`` is the paper's ``a`` (default 0.7)."""
    tt, tn = _times(t, x), _times(t_next, x)
    _check(x, v, tt, tn)
    if bool((tt <= 0).any()):
        raise ValueError("the flow SDE step needs t > 0")
    x, v = x.float(), v.float()
    dt = tn - tt
    t_den = torch.where(tt >= 1, tn, tt)
    sigma_t = noise_level * torch.sqrt(tt / (1 - t_den))
    mean = x + (v + sigma_t**2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    std = (sigma_t * torch.sqrt(-dt)).view(-1)
    return _finish(mean, std, generator=generator, noise=noise, x_next=x_next, reduce=reduce)


def cps_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    *,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    x_next: Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """Coefficients-preserving step (module docstring); ``noise_level`` is ``eta`` in [0, 1]."""
    tt, tn = _times(t, x), _times(t_next, x)
    _check(x, v, tt, tn)
    x, v = x.float(), v.float()
    x0_hat = x - tt * v
    eps_hat = x + (1 - tt) * v
    angle = noise_level * math.pi / 2
    mean = (1 - tn) * x0_hat + tn * math.cos(angle) * eps_hat
    std = (tn * math.sin(angle)).view(-1)
    return _finish(mean, std, generator=generator, noise=noise, x_next=x_next, reduce=reduce)


def dance_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    *,
    noise_level: float = 0.3,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    x_next: Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """DanceGRPO step (module docstring); ``noise_level`` is its ``eta`` (default 0.3)."""
    tt, tn = _times(t, x), _times(t_next, x)
    _check(x, v, tt, tn)
    if bool((tt <= 0).any()):
        raise ValueError("the DanceGRPO step needs t > 0")
    x, v = x.float(), v.float()
    dt = tn - tt
    eps_hat = x + (1 - tt) * v
    mean = x + (v + noise_level**2 / (2 * tt) * eps_hat) * dt
    std = (noise_level * torch.sqrt(-dt)).view(-1)
    return _finish(mean, std, generator=generator, noise=noise, x_next=x_next, reduce=reduce)


STEP_FUNCTIONS = {"ode": ode_step, "flow_sde": flow_sde_step, "cps": cps_step, "dance": dance_step}


def step(kind: StepKind, x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, **kwargs) -> StepOutput:
    """Dispatch to the step function named ``kind`` (one of ``STEP_KINDS``)."""
    if kind not in STEP_FUNCTIONS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {list(STEP_FUNCTIONS)}")
    return STEP_FUNCTIONS[kind](x, v, t, t_next, **kwargs)
