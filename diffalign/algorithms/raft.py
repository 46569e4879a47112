"""Iterated reward-filtered fine-tuning (RAFT; Dong et al. 2023, arXiv 2304.06767) of a flow model, on the shared loop.

One epoch is one round:

1. **Sample.** ``prompts_per_round`` prompts (the same draw on every process, each prompt's group on one process),
   ``samples_per_prompt`` images each from the current policy with the evaluation sampler (``cfg.sampling``: ODE,
   CFG), clean latents kept.
2. **Filter.** Score them with the rewards; per prompt keep the ``keep`` best whose reward is at least
   ``min_reward``.
3. **Fit.** ``steps_per_round`` optimizer steps of rectified-flow matching on the kept latents (fresh noise,
   logit-normal times; the prompt dropped to "" with probability ``cfg_dropout``)::

       x_t = (1 - t) x0 + t eps,   L = || v(x_t, t, c) - (eps - x0) ||^2  +  anchor || v(x_t, t, c) - v_ref ||^2

   where ``v`` is the conditional velocity (``target: conditional``) or, since the policy samples with CFG, the
   guided velocity ``v_u + s (v_c - v_u)`` with the unconditional branch detached (``target: guided``), so that
   what is fitted is what is sampled; ``v_ref`` is the base model (adapters off) at the same input, an anchor
   that keeps the policy near it. With ``replay`` > 0, that fraction of every step's pairs are fresh renders of
   the training prompts (world prompts only), so the fit does not pull the model away from the data it was
   pre-trained on.

Fine-tuning a model on a handful of its own samples can make it worse round after round (a model fitted to its
own outputs drifts: the filtered samples are a narrow, slightly off-manifold set, and CFG sampling on top of a
velocity fitted to guided samples amplifies the guidance); ``target``, ``anchor``, ``replay`` and the number of
steps per kept sample are the levers against it (measured in ``docs/world_proving_ground.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from diffalign.config import ConfigError
from diffalign.sampling.generate import initial_noise, resolve_guidance_scale
from diffalign.sampling.sampler import sample
from diffalign.training.finetuning import Finetuning, RunSection
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Trainer, check_finite, seeded
from diffalign.types import Cond

log = logging.getLogger("diffalign.raft")


@dataclass(kw_only=True)
class RAFTConfig:
    """RAFT settings.

    Attributes:
        prompts_per_round: distinct prompts sampled per round (over all processes; a multiple of their number).
        samples_per_prompt: images per prompt per round.
        keep: best samples kept per prompt; ``min_reward``: a kept sample's reward is at least this.
        steps_per_round: optimizer steps on the kept samples per round; ``batch_size``: pairs per step and process.
        sample_batch: images per sampler call.
        target: ``conditional`` or ``guided`` velocity fitted (module docstring).
        cfg_dropout: probability that a pair's prompt is dropped to "".
        anchor: weight of the ``|| v - v_ref ||^2`` term to the base model (0: none).
        uncond_anchor: weight of ``|| v_u - v_u,ref ||^2``, which holds the unconditional velocity (the other half
            of CFG, moved by the shared weights although it is not fitted) to the base model's (0: none).
        replay: fraction of each step's pairs that are fresh renders of the training prompts (world only).
    """

    prompts_per_round: int = 8
    samples_per_prompt: int = 16
    keep: int = 4
    min_reward: float = 0.0
    steps_per_round: int = 8
    batch_size: int = 16
    sample_batch: int = 32
    target: Literal["conditional", "guided"] = "guided"
    cfg_dropout: float = 0.0
    anchor: float = 0.0
    uncond_anchor: float = 0.0
    replay: float = 0.0

    def __post_init__(self) -> None:
        for key in ("prompts_per_round", "samples_per_prompt", "keep", "steps_per_round", "batch_size",
                    "sample_batch"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'raft.{key}': must be >= 1, got {getattr(self, key)}")
        if self.keep > self.samples_per_prompt:
            raise ConfigError(f"config key 'raft.keep': at most samples_per_prompt ({self.samples_per_prompt})")
        if not 0 <= self.cfg_dropout < 1 or not 0 <= self.replay < 1 or min(self.anchor, self.uncond_anchor) < 0:
            raise ConfigError("config keys 'raft.cfg_dropout'/'raft.replay' must be in [0, 1), "
                              "'raft.anchor'/'raft.uncond_anchor' >= 0")  # fmt: skip


@dataclass(kw_only=True)
class RAFTJob(RunSection):
    """``diffalign train`` with ``algorithm: raft``."""

    kind: Literal["train"] = "train"
    algorithm: Literal["raft"] = "raft"
    raft: RAFTConfig = field(default_factory=RAFTConfig)


@dataclass(kw_only=True)
class RAFTBatch(Batch):
    """One round on this process: the kept clean latents ``x0`` ``(M, C, H, W)`` and their ``prompts``; ``pairs``:
    per optimizer step, ``(rows, replay_prompts, replay_x0)``: pool rows and replayed renders."""

    x0: Tensor
    prompts: list[str]
    pairs: list[tuple[Tensor, list[str], Tensor | None]]


class RAFTTrainer(Trainer):
    """RAFT over the shared loop (see the module docstring)."""

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        self.cfg: RAFTConfig = ctx.cfg.raft
        acc = ctx.accelerator
        if self.cfg.prompts_per_round % acc.num_processes:
            raise ConfigError(f"config key 'raft.prompts_per_round': {self.cfg.prompts_per_round} prompts do not "
                              f"split over {acc.num_processes} processes")  # fmt: skip
        self.ft = Finetuning(ctx, self.cfg.steps_per_round)
        self.flow = self.ft.flow
        if (self.cfg.anchor > 0 or self.cfg.uncond_anchor > 0) and not self.ft.uses_lora:
            raise ConfigError("config key 'raft.anchor': the anchors to the base model need a LoRA (lora.rank > 0)")
        if self.cfg.replay > 0:
            from diffalign.world.prompts import is_world_prompt

            if not all(is_world_prompt(p) for p in self.ft.prompts):
                raise ConfigError("config key 'raft.replay': replayed renders need world prompts")
        s = ctx.cfg.sampling
        self.times = self.flow.time_grid(s.num_steps, s.height, s.width, shift=s.shift)
        self.shape = self.flow.latent_shape(s.height, s.width)
        self.scale = resolve_guidance_scale(self.flow, s)
        ctx.prepare()
        self.flow.use_network(self.ft.policy.network)
        self.cadence = ctx.cfg.train.cadence(progress=("reward_mean", "kept"))

    # ------------------------------------------------------------------------------------------------- collect
    def round_prompts(self, epoch: int) -> list[str]:
        """This process's prompts of the round (each repeated ``samples_per_prompt`` times)."""
        rng = np.random.default_rng([self.ctx.seed, epoch, 7])
        prompts = self.ft.prompts
        chosen = rng.choice(len(prompts), size=self.cfg.prompts_per_round,
                            replace=self.cfg.prompts_per_round > len(prompts))  # fmt: skip
        acc = self.ctx.accelerator
        mine = chosen[acc.process_index :: acc.num_processes]
        return [prompts[i] for i in mine for _ in range(self.cfg.samples_per_prompt)]

    @torch.no_grad()
    def collect(self, epoch: int) -> RAFTBatch:
        ctx, cfg, flow, acc = self.ctx, self.cfg, self.flow, self.ctx.accelerator
        prompts = self.round_prompts(epoch)
        latents, rewards = [], []
        for start in range(0, len(prompts), cfg.sample_batch):
            chunk = prompts[start : start + cfg.sample_batch]
            seed = int(np.random.default_rng([ctx.seed, epoch, acc.process_index, start, 1]).integers(2**31))
            x_init = initial_noise(flow, self.shape, seed, range(len(chunk)))
            with acc.autocast():
                traj = sample(flow, flow.encode_prompt(chunk), self.times, x_init=x_init,
                              guidance_scale=self.scale, keep_states=False)  # fmt: skip
            x0 = traj.final.float()
            out = self.ft.rewards(flow.decode_latents(x0), chunk)
            check_finite(out.total, "reward", epoch)
            latents.append(x0)
            rewards.append(out.total)
        x0, reward = torch.cat(latents), torch.cat(rewards)
        k = cfg.samples_per_prompt
        keep = []
        for g in range(len(prompts) // k):
            rows = torch.arange(g * k, (g + 1) * k)
            best = rows[reward[rows].argsort(descending=True, stable=True)[: cfg.keep]]
            keep.extend(int(r) for r in best if reward[r] >= cfg.min_reward)
        kept = torch.tensor(keep, dtype=torch.long)
        gathered = acc.gather(reward)
        n_kept = acc.gather(torch.tensor([len(keep)], device=reward.device)).sum()
        metrics = {"reward_mean": float(gathered.mean()), "kept": float(n_kept)}
        if len(keep):
            metrics["kept_reward"] = float(reward[kept].mean())
        pairs = self._pairs(epoch, len(keep))
        return RAFTBatch(x0=x0[kept] if len(keep) else x0[:0], prompts=[prompts[i] for i in keep], pairs=pairs,
                         metrics=metrics)  # fmt: skip

    def _pairs(self, epoch: int, pool: int) -> list[tuple[Tensor, list[str], Tensor | None]]:
        """Per optimizer step the pool rows drawn (with replacement) and the replayed renders."""
        cfg, rank = self.cfg, self.ctx.accelerator.process_index
        rng = np.random.default_rng([self.ctx.seed, rank, epoch, 5])
        n_replay = round(cfg.batch_size * cfg.replay) if pool else cfg.batch_size * (cfg.replay > 0)
        pairs = []
        for _ in range(cfg.steps_per_round):
            rows = torch.from_numpy(rng.integers(pool, size=cfg.batch_size - n_replay)) if pool else None
            replay_prompts, replay_x0 = [], None
            if n_replay:
                from diffalign.world.render import render, sample_scene

                replay_prompts = [self.ft.prompts[int(i)] for i in rng.integers(len(self.ft.prompts), size=n_replay)]
                images = np.stack([render(sample_scene(p, rng)) for p in replay_prompts])
                replay_x0 = self.flow.encode_images(torch.from_numpy(images).to(self.flow.device)).float()
            pairs.append((torch.zeros(0, dtype=torch.long) if rows is None else rows, replay_prompts, replay_x0))
        return pairs

    # ------------------------------------------------------------------------------------------------- update
    def split(self, batch: RAFTBatch, epoch: int) -> list[list[Any]]:
        """One micro-batch per optimizer step: ``(epoch, step)``."""
        return [[(epoch, i)] for i in range(self.cfg.steps_per_round)]

    def loss(self, batch: RAFTBatch, micro: tuple[int, int]) -> dict[str, Tensor]:
        cfg, flow, ctx = self.cfg, self.flow, self.ctx
        epoch, i = micro
        rows, replay_prompts, replay_x0 = batch.pairs[i]
        prompts = [batch.prompts[int(r)] for r in rows] + replay_prompts
        parts = [batch.x0[rows]] + ([] if replay_x0 is None else [replay_x0])
        x0 = torch.cat(parts)
        if not len(prompts):  # nothing kept and nothing replayed: a zero step that keeps processes in lockstep
            prompts, x0, weight = batch.prompts[:1] or self.ft.prompts[:1], torch.zeros(1, *self.shape), 0.0
        else:
            weight = 1.0
        x0 = x0.to(flow.device)
        gen = seeded(ctx.seed, ctx.accelerator.process_index, epoch, i, 3)
        rng = np.random.default_rng([ctx.seed, ctx.accelerator.process_index, epoch, i, 4])
        drop = rng.random(len(prompts)) < cfg.cfg_dropout
        cond = flow.encode_prompt(["" if d else p for p, d in zip(prompts, drop, strict=True)])
        noise = torch.randn(x0.shape, generator=gen).to(flow.device)
        t = compute_density_for_timestep_sampling("logit_normal", len(prompts), logit_mean=0.0, logit_std=1.0,
                                                  generator=gen).to(flow.device)  # fmt: skip
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v, v_uncond = self._velocity(x_t, t, cond)
        terms = {"loss_fm": weight * F.mse_loss(v.float(), noise - x0)}
        if cfg.anchor > 0 or cfg.uncond_anchor > 0:
            with torch.no_grad(), flow.adapter(None):
                v_ref, v_uncond_ref = self._velocity(x_t, t, cond)
            if cfg.anchor > 0:
                terms["loss_anchor"] = weight * cfg.anchor * F.mse_loss(v.float(), v_ref.float())
            if cfg.uncond_anchor > 0:
                terms["loss_uncond_anchor"] = weight * cfg.uncond_anchor * F.mse_loss(v_uncond.float(),
                                                                                     v_uncond_ref.float())  # fmt: skip
        return terms

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor | None]:
        """The fitted velocity (conditional, or guided with the unconditional branch detached) and, with CFG,
        the unconditional velocity (with its gradient, for the anchor that holds it to the base)."""
        if self.scale == 1.0 or (self.cfg.target == "conditional" and self.cfg.uncond_anchor == 0):
            return self.flow.velocity(x_t, t, cond), None
        both = self.flow.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                  Cond.cat([self.flow.empty_cond(len(cond)), cond]))  # fmt: skip
        v_uncond, v_cond = both.chunk(2)
        if self.cfg.target == "conditional":
            return v_cond, v_uncond
        return v_uncond.detach() + self.scale * (v_cond - v_uncond.detach()), v_uncond

    # ------------------------------------------------------------------------------------------------- loop hooks
    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        return self.ft.evaluator.run(epoch, tag)

    def finish(self) -> dict[str, Any]:
        return self.ft.finish()
