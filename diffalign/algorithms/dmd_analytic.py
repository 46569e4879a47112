"""DMD2 on an exact teacher: distilling the rectified flow to a Gaussian mixture into a few-step MLP student.

The teacher is ``GaussianMixtureFlow`` (``diffalign/steering/analytic.py``): its velocity, hence its clean estimate
``x0_real = x_t - t v_real(x_t)`` and its ODE samples, are exact, and the data distribution can be sampled, so the
student's distance to the data (``energy_distance``) measures the distillation alone. The maths is that of
``diffalign/algorithms/dmd.py`` (Yin et al. 2024, arXiv 2405.14867), without prompts, CFG, LoRA or the shared loop:

- **init**: one MLP ``v(x, t)`` is regressed on the exact teacher velocity at ``x_t = (1 - t) x0 + t eps`` (data
  ``x0``, ``t`` uniform); the student G and the fake score F both start as copies of it (DMD2 starts both from the
  teacher);
- **student sampler** on ``sigmas`` (``s_0 = 1 > ... > s_K = 0``): from ``x_0 = z``, each step takes the clean
  estimate ``x0_hat = x_i - s_i v_G(x_i, s_i)`` and re-noises it, ``x_{i+1} = (1 - s_{i+1}) x0_hat + s_{i+1} z'``
  (``cps_step`` with ``noise_level=1``, DMD2's multi-step rule); the sample is the last clean estimate;
- **generator step** (backward simulation): at the stop step ``k`` (``stop``: ``last``, ``k = K - 1``, or
  ``random``, uniform over the ``K`` steps, one per batch), G runs ``k`` steps without gradient to ``x_k``, and its
  clean estimate ``x = x_k - s_k v_G(x_k)`` is trained by
  ``L_DM = 1/2 mean (x - sg[x - g])^2`` with ``g = normalised_dm_direction(x, x0_real, x0_fake)`` at
  ``x_t = (1 - t) x + t eps``, ``t`` uniform over ``dm_time_range``;
- **fake-score step**: flow matching on G's detached clean estimates ``x`` at a stop step drawn the same way,
  ``L_F = mean |v_F(x_t) - (eps - x)|^2``, ``fake_steps`` of them per generator step (the two time-scale rule),
  each on a fresh batch.

``stop`` defaults to ``last`` (``dmd.stop: last``): with ``random`` the fake score, which is not told the step, models
the mixture of all steps' clean estimates, of which the first (from pure noise, the teacher's blurry posterior mean
at the start) is far from the data, and its gradient then degrades the last step's samples (``docs/dmd.md``).

``research/dmd_analytic.py`` records the numbers (``docs/dmd.md``, "Analytic check").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from diffalign.algorithms.dmd import normalised_dm_direction
from diffalign.config import ConfigError, check_sigmas
from diffalign.sampling.sampler import sample
from diffalign.sampling.steps import cps_step
from diffalign.steering.analytic import GaussianMixture, GaussianMixtureFlow

__all__ = [
    "AnalyticDMDConfig",
    "VelocityMLP",
    "euler_samples",
    "fit_teacher",
    "student_samples",
    "student_state",
    "train_student",
]


class VelocityMLP(nn.Module):
    """A velocity field ``v(x, t)`` on ``(B, D, 1, 1)`` states: an MLP on ``[x, t, sin/cos(pi k t)]``, SiLU."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, freqs: int = 4) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.pi * torch.arange(1, freqs + 1, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x``: ``(B, D, 1, 1)``; ``t``: time in [0, 1], scalar or ``(B,)``. Returns ``(B, D, 1, 1)``."""
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).expand(b).reshape(b, 1)
        features = torch.cat([x.reshape(b, -1), t, torch.sin(t * self.freqs), torch.cos(t * self.freqs)], dim=1)
        return self.net(features).view_as(x)


@dataclass(kw_only=True)
class AnalyticDMDConfig:
    """Settings of the analytic distillation (module docstring).

    Attributes:
        sigmas: the student's times, strictly decreasing from 1 to 0 (``[1, 0]``: one step).
        init_steps, init_lr: the regression of the shared initial MLP on the teacher velocity.
        generator_steps: generator updates; ``fake_steps``: fake-score updates per generator update.
        stop: the step whose clean estimates both losses use: ``last`` or ``random`` (module docstring).
        batch_size: samples per update (both networks).
        lr, fake_lr: Adam learning rates of G and F.
        dm_time_range: ``[lo, hi]`` range of the uniform re-noising time of both losses.
        hidden, depth: the MLPs' width and number of hidden layers.
        seed: seeds the networks' initialisation and every draw.
    """

    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])
    init_steps: int = 1500
    init_lr: float = 2e-3
    generator_steps: int = 400
    fake_steps: int = 5
    batch_size: int = 256
    lr: float = 3e-4
    fake_lr: float = 1e-3
    dm_time_range: list[float] = field(default_factory=lambda: [0.02, 0.98])
    hidden: int = 128
    depth: int = 3
    stop: Literal["random", "last"] = "last"
    seed: int = 0

    def __post_init__(self) -> None:
        check_sigmas(self.sigmas, "sigmas", final_zero=True)
        if self.sigmas[0] != 1:
            raise ConfigError(f"config key 'sigmas': the student starts from pure noise, s_0 = 1; got {self.sigmas}")
        lo_hi = self.dm_time_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ConfigError(f"config key 'dm_time_range': need 0 <= lo < hi <= 1, got {self.dm_time_range}")
        if self.stop not in ("random", "last"):
            raise ConfigError(f"config key 'stop': 'random' or 'last', got {self.stop!r}")


def fit_teacher(
    mixture: GaussianMixture, cfg: AnalyticDMDConfig, generator: torch.Generator
) -> tuple[VelocityMLP, list[float]]:
    """An MLP regressed on the exact teacher velocity at ``x_t`` of data draws, ``t ~ U(0, 1)``, and its loss
    curve (mean squared error per coordinate, one value per step)."""
    teacher = GaussianMixtureFlow(mixture)
    with torch.random.fork_rng():  # the initial weights from cfg.seed, leaving the global generator alone
        torch.manual_seed(cfg.seed)
        net = VelocityMLP(mixture.dim, cfg.hidden, cfg.depth)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.init_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.init_steps)
    losses = []
    for _ in range(cfg.init_steps):
        x0 = mixture.sample(cfg.batch_size, generator).view(cfg.batch_size, -1, 1, 1)
        t = torch.rand(cfg.batch_size, generator=generator)
        x_t = _renoise(x0, t, torch.randn(x0.shape, generator=generator))
        loss = (net(x_t, t) - teacher.velocity(x_t, t, teacher.cond(cfg.batch_size))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return net, losses


def _renoise(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t eps`` with per-sample ``t`` ``(B,)``."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps


def student_state(
    net: nn.Module, sigmas: list[float], stop: int, n: int, dim: int, generator: torch.Generator
) -> Tensor:
    """``(n, dim, 1, 1)`` the re-noising sampler's state at ``sigmas[stop]`` (``stop`` steps from pure noise, no
    gradient)."""
    x = torch.randn((n, dim, 1, 1), generator=generator)
    with torch.no_grad():
        for i in range(stop):
            z = torch.randn(x.shape, generator=generator)
            x = cps_step(x, net(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise_level=1.0, noise=z).x_next
    return x


def student_samples(
    net: nn.Module, sigmas: list[float], n: int, dim: int, generator: torch.Generator, stop: int | None = None
) -> Tensor:
    """``(n, dim, 1, 1)`` the sampler's clean estimates at step ``stop`` (the last step when None), no gradient."""
    stop = len(sigmas) - 2 if stop is None else stop
    x = student_state(net, sigmas, stop, n, dim, generator)
    with torch.no_grad():
        return x - sigmas[stop] * net(x, sigmas[stop])


def euler_samples(mixture: GaussianMixture, steps: int, n: int, generator: torch.Generator) -> Tensor:
    """``(n, D)`` samples of the teacher's Euler ODE on ``steps`` uniform steps (the toolkit's ``sample`` loop)."""
    flow = GaussianMixtureFlow(mixture)
    x_init = torch.randn((n, mixture.dim, 1, 1), generator=generator)
    final = sample(flow, flow.cond(n), torch.linspace(1, 0, steps + 1), x_init=x_init, keep_states=False).final
    return final.reshape(n, -1)


def train_student(
    mixture: GaussianMixture, cfg: AnalyticDMDConfig, init: VelocityMLP | None = None
) -> tuple[VelocityMLP, dict[str, list[float]]]:
    """DMD2 from ``init`` (``fit_teacher``'s network when None, also F's start); returns G and the loss curves
    (``dm``: the generator loss ``1/2 mean g^2`` per update; ``fake``: F's flow-matching loss per update)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if init is None:
        init, _ = fit_teacher(mixture, cfg, gen)
    teacher = GaussianMixtureFlow(mixture)
    student, fake = copy.deepcopy(init), copy.deepcopy(init)
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.fake_lr)
    lo, hi = cfg.dm_time_range
    b, dim, num_steps = cfg.batch_size, mixture.dim, len(cfg.sigmas) - 1
    curves: dict[str, list[float]] = {"dm": [], "fake": []}
    cond = teacher.cond(b)

    def stop_step() -> int:
        return int(torch.randint(num_steps, (), generator=gen)) if cfg.stop == "random" else num_steps - 1

    def times() -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    for _ in range(cfg.generator_steps):
        for _ in range(cfg.fake_steps):  # F follows G's current samples (two time-scale rule)
            x = student_samples(student, cfg.sigmas, b, dim, gen, stop_step())
            t, eps = times(), torch.randn(x.shape, generator=gen)
            loss_f = (fake(_renoise(x, t, eps), t) - (eps - x)).square().mean()
            opt_f.zero_grad()
            loss_f.backward()
            opt_f.step()
            curves["fake"].append(float(loss_f.detach()))
        # backward simulation: k steps without gradient, then G's clean estimate at step k with gradient
        stop = stop_step()
        s = cfg.sigmas[stop]
        x_k = student_state(student, cfg.sigmas, stop, b, dim, gen)
        x = x_k - s * student(x_k, s)
        t, eps = times(), torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            x_t = _renoise(x, t, eps)
            tt = t.view(-1, 1, 1, 1)
            x0_real = x_t - tt * teacher.velocity(x_t, t, cond)
            x0_fake = x_t - tt * fake(x_t, t)
        g, _ = normalised_dm_direction(x, x0_real, x0_fake)
        loss_g = 0.5 * (x - (x - g.float()).detach()).square().mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        curves["dm"].append(float(loss_g.detach()))
    return student, curves
