"""What every steering method shares: the problem (a flow, one prompt, a stochastic sampler, a terminal reward),
the NFE budget, and the result.

A ``SteeringProblem`` steers the sampler of one prompt toward ``p_theta(x0) exp(lam r(x0))`` (``lam`` is an
*inverse temperature*, as in DTS and FK steering). It exposes the three things methods need: a batched
velocity with CFG (``velocity``), one stochastic transition (``transition``) and the terminal reward of clean
latents (``reward``). NFE is counted by the flow (per-sample transformer rows, so a CFG step costs 2 per
particle); ``step_cost`` is that cost per particle and step, and ``sample_cost`` the cost of one full sample.
A budget is a whole number of NFE (``800`` or ``800.0``; ``800.5`` is an error).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from diffalign.rewards.base import Reward, RewardError, RewardOutput
from diffalign.sampling.sampler import SDE, SteeringHook, guided_velocity, sample
from diffalign.sampling.steps import StepOutput, step
from diffalign.types import Cond, Trajectory


class VelocityField(Protocol):
    """What steering needs of a model: a velocity with a running NFE count (``FlowModel`` and the analytic
    Gaussian-mixture flow both qualify)."""

    nfe: int

    @property
    def device(self) -> torch.device: ...

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Cond, guidance: float | None = None) -> Tensor: ...

    def empty_cond(self, batch: int) -> Cond: ...


LatentReward = Callable[[Tensor], Tensor]
"""Terminal reward on clean latents: ``(B, C, H, W) -> (B,)`` float32 (higher is better)."""


class BudgetError(ValueError):
    """The NFE budget cannot buy what the method needs (at least one full sample)."""


def nfe_budget(budget: int | float) -> int:
    """``budget`` as an ``int`` NFE count: integers and integral floats (``800.0``) pass, anything else (``800.5``,
    NaN, a string, a bool) is a ``ValueError``."""
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        return int(budget)
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool) and float(budget).is_integer():
        return int(budget)
    raise ValueError(f"budget must be a whole number of NFE, got {budget!r}")


def image_reward(flow: Any, reward: Reward | Callable[..., Tensor], prompt: str) -> LatentReward:
    """Decode latents with the flow's VAE and score the images against ``prompt`` (a ``Reward``, a ``RewardSet``:
    its weighted total, or any ``f(images, prompts)``): a ``LatentReward``."""

    def score(latents: Tensor) -> Tensor:
        out = reward(flow.decode_latents(latents), [prompt] * latents.shape[0])
        return (out.total if isinstance(out, RewardOutput) else out).float()

    return score


def check_rewards(values: Tensor, where: str) -> Tensor:
    """``values`` as a detached float32 ``(B,)`` tensor; NaN or inf is a ``RewardError`` (never steered on)."""
    values = values.detach().float().view(-1)
    bad = ~torch.isfinite(values)
    if bad.any():
        raise RewardError(f"{where}: reward returned NaN/inf for particles {bad.nonzero().view(-1).tolist()}")
    return values


@dataclass
class SteeringProblem:
    """Steer one prompt's stochastic sampler toward ``p_theta(x0) exp(inverse_temperature * r(x0))``.

    Attributes:
        flow: the model (``FlowModel`` or any ``VelocityField``).
        cond: the prompt's conditioning, batch 1.
        times: ``(T+1,)`` decreasing time grid (``flow.time_grid``).
        shape: ``(C, H, W)`` latent shape.
        reward: terminal reward on clean latents (``image_reward`` wraps an image reward).
        sde: the stochastic step (steering needs a stochastic kernel); ``sde.steps`` selects the stochastic steps
            (the others are Euler ODE steps, in every method's transitions) and must select at least one.
        guidance_scale, uncond, guidance: CFG scale, its unconditional conditioning (batch 1; default the empty
            prompt) and embedded guidance, as in ``sample``.
        inverse_temperature: ``lam > 0`` in ``exp(lam r)``.
    """

    flow: VelocityField
    cond: Cond
    times: Tensor
    shape: tuple[int, ...]
    reward: LatentReward
    sde: SDE | None = field(default_factory=SDE)
    guidance_scale: float = 1.0
    uncond: Cond | None = None
    guidance: float | None = None
    inverse_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.sde is None:
            raise ValueError(
                "steering needs a stochastic sampler (sde=flow_sde, cps or dance): with the deterministic ODE "
                "every particle from the same start is identical, so branching and resampling do nothing"
            )
        if not self.inverse_temperature > 0 or not math.isfinite(self.inverse_temperature):
            raise ValueError(f"inverse_temperature (lambda) must be finite and > 0, got {self.inverse_temperature}")
        if len(self.cond) != 1:
            raise ValueError(f"a steering problem holds one prompt (cond batch 1), got batch {len(self.cond)}")
        self.times = self.times.detach().float().cpu()
        if self.times.ndim != 1 or len(self.times) < 2:
            raise ValueError(f"times must be a 1-d grid of at least 2 points, got shape {tuple(self.times.shape)}")
        self.stochastic = self.sde.mask(self.num_steps)
        if not bool(self.stochastic.any()):
            raise ValueError(
                f"sde.steps={list(self.sde.steps or [])} selects none of the {self.num_steps} steps: steering needs "
                "at least one stochastic step (sde.steps=None makes every step stochastic)"
            )
        if self.guidance_scale != 1.0 and self.uncond is None:
            self.uncond = self.flow.empty_cond(1)
        self._conds: dict[int, tuple[Cond, Cond | None]] = {}

    # ------------------------------------------------------------------------------------------------ costs
    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    @property
    def step_cost(self) -> int:
        """NFE one particle spends per step (2 with CFG: the [uncond; cond] batch)."""
        return 1 if self.guidance_scale == 1.0 else 2

    @property
    def sample_cost(self) -> int:
        """NFE of one full sample from noise."""
        return self.num_steps * self.step_cost

    def check_budget(self, budget: int | float, needed: int | None = None, what: str = "one sample") -> int:
        """``budget`` as an int (``nfe_budget``); ``BudgetError`` when it cannot pay for ``needed`` NFE (default: one
        full sample)."""
        budget = nfe_budget(budget)
        needed = self.sample_cost if needed is None else needed
        if budget < needed:
            raise BudgetError(
                f"budget {budget} NFE is below the cost of {what} ({needed} NFE = {self.num_steps} steps x "
                f"{self.step_cost} per step)"
            )
        return budget

    # ------------------------------------------------------------------------------------------------ model
    def _batch_conds(self, batch: int) -> tuple[Cond, Cond | None]:
        if batch not in self._conds:
            rows = [0] * batch
            self._conds[batch] = (self.cond.index(rows), None if self.uncond is None else self.uncond.index(rows))
        return self._conds[batch]

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        """``(B, C, H, W)`` (guided) velocity of B particles of this prompt at time ``t``."""
        cond, uncond = self._batch_conds(x.shape[0])
        return guided_velocity(
            self.flow, x, t, cond, guidance_scale=self.guidance_scale, uncond=uncond, guidance=self.guidance
        )

    def transition(
        self, x: Tensor, index: int, generator: torch.Generator | None, v: Tensor | None = None
    ) -> tuple[StepOutput, Tensor]:
        """Step ``index`` (``times[index] -> times[index + 1]``) of B particles: the SDE step where ``sde.steps``
        makes it stochastic, the Euler ODE step elsewhere (as ``sample`` does).

        Returns the step and the velocity used (computed here unless ``v`` is given).
        """
        t, t_next = float(self.times[index]), float(self.times[index + 1])
        if v is None:
            v = self.velocity(x, t)
        if not self.stochastic[index]:
            return step("ode", x, v, t, t_next), v
        out = step(self.sde.kind, x, v, t, t_next, noise_level=self.sde.noise_level, generator=generator,
                   reduce=self.sde.reduce)  # fmt: skip
        return out, v

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None,
        steering: SteeringHook | None = None,
        progress: bool = False,
    ) -> Trajectory:
        """``batch`` particles of this prompt through the one sampler loop (``sample``), optionally hooked."""
        cond, uncond = self._batch_conds(batch)
        return sample(self.flow, cond, self.times, shape=self.shape, generator=generator, sde=self.sde,
                      guidance_scale=self.guidance_scale, uncond=uncond, guidance=self.guidance,
                      steering=steering, keep_states=False, progress=progress)  # fmt: skip

    def initial_noise(self, batch: int, generator: torch.Generator | None) -> Tensor:
        """``(batch, *shape)`` standard normal starting points."""
        return torch.randn((batch, *self.shape), generator=generator, device=self.flow.device, dtype=torch.float32)

    def score(self, latents: Tensor, where: str = "terminal reward") -> Tensor:
        """``(B,)`` float32 terminal rewards of clean latents, checked finite."""
        with torch.no_grad():
            return check_rewards(self.reward(latents), where)


@dataclass
class SteeringResult:
    """What a steering method returns.

    Attributes:
        latents: ``(n, C, H, W)`` the returned samples' clean latents.
        rewards: ``(n,)`` their terminal rewards.
        nfe: model evaluations spent (per-sample rows, as counted by the flow).
        method: the method's name.
        info: method-specific extras (e.g. the tree, the number of resampling events, all candidates' rewards).
    """

    latents: Tensor
    rewards: Tensor
    nfe: int
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def aux_generator(
    generator: torch.Generator | None, stream: int, device: torch.device | str | None = None
) -> torch.Generator:
    """A generator for a method's own random choices (resampling, selection, look-ahead noise), seeded from the
    sampling generator's seed and ``stream`` without drawing from it: the sampling noise stream stays exactly the
    one plain sampling would use. ``device``: where it draws (default: the sampling generator's device); choices
    made on CPU tensors, such as the tree's, need a CPU generator even when sampling runs on a GPU."""
    base = generator.initial_seed() if generator is not None else torch.initial_seed()
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return torch.Generator(device=device).manual_seed((base * 1_000_003 + 7919 * stream) % (2**63 - 1))


def log_mean_exp(values: Tensor, dim: int = -1) -> Tensor:
    """``log(mean(exp(values)))`` along ``dim``, computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def effective_sample_size(log_weights: Tensor) -> float:
    """ESS ``1 / sum(w_i^2)`` of normalised weights ``w = softmax(log_weights)``."""
    w = torch.softmax(log_weights.double(), dim=0)
    return float(1.0 / (w**2).sum())


def systematic_resample(log_weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """``(K,)`` long indices drawn by systematic resampling (one uniform offset; equal weights give the identity,
    so resampling never reshuffles particles that are not weighted apart)."""
    k = log_weights.shape[0]
    if bool((log_weights == log_weights[0]).all()):
        return torch.arange(k)
    w = torch.softmax(log_weights.double().cpu(), dim=0)
    u = torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu")
    positions = (u.double().cpu() + torch.arange(k, dtype=torch.float64)) / k
    cumulative = torch.cumsum(w, dim=0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, positions, right=True).clamp(max=k - 1)


def chunks(total: int, size: int) -> Sequence[int]:
    """Batch sizes that add up to ``total``, each at most ``size``."""
    return [min(size, total - start) for start in range(0, total, size)]
