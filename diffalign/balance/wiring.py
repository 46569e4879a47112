"""The ``balance`` section inside a trainer: per-reward advantages of an epoch's rollouts and, per micro-step, the
gradient that ``balance.method`` asks for over the policy's trained parameters (Flow-GRPO and DiffusionNFT use it).

A trainer that supports it:

1. in ``collect``, gathers the ``(N, K)`` reward table (the ``RewardSet``'s components over all processes, NaN where
   a reward abstains) and calls ``advantages(table, groups)``: the combined advantage ``(N,)`` (``sum``, ``gdpo``;
   None for ``marble``) and the per-reward columns ``(N, K)`` that solves and measurements use (None with one
   reward under ``sum``/``gdpo``);
2. returns ``begin_micro(index, micros, step)`` from its ``micro_sync`` (it decides what the micro-step is);
3. in ``loss``, builds its policy terms with ``policy_terms(per_sample_loss, rows, share)`` from a function of the
   advantages ``(B,) -> (B,)`` per-sample losses at this micro-batch's forward pass;
4. calls ``backward`` from its ``backward``, and ``restore`` / ``epoch_metrics`` + ``store`` around its ``update``.

Each micro-step is one of:

- ``plain`` (``sum``, ``gdpo``): ``loss_policy`` = the per-sample loss of the combined advantage, averaged;
- ``measure`` (``sum``, ``gdpo`` with K >= 2, the first micro-step of every ``every``-th optimizer step): the same
  update, plus each reward's loss, so that ``GradientBalancer.measure`` reports the cosine between the update (the
  whole objective, the KL included) and each reward's gradient;
- ``solve`` (``marble``, first micro-step of every ``every``-th optimizer step): the K reward losses go to
  ``GradientBalancer.solve``, every other ``loss_*`` term (the KL) is the regulariser added outside the QP;
- ``amortised`` (``marble``, in between): ``loss_policy = sum_k alpha_k L_k`` with the EMA weights, one backward
  whose gradient is exactly ``sum_k alpha_k g_k`` of the raw reward gradients (for DiffusionNFT, whose loss is
  affine in the advantage, MARBLE's single backward with ``sum_k alpha_k A_k`` is the same when no advantage is
  clipped and no reward abstains; this form stays exact when they do).

Reward k's loss ``L_k`` averages the per-sample loss of its own advantages over the micro-batch's samples where it
does not abstain (``reward_losses``). A sample on which every reward abstains has combined advantage 0.

Logged per epoch: ``reward/<name>`` (rollout mean, abstentions left out) and ``reward/<name>/applies`` (fraction of
samples it scores); over the epoch's solves or measurements, the mean of ``BalanceReport.metrics`` (QP weights,
EMA weights, per-reward gradient norms and cosines, ``balance/min_cos`` and ``balance/min_cos_negative``, the
fraction of them whose minimum cosine was negative); ``balance/negative_fraction_run``, that fraction over the run
so far; and ``balance/alpha/<name>``, the weights amortised steps use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffalign.balance.advantages import normalise_per_group, reward_advantages
from diffalign.balance.balancer import BalanceConfig, BalanceReport, GradientBalancer, reward_losses
from diffalign.rewards import RewardSet
from diffalign.training.trainer import TrainedModule, check_finite

#: the terms key under which ``policy_terms`` hands the ``(K,)`` per-reward losses to ``backward``.
REWARD_LOSSES = "balance_reward_losses"


class RewardBalance:
    """The ``balance`` section of one trainer (see the module docstring).

    Args:
        cfg: the ``balance`` section.
        rewards: the optimised rewards (their names and weights, in the reward table's column order).
        policy: the registered trained module whose gradients are balanced (after ``ctx.prepare``).
        accelerator: the run's accelerator.
        states: the trainer context's checkpointed tensors; the balancer's state is kept there.
        global_std: per-reward std over the whole batch (Flow-GRPO's default) instead of per prompt group.

    Raises:
        ConfigError: ``marble`` with one reward, or with reward weights other than 1.
    """

    def __init__(
        self,
        cfg: BalanceConfig,
        rewards: RewardSet,
        policy: TrainedModule,
        accelerator: Any,
        states: dict[str, Tensor],
        global_std: bool = True,
    ) -> None:
        self.cfg = cfg
        self.names = list(rewards.rewards)
        self.weights = [rewards.weights[n] for n in self.names]
        self.global_std = global_std
        self.policy = policy
        K = len(self.names)
        self.balancer: GradientBalancer | None = None
        if cfg.method == "marble" or K >= 2:
            self.balancer = GradientBalancer(cfg, self.names, policy.trainable(), accelerator)
        if cfg.method == "marble":  # its conditions on the rewards (weights 1), checked before any rollout
            reward_advantages(torch.zeros(2, K), torch.zeros(2, dtype=torch.long), "marble", self.names, self.weights)
        self._state = {"balance_weights": torch.zeros(K, dtype=torch.float64),
                       # has weights, last full step (-1: none), solves, measured batches, negative-cosine batches
                       "balance_counters": torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0], dtype=torch.float64)}  # fmt: skip
        states.update(self._state)
        self.mode = "plain"
        self._step = 0
        self._reports: list[BalanceReport] = []

    # ------------------------------------------------------------------------------------------- advantages
    def advantages(self, table: Tensor, groups: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(N, K)`` rewards (NaN = abstains) and ``(N,)`` prompt ids -> the combined advantage ``(N,)`` (None for
        ``marble``) and the per-reward advantages ``(N, K)`` (NaN = abstains; None when nothing uses them)."""
        if self.cfg.method == "marble":
            adv = reward_advantages(table, groups, "marble", self.names, self.weights, self.global_std)
            return None, adv.values
        adv = reward_advantages(table, groups, self.cfg.method, self.names, self.weights, self.global_std)
        combined = torch.nan_to_num(adv.values[:, 0], nan=0.0)
        if self.balancer is None:
            return combined, None
        columns = torch.stack([normalise_per_group(table[:, k], groups, self.global_std)
                               for k in range(table.shape[1])], dim=1)  # fmt: skip
        return combined, columns

    def reward_metrics(self, table: Tensor) -> dict[str, float]:
        """``reward/<name>``: the mean of the valid values; ``reward/<name>/applies``: the fraction of valid ones."""
        out = {}
        for k, name in enumerate(self.names):
            valid = ~torch.isnan(table[:, k])
            out[f"reward/{name}"] = float(table[valid, k].mean()) if bool(valid.any()) else float("nan")
            if self.balancer is not None:
                out[f"reward/{name}/applies"] = float(valid.float().mean())
        return out

    # ------------------------------------------------------------------------------------------- micro-steps
    def begin_micro(self, index: int, micros: int) -> bool:
        """Decide what micro-step ``index`` of an optimizer step of ``micros`` is (``mode``); returns whether its
        backward synchronises the gradients (a solve or measurement reduces them itself, except under FSDP2)."""
        self._step = self.policy.steps
        b = self.balancer
        full = b is not None and index == 0 and b.due(self._step)
        if self.cfg.method == "marble":
            self.mode = "solve" if full else "amortised"
        else:
            self.mode = "measure" if full else "plain"
        if full and not b.sharded:
            return False
        return index == micros - 1

    def policy_terms(
        self, per_sample_loss: Callable[[Tensor], Tensor], combined: Tensor | None, columns: Tensor | None,
        share: float,
    ) -> dict[str, Tensor]:  # fmt: skip
        """The policy terms of one micro-batch for the current ``mode``.

        Args:
            per_sample_loss: advantages ``(B,)`` -> per-sample policy losses ``(B,)`` at this micro-batch's forward.
            combined: ``(B,)`` the micro-batch's combined advantages (``sum``, ``gdpo``).
            columns: ``(B, K)`` its per-reward advantages (NaN = abstains).
            share: the micro-batch's share of its optimizer step's loss.
        """
        terms: dict[str, Tensor] = {}
        if self.mode in ("plain", "measure"):
            terms["loss_policy"] = share * per_sample_loss(combined).mean()
        if self.mode in ("measure", "solve", "amortised"):
            losses = [share * loss for loss in reward_losses(per_sample_loss, columns)]
            if self.mode == "amortised":
                terms["loss_policy"] = self.balancer.amortised_loss(losses)
            else:
                terms[REWARD_LOSSES] = torch.stack(losses)
        return terms

    def backward(
        self, terms: dict[str, Tensor], epoch: int, default: Callable[[dict[str, Tensor], int], None]
    ) -> None:
        """Back-propagate a micro-step's ``terms`` for its ``mode``; ``default`` is the trainer seam's own backward
        (plain and amortised steps)."""
        if self.mode in ("plain", "amortised"):
            default(terms, epoch)
            return
        losses = list(terms.pop(REWARD_LOSSES).unbind())
        rest = [v for k, v in terms.items() if k.startswith("loss_")]
        if self.mode == "measure":
            update = torch.stack(rest).sum()
            check_finite(update.detach(), "training loss", epoch)
            report = self.balancer.measure(losses, update, self._step)
        else:
            regulariser = torch.stack(rest).sum() if rest else None
            if regulariser is not None:
                check_finite(regulariser.detach(), "training loss (the regulariser)", epoch)
            report = self.balancer.solve(losses, self._step, regulariser)
        self._reports.append(report)

    # ------------------------------------------------------------------------------------------- state, logs
    def restore(self) -> None:
        """Load the balancer's state from the checkpointed tensors (call at the start of every ``update``)."""
        if self.balancer is None:
            return
        has, last, solves, _, _ = self._state["balance_counters"].tolist()
        self.balancer.load_state_dict({"names": self.names, "last_full": None if last < 0 else int(last),
                                       "weights": self._state["balance_weights"].clone() if has else None,
                                       "solves": int(solves)})  # fmt: skip

    def store(self) -> None:
        """Write the balancer's state into the checkpointed tensors (call at the end of every ``update``)."""
        if self.balancer is None:
            return
        state = self.balancer.state_dict()
        counters = self._state["balance_counters"]
        if state["weights"] is not None:
            self._state["balance_weights"].copy_(state["weights"])
        counters[0] = float(state["weights"] is not None)
        counters[1] = -1.0 if state["last_full"] is None else float(state["last_full"])
        counters[2] = float(state["solves"])

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's balance logs (module docstring); clears the epoch's reports."""
        if self.balancer is None:
            return {}
        out: dict[str, float] = {}
        if self._reports:
            rows = [r.metrics() for r in self._reports]
            for key in rows[0]:
                values = torch.tensor([row.get(key, float("nan")) for row in rows], dtype=torch.float64)
                out[key] = float(values.nanmean()) if bool((~torch.isnan(values)).any()) else float("nan")
            counters = self._state["balance_counters"]
            counters[3] += len(rows)
            counters[4] += sum(1 for r in self._reports if r.min_cosine < 0)
            out["balance/reports"] = float(len(rows))
        counters = self._state["balance_counters"]
        if counters[3] > 0:
            out["balance/negative_fraction_run"] = float(counters[4] / counters[3])
        weights = self.balancer.weights
        if weights is not None:
            out.update({f"balance/alpha/{n}": float(w) for n, w in zip(self.names, weights, strict=True)})
        self._reports = []
        return out
