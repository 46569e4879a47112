"""Supervised flow matching: fit a flow model's velocity to (prompt, clean latent) pairs.

Rectified-flow matching (Lipman et al. 2023, arXiv 2210.02747; Liu et al. 2023, arXiv 2209.03003), with SD3's
logit-normal times (Esser et al. 2024, arXiv 2403.03206, Sec. 3.1). For a clean latent ``x0`` with prompt ``c``::

    eps ~ N(0, I),   t = sigmoid(u), u ~ N(logit_mean, logit_std^2)      (or t ~ U(0, 1))
    x_t = (1 - t) x0 + t eps
    L = mean || v_theta(x_t, t, c) - (eps - x0) ||^2                      (over the batch and latent dims)

with ``c`` replaced by the empty prompt with probability ``cfg_dropout``, so that the same model also learns the
unconditional velocity that classifier-free guidance needs.

The pairs come from a ``LatentSource``, asked for a fresh batch every epoch (one epoch = one optimizer step):
a fixed dataset (``LatentDataset``, e.g. the embedded world's encoded renders), or samples that the current
model generates and a reward keeps (reward-filtered fine-tuning), since ``collect`` runs with the current
weights. The trainer trains whatever the caller registered on the context for ``flow``'s transformer (a LoRA,
or the whole transformer); every random draw is a function of (seed, process, epoch), so a resumed run
continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from diffalign.config import ConfigError
from diffalign.pipelines.base import FlowModel
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Trainer, seeded
from diffalign.types import Cond


@dataclass(kw_only=True)
class FlowMatchingConfig:
    """Flow-matching settings (SD3's defaults in brackets).

    Attributes:
        batch_size: pairs per optimizer step on each process.
        cfg_dropout: probability that a pair's prompt is replaced by the empty prompt [0.1].
        time_sampling: ``logit_normal`` (``t = sigmoid(N(logit_mean, logit_std^2))``) or ``uniform`` [logit_normal].
        logit_mean, logit_std: the logit-normal's location and scale [0, 1].
    """

    batch_size: int = 32
    cfg_dropout: float = 0.1
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"config key 'batch_size': must be >= 1, got {self.batch_size}")
        if not 0 <= self.cfg_dropout < 1:
            raise ConfigError(f"config key 'cfg_dropout': must be in [0, 1), got {self.cfg_dropout}")
        if self.logit_std <= 0:
            raise ConfigError(f"config key 'logit_std': must be > 0, got {self.logit_std}")


class LatentSource(Protocol):
    """Where the (prompt, clean latent) pairs come from."""

    def draw(self, rng: np.random.Generator, size: int, epoch: int) -> tuple[list[str], Tensor]:
        """``size`` prompts and their clean latents ``(size, C, H, W)`` float32 for ``epoch``; every random
        choice is made with ``rng`` (seeded per process and epoch)."""
        ...


class LatentDataset:
    """A fixed set of pairs (``prompts``, ``latents`` ``(N, C, H, W)``), drawn uniformly with replacement."""

    def __init__(self, prompts: Sequence[str], latents: Tensor) -> None:
        if len(prompts) != len(latents) or not len(prompts):
            raise ValueError(f"need as many prompts as latents (> 0), got {len(prompts)} and {len(latents)}")
        self.prompts, self.latents = list(prompts), latents

    def draw(self, rng: np.random.Generator, size: int, epoch: int) -> tuple[list[str], Tensor]:
        rows = rng.integers(len(self.prompts), size=size)
        return [self.prompts[r] for r in rows], self.latents[torch.from_numpy(rows)]


class PromptCache:
    """Each prompt of a finite set encoded once with the frozen text encoders: ``cache(prompts) -> Cond``."""

    def __init__(self, flow: FlowModel, prompts: Sequence[str], chunk: int = 64) -> None:
        self.table: dict[str, Cond] = {}
        unique = list(dict.fromkeys(prompts))
        for start in range(0, len(unique), chunk):
            batch = unique[start : start + chunk]
            cond = flow.encode_prompt(batch)
            for i, p in enumerate(batch):
                self.table[p] = cond.index([i])

    def __call__(self, prompts: Sequence[str]) -> Cond:
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the prompt cache")
        return Cond.cat([self.table[p] for p in prompts])


@dataclass(kw_only=True)
class FlowMatchingBatch(Batch):
    """One optimizer step's pairs on this process.

    Attributes:
        x0: ``(B, C, H, W)`` clean latents; ``noise``: ``(B, C, H, W)`` the ``eps`` paired with them.
        t: ``(B,)`` times in (0, 1); ``cond``: the prompts' conditioning (the empty prompt where dropped).
    """

    x0: Tensor
    noise: Tensor
    t: Tensor
    cond: Cond


class FlowMatchingTrainer(Trainer):
    """Flow matching of ``flow`` on ``source`` (see the module docstring). Before this ``__init__``, the caller
    registers on ``ctx`` the trained parameters of ``flow``'s transformer, prepares them and routes ``flow``
    through their wrapper; it also sets ``self.cadence``.

    Args:
        encode: prompts -> ``Cond`` (default ``flow.encode_prompt``; a ``PromptCache`` for a finite prompt set).
    """

    def __init__(
        self,
        ctx: TrainContext,
        flow: FlowModel,
        source: LatentSource,
        config: FlowMatchingConfig,
        encode: Callable[[list[str]], Cond] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.flow, self.source, self.config = flow, source, config
        self.encode = encode or flow.encode_prompt

    @torch.no_grad()
    def collect(self, epoch: int) -> FlowMatchingBatch:
        cfg, device, rank = self.config, self.ctx.device, self.ctx.accelerator.process_index
        rng = np.random.default_rng([self.ctx.seed, rank, epoch, 2])
        prompts, x0 = self.source.draw(rng, cfg.batch_size, epoch)
        drop = rng.random(cfg.batch_size) < cfg.cfg_dropout
        cond = self.encode(["" if d else p for p, d in zip(prompts, drop, strict=True)]).to(device)
        x0 = x0.to(device)
        gen = seeded(self.ctx.seed, rank, epoch, 3)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = compute_density_for_timestep_sampling(cfg.time_sampling, x0.shape[0], logit_mean=cfg.logit_mean,
                                                  logit_std=cfg.logit_std, generator=gen).to(device)  # fmt: skip
        return FlowMatchingBatch(x0=x0, noise=noise, t=t, cond=cond)

    def loss(self, batch: FlowMatchingBatch, micro: None) -> dict[str, Tensor]:
        t = batch.t.view(-1, 1, 1, 1)
        x_t = (1 - t) * batch.x0 + t * batch.noise
        v = self.flow.velocity(x_t, batch.t, batch.cond)
        return {"loss_fm": F.mse_loss(v, batch.noise - batch.x0)}
