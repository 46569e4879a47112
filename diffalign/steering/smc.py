"""Sequential Monte Carlo / Feynman-Kac steering (Singhal et al., arXiv 2501.06848, ICML 2025).

K particles follow the model's stochastic kernel (the proposal). At the scheduled steps each particle gets a
potential from an intermediate reward of its clean-sample estimate ``x0_hat = x - t v`` (free: ``v`` is the step's
velocity), its log-weight grows by ``log G``, and when the effective sample size ``1 / sum w^2`` drops below
``ess_threshold * K`` the particles are resampled (systematic resampling) and their weights reset. The final
potential makes the product of all potentials ``exp(lam r(x0))``, so the particle system targets
``p_theta(x0) exp(lam r(x0))`` for every choice of potential:

- ``diff``: ``G = exp(lam (r_t - r_prev))`` (telescopes; the FK paper's sampling default);
- ``max``: ``G = exp(lam max_{s<=t} r_s)``; ``add``: ``G = exp(lam sum_{s<=t} r_s)``; ``rt``: ``G = exp(lam r_t)``;
  for these three the final potential divides out the product of the earlier ones.

A final systematic resampling returns equally weighted particles; with equal weights it is the identity, so a
constant reward returns exactly the samples plain sampling draws with the same generator (resampling draws come
from a separate generator). Cost: ``K * sample_cost`` NFE (intermediate rewards cost reward calls, not NFE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.sampling.sampler import SteeringHook, StepInfo
from diffalign.steering.base import (
    SteeringProblem,
    SteeringResult,
    aux_generator,
    effective_sample_size,
    systematic_resample,
)

POTENTIALS = ("diff", "max", "add", "rt")


def default_schedule(num_steps: int, points: int = 5) -> list[int]:
    """Step indices at which potentials are applied: ``points`` evenly spaced steps, always including the last."""
    every = max(1, num_steps // points)
    return sorted({*range(every - 1, num_steps - 1, every), num_steps - 1})


class FeynmanKacHook(SteeringHook):
    """The sampler hook that weights and resamples particles (module docstring)."""

    def __init__(
        self,
        problem: SteeringProblem,
        num_particles: int,
        schedule: Sequence[int],
        potential: str,
        ess_threshold: float,
        generator: torch.Generator,
    ) -> None:
        self.problem = problem
        self.lam = problem.inverse_temperature
        self.schedule = set(schedule)
        self.last = problem.num_steps - 1
        self.potential = potential
        self.ess_threshold = ess_threshold
        self.generator = generator
        device = problem.flow.device
        self.log_w = torch.zeros(num_particles, dtype=torch.float64, device=device)
        # r_prev (diff), running max (max) or running sum (add) of the intermediate rewards
        start = float("-inf") if potential == "max" else 0.0
        self.state = torch.full((num_particles,), start, dtype=torch.float64, device=device)
        self.applied = torch.zeros(num_particles, dtype=torch.float64, device=device)  # sum of log G so far
        self.resample_steps: list[int] = []
        self.ess: list[float] = []
        self.reward_calls = 0
        self.final_rewards: Tensor | None = None
        self.final_latents: Tensor | None = None
        self.final_log_weights: Tensor | None = None

    def _log_potential(self, r: Tensor, final: bool) -> Tensor:
        lam = self.lam
        if self.potential == "diff":
            log_g = lam * (r - self.state)
            self.state = r
            return log_g
        if final:
            return lam * r - self.applied
        if self.potential == "max":
            self.state = torch.maximum(self.state, r)
            return lam * self.state
        if self.potential == "add":
            self.state = self.state + r
            return lam * self.state
        return lam * r

    def select(self, info: StepInfo) -> Tensor | None:
        if info.index not in self.schedule:
            return None
        final = info.index == self.last
        latents = info.out.x_next if final else info.x0_hat
        r = self.problem.score(latents, f"SMC step {info.index}").double().to(self.log_w.device)
        self.reward_calls += latents.shape[0]
        log_g = self._log_potential(r, final)
        self.applied = self.applied + log_g
        self.log_w = self.log_w + log_g
        ess = effective_sample_size(self.log_w)
        self.ess.append(ess)
        if final:
            self.final_latents, self.final_log_weights = info.out.x_next, self.log_w.clone()
        if not final and ess >= self.ess_threshold * len(self.log_w):
            return None
        idx = systematic_resample(self.log_w, self.generator).to(self.log_w.device)
        if not bool((idx == torch.arange(len(idx), device=idx.device)).all()):
            self.resample_steps.append(info.index)
        self.state, self.applied = self.state[idx], self.applied[idx]
        self.log_w = torch.zeros_like(self.log_w)
        self.final_rewards = r[idx] if final else None
        return idx


@torch.no_grad()
def smc(
    problem: SteeringProblem,
    budget: int,
    *,
    num_particles: int | None = None,
    potential: str = "diff",
    schedule: Sequence[int] | None = None,
    ess_threshold: float = 0.5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SteeringResult:
    """FK / SMC steering under an NFE budget.

    Args:
        problem: the prompt, sampler, reward and inverse temperature.
        budget: NFE available; ``num_particles`` defaults to what it buys (``budget // sample_cost``).
        potential: ``diff``, ``max``, ``add`` or ``rt`` (module docstring).
        schedule: step indices where potentials apply (default 5 evenly spaced, always the last step).
        ess_threshold: resample when ``ESS < ess_threshold * K`` (FK's adaptive resampling uses 0.5).
        generator: the sampling noise; resampling uses its own generator derived from it.

    Returns:
        ``SteeringResult`` with K equally weighted particles; ``info`` has ``resample_steps`` and ``ess``.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; expected one of {list(POTENTIALS)}")
    if not 0 < ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold}")
    budget = problem.check_budget(budget)
    k = budget // problem.sample_cost if num_particles is None else num_particles
    if k < 1:
        raise ValueError(f"num_particles must be >= 1, got {k}")
    problem.check_budget(budget, k * problem.sample_cost, f"{k} particles")
    steps = default_schedule(problem.num_steps) if schedule is None else sorted(set(schedule))
    if any(not 0 <= i < problem.num_steps for i in steps):
        raise ValueError(f"schedule {steps} has steps outside [0, {problem.num_steps})")
    steps = sorted({*steps, problem.num_steps - 1})
    hook = FeynmanKacHook(problem, k, steps, potential, ess_threshold, aux_generator(generator, 1))
    nfe_start = problem.flow.nfe
    traj = problem.sample(k, generator, steering=hook, progress=progress)
    return SteeringResult(
        latents=traj.final,
        rewards=hook.final_rewards.float(),
        nfe=problem.flow.nfe - nfe_start,
        method="smc",
        info={"particles": k, "resample_steps": hook.resample_steps, "ess": hook.ess,
              "reward_calls": hook.reward_calls, "ancestors": traj.ancestors,
              "weighted_latents": hook.final_latents, "final_log_weights": hook.final_log_weights},
    )  # fmt: skip
