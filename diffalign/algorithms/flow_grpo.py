"""Flow-GRPO: online policy-gradient RL for flow models (Liu et al. 2025, arXiv 2505.05470), with the windowed
variants Flow-GRPO-Fast (random stochastic window) and MixGRPO (sliding window, Li et al. 2025, arXiv 2507.21802).

Per epoch (``collect``):

1. Draw ``prompts_per_epoch`` prompts (shared across processes) and repeat each ``group_size`` times; the
   ``P x K`` samples are permuted and split over processes.
2. Roll out with the SDE sampler (``sde``, ``noise_level``) for ``num_steps`` steps, stochastic on the window's
   steps and Euler elsewhere, recording every stochastic transition's log-prob ``log p_old``.
3. Score the decoded images with the ``RewardSet``; gather rewards over processes and compute per-prompt group
   advantages ``A = (r - mean_prompt(r)) / (std + 1e-4)``, with the std over the whole epoch (``global_std``,
   Flow-GRPO's default) or within the group. Several rewards combine as ``balance.method`` says (``sum``: the
   advantage of the weighted total; ``gdpo``; ``marble``: per-reward advantages and gradients balanced by the
   min-norm QP; see ``diffalign.balance.wiring``).

Update: the samples are shuffled and split into ``updates_per_epoch`` optimizer steps (``split``); each step
accumulates ``loss`` over its micro-batches of ``batch_size`` samples at every trained denoising step, each
weighted by its share of the step's (sample, step) pairs. The loss is Eq. 8 of the paper::

    ratio = exp(log p_theta(x_{t+1} | x_t) - log p_old(x_{t+1} | x_t))
    L_clip = mean( max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) ),     A clipped to +-adv_clip_max
    L = L_clip + beta * KL( p_theta(. | x_t) || p_ref(. | x_t) )

The KL between two Gaussian transitions with the same std is ``|mu_theta - mu_ref|^2 / (2 std^2)``, reduced over
latent dims like the log-probs. The reference is the base model: the transformer with its LoRA disabled, or a
frozen copy when the whole transformer is trained. CFG is applied identically in rollouts and training, so the
ratio is exactly 1 before the first update. Denoising reduction: rollouts use ``num_steps`` (10), evaluation
``sampling.num_steps`` (more).

Defaults are the paper's SD3.5 GenEval settings where they transfer: ``noise_level`` 0.7, ``clip_range`` 1e-4,
``adv_clip_max`` 5, ``beta`` 0.04, 10 rollout steps, ``timestep_fraction`` 0.99, global std, two optimizer steps
per epoch, LoRA r32/alpha64, lr 3e-4, EMA 0.9 every 8 steps.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffalign.balance.balancer import BalanceConfig
from diffalign.balance.wiring import RewardBalance
from diffalign.config import ConfigError
from diffalign.sampling.sampler import SDE, guided_velocity, sample, transition_log_prob, window
from diffalign.sampling.steps import step as transition_step
from diffalign.training.finetuning import Finetuning, RunSection
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Trainer, check_finite, derive_layout, seeded
from diffalign.types import Cond

log = logging.getLogger("diffalign.flow_grpo")


@dataclass(kw_only=True)
class FlowGRPOConfig:
    """Flow-GRPO settings (paper defaults in brackets).

    Attributes:
        prompts_per_epoch: distinct prompts per epoch, over all processes [48 on 32 GPUs].
        group_size: samples per prompt K [24].
        batch_size: samples per forward pass on one process, in rollouts and training [9].
        num_steps: rollout denoising steps; evaluation uses ``sampling.num_steps`` [10 vs 40].
        shift: static time shift for rollouts (null: the checkpoint's schedule).
        guidance_scale: CFG scale in rollouts and in the training forward (1: no CFG) [4.5].
        sde: stochastic step: ``flow_sde`` (Flow-GRPO), ``cps``, ``dance`` [flow_sde].
        noise_level: the step's noise scale [0.7].
        reduce: log-prob reduction over latent dims, ``mean`` or ``sum`` [mean].
        window: which steps are stochastic: ``all``; ``fixed`` (``window_start``, ``window_size``); ``random``
            (Flow-GRPO-Fast: a start drawn each epoch in ``[window_range[0], window_range[1] - size]``);
            ``progressive`` (MixGRPO: the window slides one step toward data every ``window_shift_every`` epochs
            and rolls back) [all].
        timestep_fraction: fraction of the stochastic steps trained, a random subset per sample [0.99].
        clip_range: PPO clip epsilon on the ratio [1e-4; 1e-5 for Fast].
        adv_clip_max: advantages are clipped to +-this [5].
        beta: KL coefficient to the reference model [0.04 GenEval, 0.01 PickScore, 0 Fast].
        global_std: normalise advantages by the std over the whole epoch instead of per group [true].
        updates_per_epoch: optimizer steps per epoch [2].
        detach_uncond: no gradient through the unconditional branch of the CFG training forward [true].
        prompt_sampling: ``uniform`` over the prompts [uniform], or ``curriculum``: prompts drawn in proportion to
            ``curriculum_floor`` plus a running mean (decay ``curriculum_decay``) of their groups' reward std, so
            rollouts go where the policy sometimes succeeds and sometimes fails (a group of equal rewards has zero
            advantages and teaches nothing); prompts not drawn yet count as maximally spread. When every prompt
            has been drawn and all their spreads are below ``curriculum_min_spread``, the run stops with an error.
    """

    prompts_per_epoch: int = 16
    group_size: int = 8
    batch_size: int = 8
    num_steps: int = 10
    shift: float | None = None
    guidance_scale: float = 4.5
    sde: Literal["flow_sde", "cps", "dance"] = "flow_sde"
    noise_level: float = 0.7
    reduce: Literal["mean", "sum"] = "mean"
    window: Literal["all", "fixed", "random", "progressive"] = "all"
    window_size: int = 2
    window_start: int = 0
    window_range: list[int] | None = None
    window_shift_every: int = 25
    timestep_fraction: float = 0.99
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.04
    global_std: bool = True
    updates_per_epoch: int = 2
    detach_uncond: bool = True
    prompt_sampling: Literal["uniform", "curriculum"] = "uniform"
    curriculum_floor: float = 0.02
    curriculum_decay: float = 0.5
    curriculum_min_spread: float = 1e-3

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key 'flow_grpo.{key}': {why}")

        if self.group_size < 2:
            raise bad("group_size", f"group advantages need at least 2 samples per prompt, got {self.group_size}")
        for key in ("prompts_per_epoch", "batch_size", "num_steps", "updates_per_epoch", "window_shift_every"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        total = self.prompts_per_epoch * self.group_size
        if total % self.batch_size:
            raise bad(
                "group_size",
                f"prompts_per_epoch x group_size = {self.prompts_per_epoch} x {self.group_size} "
                f"= {total} samples per epoch are not a multiple of batch_size {self.batch_size}",
            )
        if self.guidance_scale < 1:
            raise bad("guidance_scale", f"must be >= 1, got {self.guidance_scale}")
        if self.curriculum_floor <= 0 or not 0 <= self.curriculum_decay < 1 or self.curriculum_min_spread < 0:
            raise bad("curriculum_floor/curriculum_decay/curriculum_min_spread",
                      "need floor > 0, 0 <= decay < 1, min_spread >= 0")  # fmt: skip
        if self.noise_level <= 0:
            raise bad("noise_level", "must be > 0 (the rollouts must be stochastic)")
        if not 0 < self.timestep_fraction <= 1:
            raise bad("timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        if self.clip_range <= 0 or self.adv_clip_max <= 0 or self.beta < 0:
            raise bad("clip_range/adv_clip_max/beta", "clip_range and adv_clip_max must be > 0, beta >= 0")
        if self.window != "all" and not 1 <= self.window_size <= self.num_steps:
            raise bad("window_size", f"must be in [1, num_steps={self.num_steps}], got {self.window_size}")
        if self.window == "fixed" and self.window_start + self.window_size > self.num_steps:
            raise bad("window_start", "the window runs past the last step")
        if self.window == "random":
            lo, hi = self.window_range or [0, self.num_steps // 2 + self.window_size]
            if not (0 <= lo and lo + self.window_size <= hi <= self.num_steps):
                raise bad("window_range", f"need 0 <= lo, lo + window_size <= hi <= num_steps; got [{lo}, {hi})")

    def stochastic_steps(self, epoch: int, seed: int) -> list[int] | None:
        """The stochastic step indices of ``epoch`` (None = all); the same on every process."""
        if self.window == "all":
            return None
        if self.window == "fixed":
            return window(self.window_start, self.window_size)
        if self.window == "random":
            lo, hi = self.window_range or [0, self.num_steps // 2 + self.window_size]
            g = seeded(seed, epoch, 101)
            return window(int(torch.randint(lo, hi - self.window_size + 1, (1,), generator=g)), self.window_size)
        positions = self.num_steps - self.window_size + 1
        return window((self.window_start + epoch // self.window_shift_every) % positions, self.window_size)


@dataclass(kw_only=True)
class FlowGRPOJob(RunSection):
    """``diffalign train`` with ``algorithm: flow_grpo``."""

    kind: Literal["train"] = "train"
    algorithm: Literal["flow_grpo"] = "flow_grpo"
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


def group_advantages(rewards: Tensor, groups: Tensor, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Per-group normalised advantages.

    Args:
        rewards: ``(N,)`` rewards of every sample of the epoch (all processes).
        groups: ``(N,)`` long, the prompt (group) id of each sample.
        global_std: divide by the std over all N rewards (Flow-GRPO default) instead of each group's std.

    Returns:
        ``(N,)`` ``(r - mean_group) / (std + eps)``: zero mean within every group, exactly zero for a group whose
        rewards are all equal.
    """
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    overall_std = rewards.float().std(unbiased=False)
    for g in groups.unique():
        member = groups == g
        r = rewards[member].float()
        std = overall_std if global_std else r.std(unbiased=False)
        advantages[member] = (r - r.mean()) / (std + eps)
    return advantages


@dataclass(kw_only=True)
class GRPOBatch(Batch):
    """One epoch's on-policy rollouts on this process; every tensor has the local batch ``N`` first.

    Attributes:
        states: ``(N, T+1, C, H, W)`` trajectory latents; ``log_probs``: ``(N, T)`` sampling log-probs.
        times: ``(T+1,)``; ``train_steps``: ``(N, S)`` long, the step indices each sample is trained on.
        prompts: N prompts; ``cond``, ``uncond``: their conditioning and the empty prompt's (None without CFG).
        sde: the epoch's stochastic step (its window) that the rollouts used.
        advantages: ``(N,)`` combined advantages (None for ``balance.method=marble``); ``reward_advantages``:
            ``(N, K)`` per-reward ones, NaN where a reward abstains (None when unused); ``rewards``: ``(N,)`` total.
    """

    states: Tensor
    log_probs: Tensor
    times: Tensor
    train_steps: Tensor
    prompts: list[str]
    cond: Cond
    uncond: Cond | None
    sde: SDE
    advantages: Tensor | None
    reward_advantages: Tensor | None
    rewards: Tensor


@dataclass(frozen=True)
class GRPOMicro:
    """One micro-batch: samples ``rows`` at column ``column`` of ``train_steps``, within an optimizer step over
    ``step_rows`` samples."""

    rows: Tensor
    column: int
    step_rows: int


class FlowGRPOTrainer(Trainer):
    """Flow-GRPO over the shared loop (see the module docstring)."""

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        self.cfg: FlowGRPOConfig = ctx.cfg.flow_grpo
        self.ft = Finetuning(ctx, self.cfg.updates_per_epoch)
        self.flow = self.ft.flow
        acc = ctx.accelerator
        total = self.cfg.prompts_per_epoch * self.cfg.group_size
        self.local = derive_layout(total, acc.num_processes, self.cfg.batch_size, "flow_grpo.prompts_per_epoch")
        s = ctx.cfg.sampling
        self.times = self.flow.time_grid(self.cfg.num_steps, s.height, s.width, shift=self.cfg.shift)
        self.shape = self.flow.latent_shape(s.height, s.width)
        # the KL reference: the transformer with its LoRA disabled, or a frozen copy when it is trained whole
        self.reference = None if self.ft.uses_lora else copy.deepcopy(self.flow.transformer).requires_grad_(False)
        # the curriculum's per-prompt running reward spread (unseen prompts: 1) and draw counts, checkpointed
        self.spread = torch.ones(len(self.ft.prompts))
        self.drawn = torch.zeros(len(self.ft.prompts))
        ctx.states.update({"prompt_spread": self.spread, "prompt_drawn": self.drawn})
        ctx.prepare()
        self.flow.use_network(self.ft.policy.network)
        self.balance = RewardBalance(ctx.cfg.balance, self.ft.rewards, self.ft.policy, acc, ctx.states,
                                     global_std=self.cfg.global_std)  # fmt: skip
        self.cadence = ctx.cfg.train.cadence(progress=("reward_mean",))
        log.info(
            "flow_grpo layout: %d prompts x %d samples = %d per epoch over %d processes -> %d per process, "
            "%d per forward, %d optimizer steps per epoch",
            self.cfg.prompts_per_epoch, self.cfg.group_size, total, acc.num_processes, self.local,
            self.cfg.batch_size, self.cfg.updates_per_epoch,
        )  # fmt: skip

    def sde(self, epoch: int) -> SDE:
        return SDE(kind=self.cfg.sde, noise_level=self.cfg.noise_level,
                   steps=self.cfg.stochastic_steps(epoch, self.ctx.seed), reduce=self.cfg.reduce)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- collect
    def epoch_prompts(self, epoch: int) -> tuple[list[str], Tensor, np.ndarray]:
        """All ``P x K`` prompts of the epoch in their shuffled global order, their group ids, and the index into
        the prompt list of each group's prompt."""
        prompts = self.ft.prompts
        rng = np.random.default_rng([self.ctx.seed, epoch, 7])
        p = None
        if self.cfg.prompt_sampling == "curriculum":
            w = self.spread.double().numpy() + self.cfg.curriculum_floor
            p = w / w.sum()
        chosen = rng.choice(len(prompts), size=self.cfg.prompts_per_epoch,
                            replace=self.cfg.prompts_per_epoch > len(prompts), p=p)  # fmt: skip
        groups = np.repeat(np.arange(self.cfg.prompts_per_epoch), self.cfg.group_size)
        groups = groups[rng.permutation(len(groups))]
        return [prompts[chosen[g]] for g in groups], torch.from_numpy(groups), chosen

    def _track_spread(self, chosen: np.ndarray, group_std: Tensor) -> None:
        """Fold the epoch's group reward stds into the curriculum's running spreads (the same on every process)."""
        d = self.cfg.curriculum_decay
        for g, index in enumerate(chosen):
            first = self.drawn[index] == 0
            self.spread[index] = group_std[g] if first else d * self.spread[index] + (1 - d) * group_std[g]
            self.drawn[index] += 1
        if self.cfg.prompt_sampling == "curriculum" and bool((self.drawn > 0).all()):
            if float(self.spread.max()) < self.cfg.curriculum_min_spread:
                raise ConfigError(
                    f"config key 'prompts': the curriculum ran out of prompts with reward variance (every one of the "
                    f"{len(self.spread)} prompts' recent groups have a reward std below "
                    f"{self.cfg.curriculum_min_spread}): all their samples score alike, so no group has an advantage "
                    f"to learn from; add prompts the policy sometimes gets right, or use a graded reward"
                )

    @torch.no_grad()
    def collect(self, epoch: int) -> GRPOBatch:
        ctx, acc, cfg = self.ctx, self.ctx.accelerator, self.cfg
        all_prompts, all_groups, chosen = self.epoch_prompts(epoch)
        start = acc.process_index * self.local
        prompts = all_prompts[start : start + self.local]
        sde = self.sde(epoch)
        flow = self.flow
        cond = flow.encode_prompt(prompts)
        uncond = flow.empty_cond(len(prompts)) if cfg.guidance_scale != 1 else None
        states, log_probs, rewards, tables = [], [], [], []
        for b in range(0, self.local, cfg.batch_size):
            rows = list(range(b, b + cfg.batch_size))
            gen = seeded(ctx.seed, epoch, acc.process_index, b, 1)
            x_init = torch.randn((len(rows), *self.shape), generator=gen).to(flow.device)
            if flow.device.type != "cpu":  # the SDE noise is drawn where the model runs (on CPU: the same stream)
                gen = seeded(ctx.seed, epoch, acc.process_index, b, 2, device=flow.device)
            with acc.autocast():
                traj = sample(
                    flow,
                    cond.index(rows),
                    self.times,
                    x_init=x_init,
                    generator=gen,
                    sde=sde,
                    guidance_scale=cfg.guidance_scale,
                    uncond=None if uncond is None else uncond.index(rows),
                )
            images = flow.decode_latents(traj.final)
            out = self.ft.rewards(images, [prompts[r] for r in rows])
            check_finite(out.total, "reward", epoch)
            states.append(traj.states)
            log_probs.append(traj.log_probs)
            rewards.append(out.total)
            tables.append(torch.stack([out.components[n] for n in self.balance.names], dim=1))
        states, log_probs, rewards = torch.cat(states), torch.cat(log_probs), torch.cat(rewards)

        gathered = acc.gather(rewards)  # process-major = the global order of epoch_prompts
        table = acc.gather(torch.cat(tables)).cpu()
        combined, columns = self.balance.advantages(table, all_groups)
        mine = slice(start, start + self.local)

        trainable = [i for i in range(cfg.num_steps) if bool(torch.isfinite(log_probs[:, i]).all())]
        if not trainable:
            raise ConfigError("config key 'flow_grpo.window': no stochastic step with a density to train on")
        n_train = max(1, int(len(trainable) * cfg.timestep_fraction))
        g = seeded(ctx.seed, epoch, acc.process_index, 3)
        pick = torch.stack([torch.randperm(len(trainable), generator=g)[:n_train] for _ in range(self.local)])
        train_steps = torch.as_tensor(trainable)[pick]

        group_std = torch.stack([gathered[all_groups.to(gathered.device) == k].std(unbiased=False)
                                 for k in range(cfg.prompts_per_epoch)]).cpu()  # fmt: skip
        self._track_spread(chosen, group_std)
        metrics = {
            "reward_mean": float(gathered.mean()),
            "reward_std": float(gathered.std(unbiased=False)),
            "zero_std_ratio": float((group_std < 1e-6).float().mean()),
            "stochastic_steps": float(len(trainable)),
        }
        metrics.update(self.balance.reward_metrics(table))
        return GRPOBatch(states=states, log_probs=log_probs, times=self.times, train_steps=train_steps,
                         prompts=prompts, cond=cond, uncond=uncond, sde=sde,
                         advantages=None if combined is None else combined[mine].to(flow.device),
                         reward_advantages=None if columns is None else columns[mine].to(flow.device),
                         rewards=rewards, metrics=metrics)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- update
    def split(self, batch: GRPOBatch, epoch: int) -> list[list[GRPOMicro]]:
        """Shuffle this process's samples into ``updates_per_epoch`` optimizer steps; each step's micro-batches
        are its ``batch_size`` chunks at every trained step column."""
        n = batch.states.shape[0]
        order = torch.randperm(n, generator=seeded(self.ctx.seed, epoch, self.ctx.accelerator.process_index, 11))
        return [
            [GRPOMicro(rows, j, chunk.numel()) for rows in chunk.split(self.cfg.batch_size)
             for j in range(batch.train_steps.shape[1])]
            for chunk in order.chunk(self.cfg.updates_per_epoch)
        ]  # fmt: skip

    def loss(self, batch: GRPOBatch, micro: GRPOMicro) -> dict[str, Tensor]:
        """Eq. 8 at the samples ``micro.rows`` (``B`` of them) at their trained step ``micro.column``:
        ``loss_policy`` (or the per-reward losses the balancer takes) and ``loss_kl`` are ``L``'s terms weighted by
        the micro-batch's share of its optimizer step; ``ratio``, ``clipfrac``, ``approx_kl`` and ``kl`` (``(B,)``)
        are diagnostics."""
        cfg, flow, rows = self.cfg, self.flow, micro.rows
        steps = batch.train_steps[rows, micro.column]
        x_t = batch.states[rows, steps]
        x_next = batch.states[rows, steps + 1]
        t, t_next = batch.times[steps], batch.times[steps + 1]
        cond = batch.cond.index(rows)
        uncond = None if batch.uncond is None else batch.uncond.index(rows)
        sde = batch.sde
        out = transition_log_prob(flow, x_t, x_next, t, t_next, cond, sde=sde, guidance_scale=cfg.guidance_scale,
                                  uncond=uncond, detach_uncond=cfg.detach_uncond)  # fmt: skip
        old = batch.log_probs[rows, steps]
        ratio = torch.exp(out.log_prob - old)

        def per_sample(advantages: Tensor) -> Tensor:
            adv = advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
            return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))

        # this micro-batch's share of the optimizer step's mean over its (sample, trained step) pairs
        share = rows.numel() / micro.step_rows / batch.train_steps.shape[1]
        combined = None if batch.advantages is None else batch.advantages[rows]
        columns = None if batch.reward_advantages is None else batch.reward_advantages[rows]
        terms = self.balance.policy_terms(per_sample, combined, columns, share)
        terms.update({
            "ratio": ratio.detach(),
            "clipfrac": ((ratio.detach() - 1).abs() > cfg.clip_range).float(),
            "approx_kl": 0.5 * (out.log_prob.detach() - old) ** 2,
        })  # fmt: skip
        if cfg.beta > 0:
            reference = flow.adapter(None) if self.reference is None else flow.using(self.reference)
            with torch.no_grad(), reference:
                v_ref = guided_velocity(flow, x_t, t, cond, guidance_scale=cfg.guidance_scale, uncond=uncond)
                ref = transition_step(sde.kind, x_t, v_ref, t, t_next, noise_level=sde.noise_level, x_next=x_next)
            dims = tuple(range(1, x_t.ndim))
            sq = (out.mean - ref.mean) ** 2
            sq = sq.mean(dim=dims) if cfg.reduce == "mean" else sq.sum(dim=dims)
            kl = sq / (2 * out.std**2)
            terms["loss_kl"] = share * cfg.beta * kl.mean()
            terms["kl"] = kl.detach()
        return terms

    def micro_sync(self, index: int, micros: int) -> bool:
        return self.balance.begin_micro(index, micros)

    def backward(self, terms: dict[str, Tensor], epoch: int) -> None:
        self.balance.backward(terms, epoch, super().backward)

    def update(self, batch: GRPOBatch, epoch: int) -> dict[str, float]:
        """The epoch's optimizer steps, with the balancer's state restored before and stored after."""
        self.balance.restore()
        out = super().update(batch, epoch)
        out.update(self.balance.epoch_metrics())
        self.balance.store()
        return out

    # ------------------------------------------------------------------------------------------------- loop hooks
    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        return self.ft.evaluator.run(epoch, tag)

    def finish(self) -> dict[str, Any]:
        """Plot the run's curves; the summary is the final evaluation (on the main process)."""
        summary = self.ft.finish()
        if summary:
            log.info("final LoRA/weights: %s", self.ft.final_dir)
        return summary
