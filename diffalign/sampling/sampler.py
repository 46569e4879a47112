"""THE denoising loop: every sampler, trainer rollout and steering method in diffalign goes through ``sample``.

Run as an ODE (``sde=None``) with the stock pipeline's noise and time grid it reproduces the stock diffusers
pipeline's latents; run with an ``SDE`` it records the Gaussian log-prob of every stochastic transition, which
``transition_log_prob`` can recompute later under other parameters (the importance ratio of Flow-GRPO).
Steering plugs in through a ``SteeringHook`` (change the velocity; select, branch or resample particles); no
pipeline is forked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.pipelines.base import FlowModel
from diffalign.sampling.steps import STEP_KINDS, Reduction, StepOutput, step
from diffalign.types import Cond, Trajectory


@dataclass(kw_only=True)
class SDE:
    """Which stochastic step to use and where.

    Attributes:
        kind: ``"flow_sde"`` (Flow-GRPO), ``"cps"`` (coefficients-preserving), ``"dance"`` (DanceGRPO).
        noise_level: the step's noise scale (Flow-GRPO ``a`` = 0.7; CPS ``eta`` 0.8-0.9; DanceGRPO ``eta`` 0.3).
        steps: indices of the stochastic steps (0 = the first, from t = 1); None = every step. The other steps
            are Euler ODE steps (Flow-GRPO-Fast / MixGRPO windows; see ``window``).
        reduce: how a transition's log-density is reduced over latent dims, ``"mean"`` or ``"sum"``.
    """

    kind: str = "flow_sde"
    noise_level: float = 0.7
    steps: Sequence[int] | None = None
    reduce: Reduction = "mean"

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS or self.kind == "ode":
            raise ValueError(f"SDE.kind must be one of {[k for k in STEP_KINDS if k != 'ode']}, got {self.kind!r}")
        if self.noise_level <= 0:
            raise ValueError(f"SDE.noise_level must be > 0 (use sde=None for an ODE), got {self.noise_level}")

    def mask(self, num_steps: int) -> Tensor:
        """``(T,)`` bool: which of ``num_steps`` steps are stochastic."""
        mask = torch.zeros(num_steps, dtype=torch.bool)
        if self.steps is None:
            mask[:] = True
            return mask
        for i in self.steps:
            if not 0 <= i < num_steps:
                raise ValueError(f"stochastic step index {i} out of range for {num_steps} steps")
            mask[i] = True
        return mask


def window(start: int, size: int) -> list[int]:
    """Step indices ``[start, start + size)``: the stochastic window of Flow-GRPO-Fast and MixGRPO."""
    if start < 0 or size < 1:
        raise ValueError(f"window needs start >= 0 and size >= 1, got start={start}, size={size}")
    return list(range(start, start + size))


@dataclass
class StepInfo:
    """What a steering hook sees after each transition.

    Attributes:
        index: step index i (the transition from ``times[i]`` to ``times[i + 1]``).
        t, t_next: the step's times (floats).
        x: ``(B, C, H, W)`` state before the step; ``v``: the (possibly steered) velocity used.
        out: the transition (``out.x_next`` the new state, ``out.log_prob`` its log-density).
        cond: conditioning of the current particles.
    """

    index: int
    t: float
    t_next: float
    x: Tensor
    v: Tensor
    out: StepOutput
    cond: Cond

    @property
    def x0_hat(self) -> Tensor:
        """``(B, C, H, W)`` the clean-sample estimate ``x - t v`` at the step's start."""
        return self.x - self.t * self.v


class SteeringHook:
    """Base class for steering: override either method; the defaults leave sampling unchanged."""

    def velocity(self, index: int, x: Tensor, t: float, v: Tensor, cond: Cond) -> Tensor:
        """Return the velocity to use at step ``index`` (``(B, C, H, W)``), e.g. ``v`` plus a drift correction."""
        return v

    def select(self, info: StepInfo) -> Tensor | None:
        """After a step, return ``(B',)`` long indices of the particles to continue (repeats branch, omissions
        prune, a multinomial draw resamples), or None to keep them all."""
        return None


def guided_velocity(
    flow: FlowModel,
    x: Tensor,
    t: Tensor | float,
    cond: Cond,
    *,
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
    guidance: float | None = None,
    detach_uncond: bool = False,
) -> Tensor:
    """Velocity with classifier-free guidance ``v_u + s (v_c - v_u)`` when ``guidance_scale != 1``.

    The unconditional and conditional halves run as one batch ``[uncond; cond]``, as the SD3 pipeline does.
    ``guidance`` is the embedded guidance of distilled checkpoints (independent of CFG). ``detach_uncond`` stops
    the gradient through ``v_u`` (as Flow-GRPO's training forward does): the value is unchanged.
    """
    if guidance_scale == 1.0:
        return flow.velocity(x, t, cond, guidance=guidance)
    if uncond is None:
        uncond = flow.empty_cond(len(cond))
    t_both = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t_both.ndim == 1:
        t_both = torch.cat([t_both, t_both])
    both = flow.velocity(torch.cat([x, x]), t_both, Cond.cat([uncond, cond]), guidance=guidance)
    v_uncond, v_cond = both.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def check_generator(generator: torch.Generator | None, device: torch.device | str) -> None:
    """Raise a clear error when ``generator`` cannot draw noise on ``device`` (e.g. a CPU generator, CUDA model)."""
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device.type} but the model runs on {device}: pass "
                         f"torch.Generator({device.type!r})")  # fmt: skip


def sample(
    flow: FlowModel,
    cond: Cond,
    times: Tensor,
    *,
    x_init: Tensor | None = None,
    shape: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
    sde: SDE | None = None,
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
    guidance: float | None = None,
    steering: SteeringHook | None = None,
    keep_states: bool = True,
    progress: bool = False,
) -> Trajectory:
    """Integrate from ``times[0]`` to ``times[-1]``.

    Args:
        flow: the model adapter.
        cond: conditioning, batch B.
        times: ``(T+1,)`` decreasing times, e.g. ``flow.time_grid(T, H, W)``.
        x_init: ``(B, C, H, W)`` initial noise; drawn from ``generator`` with ``shape`` when None.
        shape: ``(C, H', W')`` latent shape (``flow.latent_shape(H, W)``), needed when ``x_init`` is None.
        generator: source of the initial noise and of every stochastic step's noise.
        sde: stochastic steps (None: a pure Euler ODE).
        guidance_scale: CFG scale (1 = no CFG); ``uncond`` defaults to the empty prompt.
        guidance: embedded guidance for guidance-distilled checkpoints.
        steering: optional hook (``SteeringHook``).
        keep_states: record every state (``(B, T+1, C, H, W)``) or only the final one.
        progress: show a progress bar.

    Returns:
        The ``Trajectory`` (states, times, per-step log-probs, stochastic mask, NFE, ancestors).
    """
    times = times.detach().float().cpu()
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-d grid of at least 2 points, got shape {tuple(times.shape)}")
    if x_init is None or sde is not None:
        check_generator(generator, flow.device)
    if x_init is None:
        if shape is None:
            raise ValueError("pass x_init or shape")
        x_init = torch.randn((len(cond), *shape), generator=generator, device=flow.device, dtype=torch.float32)
    if x_init.shape[0] != len(cond):
        raise ValueError(f"x_init has batch {x_init.shape[0]} but cond has batch {len(cond)}")
    if guidance_scale != 1.0 and uncond is None:
        uncond = flow.empty_cond(len(cond))
    num_steps = times.shape[0] - 1
    stochastic = sde.mask(num_steps) if sde is not None else torch.zeros(num_steps, dtype=torch.bool)
    nfe_start = flow.nfe

    x = x_init.float()
    batch = x.shape[0]
    states = [x]
    log_probs: list[Tensor] = []
    ancestors = torch.arange(batch, device=x.device)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t, t_next = float(times[i]), float(times[i + 1])
        v = guided_velocity(flow, x, t, cond, guidance_scale=guidance_scale, uncond=uncond, guidance=guidance)
        if steering is not None:
            v = steering.velocity(i, x, t, v, cond)
        if stochastic[i]:
            out = step(sde.kind, x, v, t, t_next, noise_level=sde.noise_level, generator=generator, reduce=sde.reduce)
        else:
            out = step("ode", x, v, t, t_next)
        log_probs.append(out.log_prob)
        if steering is not None:
            idx = steering.select(StepInfo(i, t, t_next, x, v, out, cond))
            if idx is not None:
                idx = torch.as_tensor(idx, dtype=torch.long, device=x.device)
                out = StepOutput(out.x_next[idx], out.mean[idx], out.std[idx], out.log_prob[idx])
                cond = cond.index(idx)
                uncond = None if uncond is None else uncond.index(idx)
                states = [s[idx] for s in states] if keep_states else states
                log_probs = [lp[idx] for lp in log_probs]
                ancestors = ancestors[idx]
        x = out.x_next
        states = [*states, x] if keep_states else [x]

    return Trajectory(
        states=torch.stack(states, dim=1),
        times=times,
        log_probs=torch.stack(log_probs, dim=1),
        stochastic=stochastic,
        nfe=flow.nfe - nfe_start,
        ancestors=ancestors,
    )


def transition_log_prob(
    flow: FlowModel,
    x_t: Tensor,
    x_next: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    cond: Cond,
    *,
    sde: SDE,
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
    guidance: float | None = None,
    detach_uncond: bool = False,
) -> StepOutput:
    """Re-score a stored transition ``x_t -> x_next`` under the model's current parameters.

    Gradients flow to the model when enabled (not through the unconditional branch with ``detach_uncond``). With
    the parameters that sampled the transition this returns its sampling log-prob exactly (the importance ratio is
    1 before the first update).
    """
    v = guided_velocity(flow, x_t, t, cond, guidance_scale=guidance_scale, uncond=uncond, guidance=guidance,
                        detach_uncond=detach_uncond)  # fmt: skip
    return step(sde.kind, x_t, v, t, t_next, noise_level=sde.noise_level, x_next=x_next, reduce=sde.reduce)
