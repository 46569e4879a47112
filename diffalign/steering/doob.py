"""Doob h-transform steering (DOIT: Zhu et al., arXiv 2602.16198; estimator as read by Takakura et al.).

The target ``p_theta(x0) exp(lam r(x0))`` is the base process conditioned by ``h_t(x) = E[exp(lam r(X_0)) | X_t = x]``;
its transition kernel is the base kernel reweighted by ``h``. For a Gaussian step ``N(mean, std^2 I)`` that shifts
the mean by about ``std^2 grad log h``: the drift correction of Doob's transform. Two estimators:

- ``mc`` (gradient-free, reward values only; DOIT's practical estimator): draw k candidate next states
  ``x'_j = mean + std eps_j`` (antithetic pairs ``+-eps``, so the estimate is exactly zero when all weights agree),
  map each to its clean estimate ``x0_hat = x' - t_next v(x')`` with one model call, weight ``w_j = softmax(lam
  r(x0_hat_j))``, and shift the mean by ``std sum_j w_j eps_j``, the self-normalised estimate of the tilted kernel's
  mean. Costs ``k * step_cost`` NFE per particle and step (none on the last step, where ``x'`` is already clean).
- ``gradient`` (differentiable rewards): shift by ``std^2 lam grad_y r(x0_hat(y))`` at ``y = mean``; one model call
  plus a backward pass per particle and step.

The shift is applied through the velocity (the step mean is linear in ``v``), so the sampler's own noise draws
are untouched: a constant reward leaves the samples exactly as plain sampling draws them with that generator.
Candidate noise comes from a separate generator. Steps that ``sde.steps`` leaves deterministic get no correction
(a deterministic step has no kernel to reweight) and cost no look-ahead.

**What the budget buys.** Neither estimator converges to the target as the budget grows. Both replace ``h`` by the
look-ahead ``exp(lam r(x0_hat))``, which misses the spread of ``r`` given ``x`` (for a linear reward
``log h = lam E[r | x] + lam^2 Var[r | x] / 2 + ...``: the look-ahead keeps only the first term), and both move
only the mean of a Gaussian step, while the tilted kernel also changes its shape. ``mc`` adds a self-normalised
estimate over k candidates, biased for finite k. A larger budget spent on more samples (fixed ``num_candidates``)
draws more samples from the same approximate drift. A larger budget spent on more candidates removes only the
finite-k bias. On the analytic mixtures (``benchmarks/steering_analytic.py``) Doob's distance to the target
therefore stays flat as the budget grows: it is a cheap fixed improvement over plain sampling, not a sampler of
the target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.sampling.sampler import SteeringHook
from diffalign.sampling.steps import step
from diffalign.steering.base import BudgetError, SteeringProblem, SteeringResult, aux_generator, check_rewards
from diffalign.types import Cond

ESTIMATORS = ("mc", "gradient")


class DoobHook(SteeringHook):
    """Adds the estimated Doob drift correction to the velocity at every step (module docstring)."""

    def __init__(
        self, problem: SteeringProblem, estimator: str, num_candidates: int, generator: torch.Generator
    ) -> None:
        self.problem = problem
        self.estimator = estimator
        self.k = num_candidates
        self.generator = generator
        self.shift_norms: list[float] = []

    def _kernel(self, x: Tensor, v: Tensor, t: float, t_next: float) -> tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, C, H, W)`` and std ``(B,)`` of the step, and ``d mean / d v`` (a scalar tensor)."""
        sde = self.problem.sde
        out = step(sde.kind, x, v, t, t_next, noise_level=sde.noise_level, x_next=x)
        one = torch.ones_like(x[:1])
        slope = step(sde.kind, torch.zeros_like(one), one, t, t_next, noise_level=sde.noise_level, x_next=one).mean
        return out.mean, out.std, slope.flatten()[0]

    def _clean_estimate(self, y: Tensor, t_next: float) -> Tensor:
        return y if t_next == 0 else y - t_next * self.problem.velocity(y, t_next)

    def _mc_shift(self, mean: Tensor, std: Tensor, t_next: float) -> Tensor:
        b = mean.shape[0]
        half = torch.randn((b, self.k // 2, *mean.shape[1:]), generator=self.generator, device=mean.device)
        eps = torch.stack([half, -half], dim=2)  # (B, k/2, 2, ...): antithetic pairs
        cand = mean[:, None, None] + std.view(-1, 1, 1, *[1] * (mean.ndim - 1)) * eps
        x0 = self._clean_estimate(cand.reshape(-1, *mean.shape[1:]), t_next)
        r = check_rewards(self.problem.reward(x0), "Doob look-ahead").view(b, self.k // 2, 2)
        w = torch.softmax(self.problem.inverse_temperature * r.view(b, -1).double(), dim=1).view(b, self.k // 2, 2)
        pair = (w[..., 0] - w[..., 1]).float().view(b, self.k // 2, *[1] * (mean.ndim - 1))
        return std.view(-1, *[1] * (mean.ndim - 1)) * (pair * half).sum(dim=1)

    def _gradient_shift(self, mean: Tensor, std: Tensor, t_next: float) -> Tensor:
        with torch.enable_grad():
            y = mean.detach().requires_grad_(True)
            r = self.problem.reward(self._clean_estimate(y, t_next))
            if not r.requires_grad:
                raise ValueError("Doob estimator 'gradient' needs a differentiable reward; use estimator='mc'")
            check_rewards(r, "Doob gradient")
            (grad,) = torch.autograd.grad(r.sum(), y)
        return (std**2).view(-1, *[1] * (mean.ndim - 1)) * self.problem.inverse_temperature * grad

    def velocity(self, index: int, x: Tensor, t: float, v: Tensor, cond: Cond) -> Tensor:
        if not self.problem.stochastic[index]:
            self.shift_norms.append(0.0)
            return v
        t_next = float(self.problem.times[index + 1])
        mean, std, slope = self._kernel(x, v, t, t_next)
        if self.estimator == "mc":
            shift = self._mc_shift(mean, std, t_next)
        else:
            shift = self._gradient_shift(mean, std, t_next)
        self.shift_norms.append(float(shift.flatten(1).norm(dim=1).mean()))
        return v + shift / slope


def doob_cost(problem: SteeringProblem, estimator: str, num_candidates: int) -> int:
    """NFE of one Doob-steered sample: the sample plus the look-ahead of every stochastic step whose next time is
    not 0 (there ``x'`` is already clean)."""
    look_ahead = num_candidates if estimator == "mc" else 1
    paid = sum(1 for i in range(problem.num_steps) if problem.stochastic[i] and float(problem.times[i + 1]) > 0)
    return problem.sample_cost + paid * look_ahead * problem.step_cost


@torch.no_grad()
def doob(
    problem: SteeringProblem,
    budget: int,
    *,
    num_samples: int = 1,
    estimator: str = "mc",
    num_candidates: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SteeringResult:
    """Doob h-transform steering of ``num_samples`` particles under an NFE budget.

    Args:
        estimator: ``mc`` (reward values only) or ``gradient`` (differentiable reward).
        num_candidates: look-ahead candidates per particle and step for ``mc`` (even, >= 2); default: the most
            the budget pays for.
        generator: the sampling noise; candidate noise uses its own generator derived from it.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown Doob estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    budget = problem.check_budget(budget, num_samples * problem.sample_cost, f"{num_samples} samples")
    if estimator == "mc":
        if num_candidates is None:
            per_pair = doob_cost(problem, "mc", 2) - problem.sample_cost
            num_candidates = 2 * ((budget // num_samples - problem.sample_cost) // max(per_pair, 1))
            if num_candidates < 2:
                raise BudgetError(f"budget {budget} NFE cannot pay for Doob's look-ahead on {num_samples} samples: "
                                  f"needs {num_samples * doob_cost(problem, 'mc', 2)}")  # fmt: skip
        if num_candidates < 2 or num_candidates % 2:
            raise ValueError(f"num_candidates must be even and >= 2 (antithetic pairs), got {num_candidates}")
    else:
        num_candidates = 1
    cost = num_samples * doob_cost(problem, estimator, num_candidates)
    problem.check_budget(budget, cost, f"{num_samples} Doob-steered samples with {num_candidates} candidates")
    hook = DoobHook(problem, estimator, num_candidates, aux_generator(generator, 2))
    nfe_start = problem.flow.nfe
    traj = problem.sample(num_samples, generator, steering=hook, progress=progress)
    return SteeringResult(
        latents=traj.final,
        rewards=problem.score(traj.final, "Doob"),
        nfe=problem.flow.nfe - nfe_start,
        method="doob",
        info={"estimator": estimator, "candidates": num_candidates, "shift_norms": hook.shift_norms},
    )
