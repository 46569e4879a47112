"""RTDMD: reward-tilted distribution matching for few-step flow generators, in two stages on the DMD2 seam.

Reference: the RTDMD paper and its public code (``Harahan/RTDMD`` at 6c3cb03: ``rtdmd/trainers/ac_dmd_trainer.py``,
``ac_dmd_utils.py``, ``rtdmd_trainer.py``, ``grpo_trainer.py``, ``configs/{cold_start,rtdmd}/*.yaml``), read as
written up in ``shared/reference/wave2_reference.md`` section 3. Minimising ``KL(p_theta || p_teacher exp(beta r))``
splits into distribution matching to the teacher plus reward maximisation; the code balances the two by loss
weights (no beta).

The networks are DMD's (``diffalign.algorithms.dmd``): one transformer, the **teacher** with every adapter off,
the **generator** G (LoRA ``default``, registered as ``policy``) and the **fake score** F (LoRA ``fake_score``).
The student samples ``K`` CPS steps (``cps_step``, ``eta = rtdmd.eta``, 0.9) on the shifted times
``sigma_0 = 1 > ... > sigma_K = 0`` of ``dmd.sigmas``, without CFG; step ``i`` goes from ``sigma_i`` to
``sigma_{i+1}``, and the last one, ending at 0, is deterministic (its CPS std ``sigma_K sin(eta pi / 2)`` is 0).
``rtdmd.stage`` says which stage a run is.

**Stage 1, AC-DMD cold start** (``stage: cold_start``). Per epoch (one iteration): draw the stop index
``k ~ U{1..K}`` (the same on every process) and run steps ``0..k-1`` of G from noise; only step ``k-1`` is re-run
with gradient in the generator loss (gradient truncation). The sub-interval boundary is ``s = sigma_k`` (the next
sigma, the code's ``start_mode = next_sigma``) and ``x_s`` the output of that last executed step: noisy unless
``k = K``. Every term re-noises ``x_s`` to a time ``t' ~ U(s + 0.01, 1]`` clamped to [0.02, 0.98] (uniform in the
unshifted time, one draw per sample, shared by all processes) with the kernel that keeps the flow's marginals
(``a^2 s^2 + sigma_t's^2 = t'^2``)::

    x_t' = a x_s + sigma_t's eps,    a = (1 - t') / (1 - s),    sigma_t's = sqrt(t'^2 - a^2 s^2)

1. every epoch, one **fake-score step** on G's detached ``x_s``: the ambient-consistent target (the unbiased target
   for ``E[x0 | x_t']`` when only the noisy ``x_s`` is seen; at ``s = 0`` it is flow matching's ``eps - x0``)::

       v* = -x_s / (1 - s) + [t' + (1 - t') s^2 / (1 - s)^2] / sigma_t's * eps
       L_AC = mean( w (sigma_t's v_F(x_t', t') - sigma_t's v*)^2 ),    w = clamp(1 / sigma_t's^2, 0, 10)

   (the code's ``move_scale_out``: a plain velocity MSE where ``sigma_t's >= 0.316``), plus ``1e-2 L_cons``, the
   consistency of F's denoiser ``h(x, tau) = x - tau v_F(x, tau)`` along two independent CPS transitions
   ``x''_1, x''_2`` from ``x_t'`` to ``t'' = max(t' - U{1..200}/1000, 0)``, made with the detached ``v_F(x_t')``::

       L_cons = mean( (h(x''_1, t'') - h_a) * (h(x''_2, t'') - h_a) ),    h_a = h(x_t', t')

   with gradient into all three: an unbiased estimate of ``|| E[h(x'') | x_t'] - h_a ||^2`` (it can be negative
   on one batch).
2. every ``dmd.generator_every``-th epoch (RTDMD: 10), first one **generator step**: teacher (CFG
   ``dmd.real_guidance_scale``) and F predict at ``x_t'``, and each prediction is mapped back to ``s`` by one CPS
   step with the same noise ``z'``, giving ``x_s^T`` and ``x_s^F`` (``z'`` cancels in their difference)::

       g = (x_s^F - x_s^T) / mean_CHW |x_s - x_s^T|        L_DM = 1/2 mean (x_s - sg[x_s - g])^2   (float64)

   which at ``s = 0`` is exactly DMD's loss in x0 space.
3. the generator's EMA (``train.ema_decay``, 0.99) is updated every epoch, fake-only ones included (``0.99^10``
   per generator step at ``generator_every`` 10), as the code does. Set ``train.ema_every: 1``.

One rollout per epoch serves both steps (DMD2's order: generator, then F on the same detached samples); the code
draws one rollout per update.

**Stage 2, RL with the hybrid policy gradient** (``stage: rl``, ``rtdmd.cold_start``: the stage-1 run folder).
The cold-start generator (its EMA, ``final/``) and fake score (``fake_score/``) are loaded as frozen adapters
that are active together with fresh LoRAs (``default``, ``fake_score``) trained on top: the sum of two LoRAs is
the code's merge of the first into the weights, while the base stays the teacher. Per epoch:

1. **SubGRPO**: the steps ``S`` trained by the policy gradient, ``rtdmd.num_train_steps`` (2) of the stochastic
   steps in ``rtdmd.train_steps_range`` (all but the last), drawn by ``random.Random(seed + 100000 epoch + 104729)``:
   the same on every process without a collective.
2. Roll out ``rtdmd.prompts_per_epoch`` prompts x ``rtdmd.group_size`` samples with the student's CPS sampler.
   The stochastic steps not in ``S`` use **prompt-deterministic shared noise**: drawn on a CPU generator seeded
   with the first 4 bytes of SHA-256(prompt) + 10007 step + the epoch's seed, so every member of a group (on any
   process) gets the same noise there; the initial noise is per sample. Log-probs: the Gaussian density of each
   CPS transition, averaged over latent elements (Flow-GRPO's ``mean``).
3. Advantages: per reward, ``(r - mean_prompt) / (global std + 1e-4)``, weighted by the reward weights and summed,
   then standardised over the epoch; clipped to ``+-rtdmd.adv_clip_max`` (5).
4. One **fake-score step** on the rollout cache (before the policy step): the stage-1 loss at ``s = 0`` on the
   recorded clean latents (flow matching with the same clamp weight) plus the consistency term.
5. One **generator step**, averaged over the micro-batches and the trained steps ``S + {K-1}``, each at its
   recorded latent (no gradient through earlier steps):

   - ``j in S``: PPO, ``L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``,
     ``ratio = exp(log p_theta - log p_old)``;
   - ``j = K-1`` (deterministic: no density, its likelihood-ratio gradient is zero): ``rtdmd.dm_weight`` (1e-3)
     x the AC-DMD generator loss at ``s = 0`` on ``x0 = x_{K-1} - sigma_{K-1} v_theta`` (fresh ``t'``), plus reward
     back-propagation ``rtdmd.bp_weight`` (1e-4) x ``mean(ReLU(rtdmd.bp_margin - sum_k w_k r_k(decode(x0))))`` over
     the **differentiable** training rewards (off, and logged, when there is none; the world's rewards are not).

Defaults, with the anchors' values: ``eta`` 0.9; re-noise margin 0.01 and clamp [0.02, 0.98]; weight clamp 10;
consistency weight 1e-2 with gaps up to 0.2 (``epsilon_timestep 200``); stage 2: 2 SubGRPO steps of the 3
stochastic ones, PPO clip 1e-5 and advantage clip 5, DM weight 1e-3, BP weight 1e-4 with margin 3, group 24
(here 8), a single optimizer step per epoch for each network. The code's PPO log-prob is ``-mean((x' - mu)^2)``
without the variance; ours is the normalised Gaussian density, sharper by ``1 / (2 std^2)`` (1 to 8 on the
4-step schedule), so the same clip range is tighter here. Other stage-1/2 settings come from ``dmd.*``,
``lora.*`` and ``train.*`` (RTDMD: LoRA r32/alpha64 on both networks, lr 3e-5 in stage 1 and 3e-6 in stage 2,
AdamW wd 0 in stage 1, 1e-4 in stage 2, clip 1, EMA 0.99 per iteration in stage 1 and 0.9 every 8 steps in stage 2).

**Export**: ``final/`` is the student as one diffusers LoRA (in stage 2 the cold-start LoRA and the fresh one
concatenated into one of their summed rank, exactly their sum) with DMD's ``student.json`` and ``sigmas.json``,
and ``fake_score/`` the fake score's LoRA (what stage 2 starts from). ``student.json`` records the CPS sampler
(``sampler``, ``eta``): the stock ``FlowMatchEulerDiscreteScheduler`` runs the student's times and weights, but
samples CPS only at ``eta = 1`` (``stochastic_sampling=True``: ``x' = (1 - t') x0_hat + t' z``); for ``eta < 1``
the student needs a CPS scheduler (``diffalign sample`` with ``sampling.sde=cps``), and a stock Euler call is the
``eta = 0`` approximation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft.utils import get_peft_model_state_dict
from torch import Tensor

from diffalign.algorithms.dmd import FAKE, GENERATOR, DMDJob, DMDTrainer, _EvalConfig, _EvalView, student_sampling
from diffalign.algorithms.flow_grpo import group_advantages
from diffalign.config import ConfigError
from diffalign.release import STUDENT_FILE
from diffalign.sampling.sampler import guided_velocity
from diffalign.sampling.steps import cps_step
from diffalign.training.evaluation import Evaluator
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, check_finite, derive_layout, seeded
from diffalign.types import Cond

log = logging.getLogger("diffalign.rtdmd")

#: The frozen cold-start adapters of stage 2 (active together with the trained ``default`` / ``fake_score``).
COLD_GENERATOR, COLD_FAKE = "cold_start", "cold_fake_score"
#: The fake score's export folder in the run folder (what stage 2 loads beside ``final/``).
FAKE_DIR = "fake_score"


# ================================================================================================ the maths
def renoise(x_s: Tensor, s: float, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The forward kernel from the boundary ``s`` to ``t > s``: ``x_t = a x_s + sigma_ts noise``.

    Args:
        x_s: ``(B, C, H, W)`` states at time ``s`` (marginally ``(1 - s) x0 + s eps``).
        s: the boundary time in [0, 1).
        t: ``(B,)`` target times in (s, 1].
        noise: ``(B, C, H, W)`` standard normal.

    Returns:
        ``x_t`` ``(B, C, H, W)`` float32 and ``sigma_ts`` ``(B,)``: with ``a = (1 - t)/(1 - s)`` and
        ``sigma_ts = sqrt(t^2 - a^2 s^2)``, ``x_t`` has the flow's marginal ``(1 - t) x0 + t eps`` at ``t``.
    """
    t = t.float().to(x_s.device)
    a = (1 - t) / (1 - s)
    sigma = torch.sqrt((t**2 - a**2 * s**2).clamp_min(0))
    return a.view(-1, 1, 1, 1) * x_s.float() + sigma.view(-1, 1, 1, 1) * noise.float(), sigma


def ambient_target(x_s: Tensor, s: float, t: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The ambient-consistent velocity target ``v*`` ``(B, C, H, W)`` at ``x_t = renoise(x_s, s, t, noise)``.

    ``v* = -x_s/(1 - s) + [t + (1 - t) s^2/(1 - s)^2] / sigma_ts * noise``; ``x_t - t v*`` is then an unbiased
    regression target for ``E[x0 | x_t]`` although only the noisy ``x_s`` is observed, and at ``s = 0`` ``v*`` is
    flow matching's ``noise - x_s`` (``ac_dmd_utils.flow_forward_target_v2``)."""
    t, sigma = t.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    return -x_s.float() / (1 - s) + (t + (1 - t) * s**2 / (1 - s) ** 2) / sigma * noise.float()


def ambient_loss(v: Tensor, target: Tensor, sigma: Tensor, max_weight: float = 10.0) -> Tensor:
    """``mean(w (sigma v - sigma v*)^2)`` with ``w = clamp(1/sigma^2, 0, max_weight)`` (``move_scale_out``): the plain
    velocity MSE where ``sigma^2 >= 1/max_weight``, down-weighted by ``max_weight sigma^2`` below. 0-d float32."""
    sigma = sigma.float().view(-1, 1, 1, 1)
    weight = (1 / sigma**2).clamp(0, max_weight)
    return (weight * (sigma * v.float() - sigma * target.float()) ** 2).mean()


def consistency(h_1: Tensor, h_2: Tensor, h_anchor: Tensor) -> Tensor:
    """``mean((h_1 - h_a) (h_2 - h_a))``: with ``h_1``, ``h_2`` independent given the anchor, an unbiased estimate
    of ``|| E[h] - h_a ||^2`` (averaged over elements); with ``h_1 = h_2`` the MSE. 0-d."""
    return ((h_1.float() - h_anchor.float()) * (h_2.float() - h_anchor.float())).mean()


def renoise_times(s: float, n: int, generator: torch.Generator, margin: float = 0.01,
                  clamp: Sequence[float] = (0.02, 0.98)) -> Tensor:  # fmt: skip
    """``(n,)`` times ``t' ~ U(s + margin, 1]`` clamped to ``clamp``, uniform in the (unshifted) time."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = (s + margin) + (1 - s - margin) * (1 - u)  # 1 - u in (0, 1]: the interval is open at s + margin
    return t.clamp(clamp[0], clamp[1]).float()


def consistency_times(t: Tensor, generator: torch.Generator, max_gap: float = 0.2) -> Tensor:
    """``(B,)`` ``t'' = max(t' - U{1..1000 max_gap}/1000, 0)``, the consistency target times below ``t`` ``(B,)``."""
    gaps = torch.randint(1, round(1000 * max_gap) + 1, t.shape, generator=generator).float() / 1000
    return (t.cpu() - gaps).clamp_min(0)


def subgrpo_steps(seed: int, epoch: int, candidates: Sequence[int], count: int) -> list[int]:
    """The SubGRPO steps of ``epoch``: ``count`` of the ``candidates`` (sorted), from
    ``random.Random(seed + 100000 epoch + 104729)`` (``rtdmd_trainer._sample_selected_steps``): a function of the
    seed and the epoch only, so every process draws the same without a collective."""
    rng = random.Random(seed + epoch * 100000 + 104729)
    return sorted(rng.sample(list(candidates), count))


def shared_noise(prompt: str, step: int, epoch_seed: int, shape: Sequence[int]) -> Tensor:
    """The prompt-deterministic noise ``shape`` float32 (CPU) of an unselected stochastic ``step``: a CPU generator
    seeded with the first 4 bytes of SHA-256(prompt) + 10007 step + ``epoch_seed`` (``_make_shared_noise``), so
    the same on every sample of the prompt and on every process."""
    head = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    generator = torch.Generator().manual_seed(head + 10007 * step + epoch_seed)
    return torch.randn(tuple(shape), generator=generator)


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                        adv_clip_max: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """PPO's clipped surrogate per sample ``(B,)`` and the ratio ``(B,)``:
    ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` with ``A`` clipped to ``+-adv_clip_max``."""
    ratio = torch.exp(log_prob - old_log_prob)
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


def combined_advantages(table: Tensor, weights: Sequence[float], groups: Tensor, eps: float = 1e-4) -> Tensor:
    """RTDMD's advantages ``(N,)`` from the ``(N, R)`` reward table of the epoch: per reward the group advantage with
    the global std, weighted and summed, then standardised over the epoch (``weight_advantages``)."""
    columns = [w * group_advantages(table[:, k], groups, global_std=True, eps=eps) for k, w in enumerate(weights)]
    total = torch.stack(columns).sum(dim=0)
    return (total - total.mean()) / (total.std(unbiased=False) + eps)


# ================================================================================================ config
@dataclass(kw_only=True)
class RTDMDConfig:
    """RTDMD settings (the anchors' values in the module docstring; shared ones live in ``dmd.*``).

    Attributes:
        stage: ``cold_start`` (AC-DMD) or ``rl`` (the hybrid policy gradient from a cold-start run).
        eta: the student's CPS noise level in (0, 1] (``dmd.cps_eta``, ``grpo.noise_level``: 0.9).
        renoise_margin, renoise_clamp: the re-noising times ``t' ~ U(s + margin, 1]`` clamped to ``[lo, hi]``.
        max_weight: the clamp of the fake score's weight ``1/sigma_ts^2``.
        consistency_weight: the fake score's consistency term (0: off; off in the code's FLUX.1 / FLUX.2-9B RL).
        consistency_max_gap: its target times lie up to this far below ``t'``.
        cold_start: stage ``rl``: the stage-1 run folder (its ``final/`` and ``fake_score/`` are loaded).
        prompts_per_epoch, group_size: stage ``rl``: distinct prompts per epoch (over all processes) and samples
            per prompt (the code: 48 x 24 on 8 GPUs).
        num_train_steps: SubGRPO's steps trained by PPO per epoch (2).
        train_steps_range: ``[first, last]`` step indices SubGRPO chooses from (null: every stochastic step,
            ``[0, K - 2]``; the code's ``range_start 0``, ``range_end 2``).
        shared_noise: the unselected stochastic steps use prompt-deterministic shared noise (true).
        clip_range, adv_clip_max: PPO's ratio clip (1e-5) and the advantage clip (5).
        dm_weight: the AC-DMD generator loss on the deterministic last step (``last_step_loss.weight`` 1e-3).
        bp_weight, bp_margin: reward back-propagation through the last step,
            ``bp_weight mean(ReLU(bp_margin - r))`` over the differentiable rewards (1e-4, 3.0; 0: off).
    """

    stage: Literal["cold_start", "rl"] = "cold_start"
    eta: float = 0.9
    renoise_margin: float = 0.01
    renoise_clamp: list[float] = field(default_factory=lambda: [0.02, 0.98])
    max_weight: float = 10.0
    consistency_weight: float = 1e-2
    consistency_max_gap: float = 0.2
    cold_start: str | None = None
    prompts_per_epoch: int = 4
    group_size: int = 8
    num_train_steps: int = 2
    train_steps_range: list[int] | None = None
    shared_noise: bool = True
    clip_range: float = 1e-5
    adv_clip_max: float = 5.0
    dm_weight: float = 1e-3
    bp_weight: float = 1e-4
    bp_margin: float = 3.0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key 'rtdmd.{key}': {why}")

        if not 0 < self.eta <= 1:
            raise bad("eta", f"the CPS noise level must be in (0, 1] (0 is a deterministic sampler with nothing for "
                             f"the policy gradient), got {self.eta}")  # fmt: skip
        lo, hi = (self.renoise_clamp + [0, 0])[:2]
        if len(self.renoise_clamp) != 2 or not 0 < lo < hi <= 1:
            raise bad("renoise_clamp", f"need [lo, hi] with 0 < lo < hi <= 1, got {self.renoise_clamp}")
        if not 0 < self.renoise_margin < hi:
            raise bad("renoise_margin", f"must be in (0, {hi}), got {self.renoise_margin}")
        if self.max_weight <= 0 or self.consistency_weight < 0 or not 0 < self.consistency_max_gap <= 1:
            raise bad("max_weight/consistency_weight/consistency_max_gap",
                      "need max_weight > 0, consistency_weight >= 0, 0 < consistency_max_gap <= 1")  # fmt: skip
        if self.stage == "rl" and not self.cold_start:
            raise bad("cold_start", "stage rl starts from a cold-start run: give its run folder (with final/ and "
                                    "fake_score/)")  # fmt: skip
        for key in ("prompts_per_epoch", "num_train_steps"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise bad("group_size", f"group advantages need at least 2 samples per prompt, got {self.group_size}")
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise bad("clip_range/adv_clip_max", "must be > 0")
        if self.dm_weight < 0 or self.bp_weight < 0:
            raise bad("dm_weight/bp_weight", "must be >= 0")

    def candidate_steps(self, num_steps: int) -> list[int]:
        """The step indices SubGRPO may choose for a ``num_steps``-step student (``ConfigError`` when the range
        reaches the deterministic last step or asks for more steps than it holds)."""
        stochastic = num_steps - 1
        first, last = self.train_steps_range or [0, stochastic - 1]
        if self.train_steps_range is not None and (len(self.train_steps_range) != 2 or not 0 <= first <= last):
            raise ConfigError(f"config key 'rtdmd.train_steps_range': need [first, last] with 0 <= first <= last, "
                              f"got {self.train_steps_range}")  # fmt: skip
        if last >= stochastic:
            raise ConfigError(f"config key 'rtdmd.train_steps_range': step {last} is not stochastic; a "
                              f"{num_steps}-step student has the stochastic steps 0..{stochastic - 1} (its last "
                              f"step, to t = 0, is deterministic and trained by the auxiliary terms)")  # fmt: skip
        candidates = list(range(first, last + 1))
        if self.num_train_steps > len(candidates):
            raise ConfigError(f"config key 'rtdmd.num_train_steps': {self.num_train_steps} SubGRPO steps asked for, "
                              f"but the student has {len(candidates)} stochastic steps to choose from "
                              f"({candidates})")  # fmt: skip
        return candidates


@dataclass(kw_only=True)
class RTDMDJob(DMDJob):
    """``diffalign train`` with ``algorithm: rtdmd``: the ``dmd`` section (student sigmas, ``generator_every``,
    batch size, real CFG, fake learning rate) and the ``rtdmd`` section."""

    algorithm: Literal["rtdmd"] = "rtdmd"
    rtdmd: RTDMDConfig = field(default_factory=RTDMDConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dmd.fake_per_step:
            raise ConfigError("config key 'dmd.fake_per_step': RTDMD trains one fake score on the ambient-consistent "
                              "target of every step; set it false")  # fmt: skip
        if self.dmd.regression_weight:
            raise ConfigError("config key 'dmd.regression_weight': RTDMD has no regression loss; set it 0")
        cfg = self.rtdmd
        if cfg.stage == "rl":
            cfg.candidate_steps(self.dmd.num_steps)
            derive_layout(cfg.prompts_per_epoch * cfg.group_size, 1, self.dmd.batch_size, "rtdmd.group_size")
            if self.model.lora:
                raise ConfigError("config key 'model.lora': stage rl keeps the base as the teacher; give the "
                                  "cold-start run as rtdmd.cold_start instead of merging it into the "
                                  "base")  # fmt: skip


# ================================================================================================ batches
@dataclass(kw_only=True)
class ColdStartBatch(Batch):
    """One stage-1 epoch on this process (``B`` samples).

    Attributes:
        cond: the prompts' conditioning; ``stop``: ``k`` in 1..K, steps ``0..k-1`` ran (the same on every process).
        x_prev: ``(B, C, H, W)`` the state at ``sigma_{k-1}`` before the last executed step; ``z_last``: that
            step's CPS noise; ``x_s``: its output at ``s = sigma_k`` (no gradient).
        gen_t, gen_noise, gen_z: the generator loss's re-noising times ``(B,)``, noise and mapping-back noise.
        fake_t, fake_noise: the fake score's; ``cons_t``: ``(B,)`` consistency times; ``cons_z``:
            ``(2, B, C, H, W)`` the two transitions' noise.
    """

    cond: Cond
    stop: int
    x_prev: Tensor
    z_last: Tensor
    x_s: Tensor
    gen_t: Tensor
    gen_noise: Tensor
    gen_z: Tensor
    fake_t: Tensor
    fake_noise: Tensor
    cons_t: Tensor
    cons_z: Tensor


@dataclass(kw_only=True)
class RLBatch(Batch):
    """One stage-2 epoch's rollouts on this process (``N`` samples).

    Attributes:
        states: ``(N, K+1, C, H, W)`` latents; ``log_probs``: ``(N, K)`` (NaN on the deterministic last step).
        prompts, cond: the samples' prompts and conditioning; ``advantages``: ``(N,)``.
        selected: the epoch's SubGRPO steps (the same on every process).
        aux_t, aux_noise: the last step's AC-DMD re-noising (s = 0); ``fake_t``, ``fake_noise``, ``cons_t``,
            ``cons_z``: the fake score's on the recorded clean latents.
    """

    states: Tensor
    log_probs: Tensor
    prompts: list[str]
    cond: Cond
    advantages: Tensor
    selected: list[int]
    aux_t: Tensor
    aux_noise: Tensor
    fake_t: Tensor
    fake_noise: Tensor
    cons_t: Tensor
    cons_z: Tensor


@dataclass(frozen=True)
class RLMicro:
    """Stage-2 micro-batch: samples ``rows`` at step ``step`` (``None``: the fake score's), with its share of the
    optimizer step's mean."""

    rows: Tensor
    step: int | None
    share: float


# ================================================================================================ trainer
class RTDMDTrainer(DMDTrainer):
    """RTDMD over the shared loop, on DMD's networks (see the module docstring)."""

    name = "rtdmd"

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        job: RTDMDJob = ctx.cfg
        self.rt: RTDMDConfig = job.rtdmd
        self.rl = self.rt.stage == "rl"
        self.student = student_sampling(job.sampling, self.cfg.sigmas, self.rt.eta)
        hi = self.rt.renoise_clamp[1]
        if float(self.times[-2]) + self.rt.renoise_margin >= hi:
            raise ConfigError(f"config key 'dmd.sigmas': the shifted boundary {float(self.times[-2]):.3f} leaves no "
                              f"re-noising time below rtdmd.renoise_clamp's {hi} (shifted times "
                              f"{[round(float(t), 3) for t in self.times]})")  # fmt: skip
        self.fake.export, self.fake.export_dir = self._export_fake, FAKE_DIR
        self.cadence = replace(self.cadence, progress=("reward_mean", "loss_policy") if self.rl
                               else ("loss_dm", "loss_ac"))  # fmt: skip
        if self.rl:
            self._load_cold_start(self.rt.cold_start)
            self.candidates = self.rt.candidate_steps(self.cfg.num_steps)
            self.local = derive_layout(self.rt.prompts_per_epoch * self.rt.group_size, ctx.accelerator.num_processes,
                                       self.cfg.batch_size, "rtdmd.prompts_per_epoch")  # fmt: skip
            rewards = self.ft.rewards
            self.bp_rewards = {n: r for n, r in rewards.rewards.items() if r.differentiable and rewards.weights[n]}
            if self.rt.bp_weight > 0 and not self.bp_rewards:
                log.info("rtdmd: no differentiable training reward (%s): reward back-propagation is off",
                         ", ".join(rewards.rewards))  # fmt: skip

    # --------------------------------------------------------------------------------------------- adapters
    def _load_cold_start(self, folder: str) -> None:
        """Load the cold-start generator and fake score as frozen adapters beside the fresh ones."""
        transformer = self.flow.transformer
        for name, sub in ((COLD_GENERATOR, "final"), (COLD_FAKE, FAKE_DIR)):
            path = os.path.join(folder, sub)
            if not os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
                raise ConfigError(f"config key 'rtdmd.cold_start': {path!r} holds no LoRA; give the folder of a "
                                  f"finished rtdmd cold_start run")  # fmt: skip
            flags = [(p, p.requires_grad) for p in transformer.parameters()]
            self.flow.pipe.load_lora_weights(path, adapter_name=name)
            for p, flag in flags:
                p.requires_grad_(flag)
            for n, p in transformer.named_parameters():
                if f".{name}." in n:
                    p.requires_grad_(False)
        fresh, cold = (transformer.peft_config[n] for n in (GENERATOR, COLD_GENERATOR))
        if set(fresh.target_modules) != set(cold.target_modules):
            raise ConfigError(f"config key 'lora.target_modules': the fresh LoRA must target the cold-start's modules "
                              f"({sorted(cold.target_modules)}) so that the two export as one")  # fmt: skip
        flags = [(p, p.requires_grad) for p in transformer.parameters()]
        transformer.set_adapter(GENERATOR)  # (peft's switch would freeze the fake score's LoRA)
        for p, flag in flags:
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def network(self, which: str | None) -> Iterator[None]:
        """Run the flow as the teacher (None), the generator (``GENERATOR``) or the fake score (``FAKE``): in stage 2
        the trained adapter together with its frozen cold-start one."""
        with self.flow.adapter(which):
            if self.rl and which is not None:
                transformer = self.flow.transformer
                flags = [(p, p.requires_grad) for p in transformer.parameters()]
                transformer.set_adapter([COLD_GENERATOR if which == GENERATOR else COLD_FAKE, which])
                for p, flag in flags:
                    p.requires_grad_(flag)
            yield

    # --------------------------------------------------------------------------------------------- shared terms
    def cps(self, x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, noise: Tensor) -> Tensor:
        """The student's CPS transition ``x -> x'`` ``(B, C, H, W)`` with the given noise."""
        return cps_step(x, v, t, t_next, noise_level=self.rt.eta, noise=noise).x_next

    @torch.no_grad()
    def ac_direction(self, x_s: Tensor, s: float, t: Tensor, noise: Tensor, z: Tensor, cond: Cond
                     ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The AC-DMD direction ``g`` ``(B, C, H, W)`` float64 at the boundary states ``x_s`` (time ``s``), and its
        normaliser ``mean_CHW |x_s - x_s^T|`` ``(B,)``: teacher (with CFG) and fake score at
        ``renoise(x_s, s, t, noise)``, each mapped back to ``s`` by a CPS step with the noise ``z``."""
        x_t, _ = renoise(x_s, s, t, noise)
        with self.network(None):
            v_real = guided_velocity(self.flow, x_t, t, cond, guidance_scale=self.real_scale,
                                     guidance=self.cfg.real_guidance)  # fmt: skip
        with self.network(FAKE):
            v_fake = self.flow.velocity(x_t, t, cond)
        x_real = self.cps(x_t, v_real, t, s, z).double()
        x_fake = self.cps(x_t, v_fake, t, s, z).double()
        scale = (x_s.double() - x_real).abs().mean(dim=(1, 2, 3))
        return torch.nan_to_num((x_fake - x_real) / scale.view(-1, 1, 1, 1)), scale

    def dm_loss(self, x_s: Tensor, s: float, t: Tensor, noise: Tensor, z: Tensor, cond: Cond) -> dict[str, Tensor]:
        """``loss_dm = 1/2 mean (x_s - sg[x_s - g])^2`` (float64; its gradient w.r.t. ``x_s`` is ``g / numel``)."""
        g, scale = self.ac_direction(x_s.detach(), s, t, noise, z, cond)
        x = x_s.double()
        return {"loss_dm": 0.5 * F.mse_loss(x, (x - g).detach()), "dm_scale": scale,
                "dm_direction": g.flatten(1).norm(dim=1)}  # fmt: skip

    def fake_terms(self, x_s: Tensor, s: float, t: Tensor, noise: Tensor, cons_t: Tensor, cons_z: Tensor,
                   cond: Cond) -> dict[str, Tensor]:  # fmt: skip
        """``loss_ac`` (the ambient-consistent flow matching of F on the detached ``x_s``) and ``loss_consistency``
        (``rtdmd.consistency_weight L_cons``, when on)."""
        x_t, sigma = renoise(x_s, s, t, noise)
        target = ambient_target(x_s, s, t, noise, sigma)
        flow, tt = self.flow, t.to(x_s.device)
        with self.network(FAKE):
            v = flow.velocity(x_t, tt, cond)
        terms = {"loss_ac": ambient_loss(v, target, sigma, self.rt.max_weight), "renoise_sigma": sigma}
        if self.rt.consistency_weight > 0:
            h_anchor = x_t - tt.view(-1, 1, 1, 1) * v.float()
            t2 = cons_t.to(x_s.device)
            with torch.no_grad():
                branches = [self.cps(x_t, v.detach(), tt, t2, z) for z in cons_z]
            with self.network(FAKE):
                v2 = flow.velocity(torch.cat(branches), torch.cat([t2, t2]), Cond.cat([cond, cond]))
            h_1, h_2 = (torch.cat(branches) - torch.cat([t2, t2]).view(-1, 1, 1, 1) * v2.float()).chunk(2)
            terms["loss_consistency"] = self.rt.consistency_weight * consistency(h_1, h_2, h_anchor)
        return terms

    # --------------------------------------------------------------------------------------------- collect
    def collect(self, epoch: int) -> ColdStartBatch | RLBatch:
        return self.collect_rl(epoch) if self.rl else self.collect_cold_start(epoch)

    @torch.no_grad()
    def collect_cold_start(self, epoch: int) -> ColdStartBatch:
        ctx, cfg, flow = self.ctx, self.cfg, self.flow
        rank, device, n = ctx.accelerator.process_index, ctx.device, cfg.batch_size
        rng = np.random.default_rng([ctx.seed, rank, epoch, 1])
        prompts = [self.ft.prompts[i] for i in rng.integers(len(self.ft.prompts), size=n)]
        cond = self.encode(prompts).to(device)
        stop = 1 + int(np.random.default_rng([ctx.seed, epoch, 2]).integers(cfg.num_steps))  # shared by processes
        gen = seeded(ctx.seed, rank, epoch, 3)
        x = torch.randn((n, *self.shape), generator=gen).to(device)
        with ctx.accelerator.autocast(), self.network(GENERATOR):
            for i in range(stop):
                z = torch.randn((n, *self.shape), generator=gen).to(device)
                x_prev = x
                v = flow.velocity(x, float(self.times[i]), cond)
                x = self.cps(x, v, float(self.times[i]), float(self.times[i + 1]), z)
        s, margin, clamp = float(self.times[stop]), self.rt.renoise_margin, self.rt.renoise_clamp
        shared = seeded(ctx.seed, epoch, 4)  # the re-noising times are the same on every process (as the code's)
        gen_t, fake_t = (renoise_times(s, n, shared, margin, clamp) for _ in range(2))
        cons_t = consistency_times(fake_t, shared, self.rt.consistency_max_gap)

        def normal(*lead: int) -> Tensor:
            return torch.randn((*lead, n, *self.shape), generator=gen).to(device)

        return ColdStartBatch(cond=cond, stop=stop, x_prev=x_prev.float(), z_last=z.float(), x_s=x.float(),
                              gen_t=gen_t.to(device), gen_noise=normal(), gen_z=normal(), fake_t=fake_t.to(device),
                              fake_noise=normal(), cons_t=cons_t.to(device), cons_z=normal(2),
                              metrics={"stop_step": float(stop), "boundary": s})  # fmt: skip

    def rollout(self, cond: Cond, prompts: Sequence[str], x_init: Tensor, selected: Sequence[int] | None,
                epoch_seed: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The student's CPS trajectory ``(B, K+1, C, H, W)`` and log-probs ``(B, K)`` from ``x_init``: fresh noise
        from ``generator`` on the ``selected`` stochastic steps (None: on all), the prompts' shared noise on the
        others (when ``rtdmd.shared_noise``), none on the deterministic last step."""
        flow, times, eta = self.flow, self.times, self.rt.eta
        x, states, log_probs = x_init.float(), [x_init.float()], []
        for i in range(len(times) - 1):
            t, t_next = float(times[i]), float(times[i + 1])
            if selected is None or i in selected or not self.rt.shared_noise or t_next == 0:
                noise = torch.randn(x.shape, generator=generator).to(x.device)
            else:
                noise = torch.stack([shared_noise(p, i, epoch_seed, x.shape[1:]) for p in prompts]).to(x.device)
            out = cps_step(x, flow.velocity(x, t, cond), t, t_next, noise_level=eta, noise=noise)
            x = out.x_next
            states.append(x)
            log_probs.append(out.log_prob)
        return torch.stack(states, dim=1), torch.stack(log_probs, dim=1)

    def epoch_seed(self, epoch: int) -> int:
        """The shared-noise seed of ``epoch`` (a function of the run's seed and the epoch only)."""
        return int(self.ctx.seed) * 1_000_003 + epoch

    @torch.no_grad()
    def collect_rl(self, epoch: int) -> RLBatch:
        ctx, acc, rt, flow, device = self.ctx, self.ctx.accelerator, self.rt, self.flow, self.ctx.device
        rng = np.random.default_rng([ctx.seed, epoch, 7])
        chosen = rng.choice(len(self.ft.prompts), size=rt.prompts_per_epoch,
                            replace=rt.prompts_per_epoch > len(self.ft.prompts))  # fmt: skip
        groups = np.repeat(np.arange(rt.prompts_per_epoch), rt.group_size)
        groups = groups[rng.permutation(len(groups))]
        start = acc.process_index * self.local
        prompts = [self.ft.prompts[chosen[g]] for g in groups[start : start + self.local]]
        selected = subgrpo_steps(ctx.seed, epoch, self.candidates, rt.num_train_steps)
        cond = self.encode(prompts).to(device)
        states, log_probs, tables = [], [], []
        names = list(self.ft.rewards.rewards)
        for b in range(0, self.local, self.cfg.batch_size):
            rows = list(range(b, b + self.cfg.batch_size))
            gen = seeded(ctx.seed, epoch, acc.process_index, b, 1)
            x_init = torch.randn((len(rows), *self.shape), generator=gen).to(device)
            with acc.autocast(), self.network(GENERATOR):
                traj, lp = self.rollout(cond.index(rows), [prompts[r] for r in rows], x_init, selected,
                                        self.epoch_seed(epoch), gen)  # fmt: skip
            out = self.ft.rewards(flow.decode_latents(traj[:, -1]), [prompts[r] for r in rows])
            check_finite(out.total, "reward", epoch)
            states.append(traj)
            log_probs.append(lp)
            tables.append(torch.stack([out.components[k] for k in names], dim=1))
        table = acc.gather(torch.cat(tables)).cpu()
        weights = [self.ft.rewards.weights[k] for k in names]
        advantages = combined_advantages(table, weights, torch.from_numpy(groups))
        total = (table * torch.tensor(weights)).sum(dim=1)
        group_std = torch.stack([total[torch.from_numpy(groups) == k].std(unbiased=False)
                                 for k in range(rt.prompts_per_epoch)])  # fmt: skip
        gen = seeded(ctx.seed, epoch, acc.process_index, 5)  # rank-local re-noising, as the code's stage 2
        n, margin, clamp = self.local, rt.renoise_margin, rt.renoise_clamp
        aux_t, fake_t = (renoise_times(0.0, n, gen, margin, clamp) for _ in range(2))
        cons_t = consistency_times(fake_t, gen, rt.consistency_max_gap)

        def normal(*lead: int) -> Tensor:
            return torch.randn((*lead, n, *self.shape), generator=gen).to(device)

        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std(unbiased=False)),
                   "zero_std_ratio": float((group_std < 1e-6).float().mean()),
                   **{f"selected_step_{j}": float(j in selected) for j in self.candidates}}  # fmt: skip
        return RLBatch(states=torch.cat(states), log_probs=torch.cat(log_probs), prompts=prompts, cond=cond,
                       advantages=advantages[start : start + self.local].to(device), selected=selected,
                       aux_t=aux_t.to(device), aux_noise=normal(), fake_t=fake_t.to(device), fake_noise=normal(),
                       cons_t=cons_t.to(device), cons_z=normal(2), metrics=metrics)  # fmt: skip

    # --------------------------------------------------------------------------------------------- update
    def update(self, batch: ColdStartBatch | RLBatch, epoch: int) -> dict[str, float]:
        if self.rl:
            return self.update_rl(batch, epoch)
        out: dict[str, float] = {}
        policy = self.ft.policy
        if self.generator_due(epoch):
            out.update(self.optimize(batch, epoch, [["generator"]], self.loss, [policy.name]))
        elif policy.ema is not None:  # the generator's EMA moves every iteration, fake-only ones included
            policy.ema.update()
        out.update(self.optimize(batch, epoch, [["fake"]], self.loss, [FAKE]))
        return out

    def update_rl(self, batch: RLBatch, epoch: int) -> dict[str, float]:
        """One fake-score step on the rollout cache, then one generator step over every micro-batch at every
        trained step (SubGRPO's and the last)."""
        chunks = torch.arange(self.local).split(self.cfg.batch_size)
        fake = [RLMicro(rows, None, rows.numel() / self.local) for rows in chunks]
        out = self.optimize(batch, epoch, [fake], self.loss, [FAKE])
        steps = [*batch.selected, self.cfg.num_steps - 1]
        share = 1 / len(steps)
        micros = [RLMicro(rows, j, share * rows.numel() / self.local) for rows in chunks for j in steps]
        out.update(self.optimize(batch, epoch, [micros], self.loss, [self.ft.policy.name]))
        return out

    def loss(self, batch: ColdStartBatch | RLBatch, micro: Any) -> dict[str, Tensor]:
        """Stage 1: ``micro`` is ``generator`` or ``fake``; stage 2: an ``RLMicro``."""
        if isinstance(micro, RLMicro):
            return self.rl_loss(batch, micro)
        if micro == "generator":
            return self.generator_loss(batch)
        return self.fake_loss(batch)

    def generator_loss(self, batch: ColdStartBatch) -> dict[str, Tensor]:
        """Stage 1's ``loss_dm`` at ``x_s``, the last executed step re-run with gradient."""
        k, flow = batch.stop, self.flow
        t, s = float(self.times[k - 1]), float(self.times[k])
        with self.network(GENERATOR):
            x_s = self.cps(batch.x_prev, flow.velocity(batch.x_prev, t, batch.cond), t, s, batch.z_last)
        return self.dm_loss(x_s, s, batch.gen_t, batch.gen_noise, batch.gen_z, batch.cond)

    def fake_loss(self, batch: ColdStartBatch) -> dict[str, Tensor]:
        """Stage 1's fake-score terms on G's detached ``x_s``."""
        return self.fake_terms(batch.x_s, float(self.times[batch.stop]), batch.fake_t, batch.fake_noise,
                               batch.cons_t, batch.cons_z, batch.cond)  # fmt: skip

    def rl_loss(self, batch: RLBatch, micro: RLMicro) -> dict[str, Tensor]:
        """Stage 2's terms of ``micro``, weighted by its share of the optimizer step: the fake score's at ``s = 0``
        (``step`` None), PPO (``loss_policy``) at a SubGRPO step, or the last step's ``loss_dm`` (x
        ``rtdmd.dm_weight``) and ``loss_bp``."""
        rows, rt, flow = micro.rows, self.rt, self.flow
        cond = batch.cond.index(rows)
        if micro.step is None:
            terms = self.fake_terms(batch.states[rows, -1], 0.0, batch.fake_t[rows], batch.fake_noise[rows],
                                    batch.cons_t[rows], batch.cons_z[:, rows], cond)  # fmt: skip
            return {k: micro.share * v if k.startswith("loss_") else v for k, v in terms.items()}
        j = micro.step
        x, t, t_next = batch.states[rows, j], float(self.times[j]), float(self.times[j + 1])
        with self.network(GENERATOR):
            v = flow.velocity(x, t, cond)
        if j != self.cfg.num_steps - 1:
            out = cps_step(x, v, t, t_next, noise_level=rt.eta, x_next=batch.states[rows, j + 1])
            per_sample, ratio = clipped_policy_loss(out.log_prob, batch.log_probs[rows, j], batch.advantages[rows],
                                                    rt.clip_range, rt.adv_clip_max)  # fmt: skip
            return {"loss_policy": micro.share * per_sample.mean(), "ratio": ratio.detach(),
                    "clipfrac": ((ratio.detach() - 1).abs() > rt.clip_range).float()}  # fmt: skip
        # the deterministic last step (t_next = 0): the clean sample x0 = x - t v, with gradient
        x0 = x.float() - t * v.float()
        terms = self.dm_loss(x0, 0.0, batch.aux_t[rows], batch.aux_noise[rows], batch.aux_noise[rows], cond)
        terms["loss_dm"] = micro.share * rt.dm_weight * terms["loss_dm"]
        if rt.bp_weight > 0 and self.bp_rewards:
            images = flow.decode_latents(x0)
            prompts = [batch.prompts[r] for r in rows.tolist()]
            reward = sum(self.ft.rewards.weights[n] * r(images, prompts) for n, r in self.bp_rewards.items())
            terms["loss_bp"] = micro.share * rt.bp_weight * F.relu(rt.bp_margin - reward).mean()
            terms["bp_reward"] = reward.detach()
        return terms

    # --------------------------------------------------------------------------------------------- export
    def _stacked_lora(self, trained: str, cold: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The frozen ``cold`` adapter and the ``trained`` one (its parameters in ``state``) as one LoRA in peft's
        state-dict format: ``A = [A_c; A_t]``, ``B = [s_c B_c, s_t B_t]`` at rank ``r_c + r_t`` and alpha = rank
        (scale 1), so that ``B A = s_c B_c A_c + s_t B_t A_t`` exactly. Returns it and its peft config dict."""
        transformer = self.flow.transformer
        configs = transformer.peft_config
        parts = {cold: get_peft_model_state_dict(transformer, adapter_name=cold),
                 trained: get_peft_model_state_dict(transformer, state_dict=state, adapter_name=trained)}  # fmt: skip
        scale = {n: configs[n].lora_alpha / configs[n].r for n in parts}
        merged = {}
        for key in parts[trained]:
            a, b = parts[cold][key].float(), parts[trained][key].float()
            if ".lora_A." in key:
                merged[key] = torch.cat([a, b], dim=0)
            else:
                merged[key] = torch.cat([scale[cold] * a, scale[trained] * b], dim=1)
        rank = configs[cold].r + configs[trained].r
        metadata = {**configs[trained].to_dict(), "r": rank, "lora_alpha": rank}
        return merged, metadata

    def _save(self, directory: str, adapter: str, cold: str, state: dict[str, Tensor]) -> None:
        if not self.rl:
            self.flow.save_lora(directory, adapter_name=adapter, state_dict=state)
            return
        merged, metadata = self._stacked_lora(adapter, cold, state)
        type(self.flow.pipe).save_lora_weights(directory, transformer_lora_layers=merged,
                                               transformer_lora_adapter_metadata=metadata,
                                               safe_serialization=True)  # fmt: skip

    def _export(self, directory: str, state: dict[str, Tensor]) -> None:
        """DMD's export (``student.json``, ``sigmas.json``) of the student's LoRA, recording its CPS sampler."""
        super()._export(directory, state)
        if self.rl:
            self._save(directory, GENERATOR, COLD_GENERATOR, state)
        path = os.path.join(directory, STUDENT_FILE)
        with open(path) as f:
            record = json.load(f)
        record.update({"sampler": "cps", "eta": self.rt.eta})
        if self.rt.eta != 1:  # at eta 1 DMD's export ships the stock stochastic scheduler
            record["stock_scheduler"] = ("FlowMatchEulerDiscreteScheduler samples CPS only at eta = 1 "
                                         "(stochastic_sampling=True); at this eta the student needs a CPS scheduler "
                                         "(diffalign: sampling.sde=cps, sampling.noise_level=eta); plain Euler is "
                                         "the eta = 0 approximation")  # fmt: skip
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    def _export_fake(self, directory: str, state: dict[str, Tensor]) -> None:
        """The fake score's LoRA (stage 2: the cold-start's and the fresh one as one)."""
        self._save(directory, FAKE, COLD_FAKE, state)

    # --------------------------------------------------------------------------------------------- loop hooks
    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        """The student with its CPS sampler (generator EMA) on every evaluation set; before training also the
        teacher with the reference sampler and with the student's steps as Euler steps with CFG (naive)."""
        out = self._evaluate(GENERATOR, self.student, self.ctx.output_dir, epoch, tag)
        if tag == "before":
            job = self.ctx.cfg
            naive = replace(self.student, guidance_scale=job.sampling.guidance_scale, sde="ode")
            for name, sampling in (("teacher", job.sampling), ("teacher_naive", naive)):
                found = self._evaluate(None, sampling, os.path.join(job.output_dir, name), epoch, tag)
                out.update({f"{name}/{k}": v for k, v in found.items()})
        return out

    def _evaluate(self, adapter: str | None, sampling: Any, folder: str, epoch: int, tag: str) -> dict[str, Any]:
        os.makedirs(folder, exist_ok=True)
        view = _EvalView(self.ft, _EvalConfig(output_dir=folder, sampling=sampling))
        with self.network(adapter):
            return Evaluator(view).run(epoch, tag)


__all__ = [
    "RTDMDConfig",
    "RTDMDJob",
    "RTDMDTrainer",
    "ambient_loss",
    "ambient_target",
    "clipped_policy_loss",
    "combined_advantages",
    "consistency",
    "renoise",
    "renoise_times",
    "shared_noise",
    "subgrpo_steps",
]
