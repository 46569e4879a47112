"""Shared data types that cross subpackage boundaries.

Conventions (DESIGN.md): time ``t`` in [0, 1] with t = 1 noise and t = 0 data; latents ``(B, C, H, W)``;
per-sample scalars ``(B,)``; trajectories ``(B, T+1, C, H, W)``; per-step quantities ``(B, T)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Cond:
    """Prompt conditioning for a batch, every tensor batch-first.

    Attributes:
        embeds: ``(B, L, D)`` token embeddings fed to the transformer's text stream.
        pooled: ``(B, P)`` pooled text embedding (SD3, FLUX.1), or None (FLUX.2).
        text_ids: ``(B, L, K)`` positional ids of the text tokens (FLUX.2), or None.
        prompts: the prompt strings, length B (kept for rewards and logging).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    text_ids: Tensor | None = None
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        batch = self.embeds.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            size = value.shape[0] if isinstance(value, Tensor) else (len(value) if value is not None else batch)
            if size != batch:
                raise ValueError(f"Cond.{f.name} has batch size {size}, expected {batch} (from Cond.embeds)")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | list[int] | slice) -> Cond:
        """Rows ``idx`` of every field (repeats allowed: branching and resampling use this)."""
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        else:
            rows = idx.tolist() if isinstance(idx, Tensor) else list(idx)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.embeds.device)
        return Cond(
            embeds=self.embeds[index],
            pooled=None if self.pooled is None else self.pooled[index],
            text_ids=None if self.text_ids is None else self.text_ids[index],
            prompts=[self.prompts[i] for i in rows] if self.prompts else [],
        )

    def repeat_interleave(self, n: int) -> Cond:
        """Each row repeated ``n`` times in place: ``[a, b] -> [a, a, b, b]`` for n = 2."""
        return self.index([i for i in range(len(self)) for _ in range(n)])

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch dimension."""
        first = conds[0]
        return Cond(
            embeds=torch.cat([c.embeds for c in conds]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in conds]),
            text_ids=None if first.text_ids is None else torch.cat([c.text_ids for c in conds]),
            prompts=[p for c in conds for p in c.prompts],
        )

    def to(self, device: torch.device | str) -> Cond:
        return replace(
            self,
            embeds=self.embeds.to(device),
            pooled=None if self.pooled is None else self.pooled.to(device),
            text_ids=None if self.text_ids is None else self.text_ids.to(device),
        )


@dataclass
class Trajectory:
    """The record of one run of the sampler.

    Attributes:
        states: ``(B, T+1, C, H, W)`` float32 latents, ``states[:, 0]`` the initial noise, ``states[:, -1]`` the
            final sample. Only filled when the sampler was asked to keep states; otherwise ``(B, 1, C, H, W)``
            holding the final sample.
        times: ``(T+1,)`` float32 time grid, ``times[0]`` = 1 side, ``times[-1]`` = 0 side.
        log_probs: ``(B, T)`` float32 Gaussian log-density of each transition under the policy that sampled it,
            NaN for deterministic (ODE) steps.
        stochastic: ``(T,)`` bool, which steps were sampled stochastically.
        nfe: per-sample transformer evaluations spent (a CFG step costs 2 per sample).
        ancestors: ``(B,)`` long, for each final particle the row of the initial batch it descends from
            (identity unless a steering hook selected, branched or resampled particles).
    """

    states: Tensor
    times: Tensor
    log_probs: Tensor
    stochastic: Tensor
    nfe: int
    ancestors: Tensor

    @property
    def final(self) -> Tensor:
        """``(B, C, H, W)`` the final latents."""
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1
