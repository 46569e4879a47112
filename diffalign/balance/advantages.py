"""Advantages from several rewards: an ``(N, K)`` table of per-reward values (NaN where a reward abstains) and the
prompt group of every sample, combined by one of three methods (``balance.method``):

- ``sum``: one advantage from the weighted sum of the rewards (abstentions skipped), normalised per prompt group:
  ``A = (r - mean_group(r)) / (std + eps)``. This is Flow-GRPO's advantage of ``RewardSet``'s total.
- ``gdpo``: each reward normalised per group on its own, the normalised values summed with the weights, and the
  sum normalised over the batch, ``(s - mean(s)) / (std(s) + eps)`` (GDPO, group reward-decoupled normalisation):
  a reward with a large spread no longer drowns the others.
- ``marble``: the K per-reward normalised columns, for the gradient balancer (``balancer.py``); the reward weights
  play no part (the balancer weighs the rewards by their gradients).

Per-reward normalisation (MARBLE's per-prompt stat tracker with a global std): the mean over the group's samples
where the reward does not abstain, the std over all such samples of the batch (``global_std``, Flow-GRPO's default)
or over the group's. An abstention stays NaN in the output and is masked out downstream; a reward that abstains on
the whole batch is left out of it with a logged warning; a batch where every reward abstains is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffalign.balance.qp import BalanceError
from diffalign.config import ConfigError

log = logging.getLogger("diffalign.balance")


@dataclass(frozen=True)
class Advantages:
    """Attributes:
    values: ``(N, M)`` float32 advantages, NaN where masked: M = 1 (column ``total``) for ``sum`` and ``gdpo``,
        M = K (one column per reward, in the table's order) for ``marble``.
    names: the M column names.
    excluded: the rewards that abstained on every sample of the batch.
    """

    values: Tensor
    names: list[str]
    excluded: list[str] = field(default_factory=list)

    @property
    def valid(self) -> Tensor:
        """``(N, M)`` bool: where an advantage exists."""
        return ~torch.isnan(self.values)


def reward_table(components: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
    """``RewardOutput.components`` (name -> ``(B,)``) -> the ``(B, K)`` float32 table and its column names."""
    names = list(components)
    return torch.stack([components[n].float() for n in names], dim=1), names


def normalise_per_group(values: Tensor, groups: Tensor, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """One reward's per-group advantages, ignoring NaN.

    Args:
        values: ``(N,)`` rewards, NaN where the reward abstains.
        groups: ``(N,)`` long prompt (group) ids.
        global_std: divide by the std over every valid value of the batch, else by the group's std.

    Returns:
        ``(N,)`` float32 ``(r - mean_group) / (std + eps)`` over the valid samples, NaN elsewhere (all NaN when no
        sample is valid). Without NaN this equals Flow-GRPO's ``group_advantages``.
    """
    values = values.float()
    valid = ~torch.isnan(values)
    out = torch.full_like(values, float("nan"))
    if not bool(valid.any()):
        return out
    overall_std = values[valid].std(unbiased=False)
    for g in groups[valid].unique():
        member = valid & (groups == g)
        r = values[member]
        std = overall_std if global_std else r.std(unbiased=False)
        out[member] = (r - r.mean()) / (std + eps)
    return out


def _weighted_nan_sum(columns: Tensor, weights: Tensor) -> Tensor:
    """``(N, K)`` -> ``(N,)`` weighted sum over the non-NaN entries of each row; NaN where a row is all NaN."""
    missing = torch.isnan(columns)
    total = (torch.nan_to_num(columns, nan=0.0) * weights).sum(dim=1)
    return torch.where(missing.all(dim=1), torch.full_like(total, float("nan")), total)


def reward_advantages(
    rewards: Tensor,
    groups: Tensor,
    method: str,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    global_std: bool = True,
    eps: float = 1e-4,
) -> Advantages:
    """Combine the ``(N, K)`` reward table into advantages (see the module docstring).

    Args:
        rewards: ``(N, K)`` per-reward values of every sample of the batch (all processes), NaN = abstains.
        groups: ``(N,)`` long prompt (group) ids.
        method: ``sum``, ``gdpo`` or ``marble`` (``balance.method``).
        names: the K reward names.
        weights: K reward weights for ``sum`` and ``gdpo`` (default 1 each); ``marble`` accepts only 1s.
        global_std: per-reward std over the whole batch (Flow-GRPO's default), else per group.

    Raises:
        ConfigError: an unknown method, ``marble`` with one reward or with weights other than 1.
        BalanceError: every reward abstains on every sample.
    """
    if rewards.ndim != 2 or rewards.shape[1] != len(names):
        raise ValueError(f"rewards must be (N, {len(names)}) for rewards {list(names)}, got {tuple(rewards.shape)}")
    if groups.shape != (rewards.shape[0],):
        raise ValueError(f"groups must be ({rewards.shape[0]},), got {tuple(groups.shape)}")
    K = rewards.shape[1]
    w = torch.ones(K) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (K,):
        raise ValueError(f"need {K} reward weights, got {len(w)}")
    if method == "marble":
        if K < 2:
            raise ConfigError(f"config key 'balance.method': marble balances several rewards, got only {list(names)}; "
                              "use balance.method=sum for one reward")  # fmt: skip
        if not bool((w == 1).all()):
            raise ConfigError(f"config key 'balance.method': marble weighs the rewards by their gradients; reward "
                              f"weights must be 1, got {dict(zip(names, w.tolist(), strict=True))}")  # fmt: skip
    elif method not in ("sum", "gdpo"):
        raise ConfigError(f"config key 'balance.method': expected sum, gdpo or marble, got {method!r}")
    rewards = rewards.float()
    present = ~torch.isnan(rewards).all(dim=0)
    excluded = [n for n, ok in zip(names, present.tolist(), strict=True) if not ok]
    if not bool(present.any()):
        raise BalanceError(f"every reward abstains on every sample of the batch (rewards {list(names)})")
    if excluded:
        log.warning("balance: rewards %s abstain on the whole batch and are left out of it", excluded)
    if method == "sum":
        total = normalise_per_group(_weighted_nan_sum(rewards, w), groups, global_std, eps)
        return Advantages(values=total[:, None], names=["total"], excluded=excluded)
    columns = torch.stack([normalise_per_group(rewards[:, k], groups, global_std, eps) for k in range(K)], dim=1)
    if method == "marble":
        return Advantages(values=columns, names=list(names), excluded=excluded)
    summed = _weighted_nan_sum(columns, w)
    valid = ~torch.isnan(summed)
    s = summed[valid]
    summed[valid] = (s - s.mean()) / (s.std(unbiased=False) + eps)
    return Advantages(values=summed[:, None], names=["total"], excluded=excluded)
