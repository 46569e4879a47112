"""MARBLE: balancing several rewards by the min-norm point of their policy gradients (arXiv 2605.06507), on any
trainer whose loss can be computed per reward from one shared forward pass (Flow-GRPO, DiffusionNFT).

A trainer gives, per micro-step, K per-reward losses ``L_k`` (``reward_losses``: its loss with reward k's advantages,
averaged over the samples where reward k does not abstain) and an optional regulariser ``R`` (the KL to the
reference). A **solve** micro-step (``GradientBalancer.solve``) computes::

    g_k = grad L_k  (k = 1..K),  g_R = grad R               K + 1 backward passes through one retained graph
    G_ij = g_i . g_j,  n_k = sqrt(G_kk)                     float64; a zero or non-finite g_k is excluded
    Ghat_ij = G_ij / (n_i n_j)                              the Gram matrix of the unit gradients g_k / n_k
    w = argmin_{w in simplex} w^T Ghat w                    ``qp.min_norm_weights``
    u = mean_k(n_k) sum_k w_k g_k / n_k = sum_k c_k g_k     rescaled by the mean raw norm
    .grad += u + g_R                                         the regulariser stays outside the balancing
    alpha <- rho alpha + (1 - rho) w                         an EMA of the weights (the first solve sets alpha = w)

Because of the normalisation the weights do not change when one reward's gradient is scaled. By the KKT conditions
of the QP, ``u . g_k >= 0`` for every reward (with equality only when 0 is in the hull: then ``u = 0``).

Between solves (a solve every ``every`` optimizer steps) an **amortised** micro-step is one ordinary backward of
``amortised_loss = sum_k alpha_k L_k``, whose gradient is exactly ``sum_k alpha_k g_k``; for a loss that is affine in
the advantage (DiffusionNFT without clipping) that equals the loss of ``combined_advantages = sum_k alpha_k A_k``.
This combines the *raw* gradients with the weights found for the *unit* ones, so it matches the solve's direction
only when the gradient norms are equal, and its cosine guarantee holds only approximately (as in MARBLE). With
``amortise: coefficients`` the EMA is taken over the solve's coefficients ``c_k = w_k mean(n) / n_k`` instead, so
that an amortised step on the solve's own batch reproduces its update ``u`` exactly; rewards whose raw gradients are
small (a dense reward against sparse specialists) then keep their share between solves. With one
valid reward on a solve step, the update is that reward's raw gradient; with every gradient zero, only ``g_R``.

Distributed (through the ``Accelerator`` the balancer is given; never ``torch.distributed`` directly):

- DDP (replicated parameters): run the solve micro-step's forward and ``solve`` inside ``solve_context(model)``
  (DDP's ``no_sync``): the balancer averages the K + 1 local gradients over processes in one all-reduce and writes
  the averaged combined gradient, identical on every process.
- FSDP2 (``DTensor`` shards): gradient synchronisation must be on during the solve (no ``no_sync``): each backward
  leaves every process its shard of the averaged gradient, the Gram matrix is the sum of the local shards' Gram
  matrices (one all-reduce of K x K numbers), and each process adds its shard of ``u + g_R``.

Either way every process solves the same QP on the same Gram matrix and gets the same weights. A solve micro-step
must come first in its optimizer step's accumulation (``due`` says when), so that no gradient of the step is
pending a synchronisation when it runs. ``.grad`` accumulated before ``solve`` is kept and added to.

``measure`` is the diagnostic counterpart for the ``sum`` and ``gdpo`` methods: it backpropagates the trainer's own
loss and each reward's, writes the former's gradient, and reports the cosine between that update and every reward's
gradient (the quantity MARBLE shows to be negative in most batches under a weighted sum).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from diffalign.balance.qp import BalanceError, MinNormSolution, invalid_rows, min_norm_weights
from diffalign.config import ConfigError

log = logging.getLogger("diffalign.balance")

METHODS = ("sum", "gdpo", "marble")


@dataclass(kw_only=True)
class BalanceConfig:
    """How several rewards combine (config section ``balance``).

    Attributes:
        method: ``sum``: one advantage from the weighted sum of the rewards (Flow-GRPO's behaviour); ``gdpo``:
            each reward normalised per prompt, summed, then normalised over the batch; ``marble``: per-reward
            gradients balanced by the min-norm QP [sum].
        every: a full solve (``marble``) or a gradient-conflict measurement (``sum``, ``gdpo``) every this many
            optimizer steps [10, MARBLE].
        ema: the decay rho of the EMA of the QP weights used between solves; 0 uses the last solve's [0.7, MARBLE].
        amortise: what that EMA averages: ``weights``, the QP weights ``w`` of the unit gradients applied to the raw
            ones [MARBLE]; ``coefficients``, the solve's raw-gradient coefficients ``c = w mean(n) / n`` (module
            docstring).
    """

    method: Literal["sum", "gdpo", "marble"] = "sum"
    every: int = 10
    ema: float = 0.7
    amortise: Literal["weights", "coefficients"] = "weights"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"config key 'balance.method': expected one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"config key 'balance.every': must be an integer >= 1, got {self.every!r}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"config key 'balance.ema': must be in [0, 1), got {self.ema!r}")
        if self.amortise not in ("weights", "coefficients"):
            raise ConfigError(f"config key 'balance.amortise': expected 'weights' or 'coefficients', "
                              f"got {self.amortise!r}")  # fmt: skip


# ----------------------------------------------------------------------------------------------- Gram-level maths
@dataclass(frozen=True)
class MarbleSolution:
    """The balanced combination of K gradients, from their Gram matrix.

    Attributes:
        weights: ``(K,)`` float64 QP weights of the unit gradients (0 for excluded ones).
        coefficients: ``(K,)`` float64 ``c_k = w_k mean(n) / n_k``: the update is ``sum_k c_k g_k`` (raw gradients).
        norms: ``(K,)`` float64 raw gradient norms ``n_k`` (NaN where non-finite).
        excluded: index -> ``"zero"`` or ``"non-finite"``.
        status: ``balanced``, ``single`` (one valid gradient: ``c = 1`` for it) or ``all_zero`` (``c = 0``).
        qp: the QP's solution (None for ``all_zero``).
    """

    weights: Tensor
    coefficients: Tensor
    norms: Tensor
    excluded: dict[int, str]
    status: str
    qp: MinNormSolution | None = None


def marble_solution(gram: Tensor, zero_tol: float = 1e-12) -> MarbleSolution:
    """Normalise, solve the min-norm QP, rescale by the mean raw norm (see the module docstring).

    Args:
        gram: ``(K, K)`` Gram matrix of the raw per-reward gradients.
        zero_tol: gradients with a norm at most this are excluded as zero.

    Raises:
        BalanceError: no gradient is valid and at least one is non-finite (an all-zero set is ``all_zero``).
    """
    G = gram.detach().to(device="cpu", dtype=torch.float64)
    K = G.shape[0]
    excluded = invalid_rows(G, zero_tol)
    diag = torch.diagonal(G)
    norms = torch.where(torch.isfinite(diag), diag.clamp(min=0).sqrt(), torch.full_like(diag, float("nan")))
    valid = [k for k in range(K) if k not in excluded]
    zeros = torch.zeros(K, dtype=torch.float64)
    if not valid:
        bad = [k for k, why in excluded.items() if why == "non-finite"]
        if bad:
            raise BalanceError(f"no gradient to balance: gradients {bad} are non-finite and the others zero")
        return MarbleSolution(weights=zeros, coefficients=zeros.clone(), norms=norms, excluded=excluded,
                              status="all_zero")  # fmt: skip
    idx = torch.tensor(valid)
    n = norms[idx]
    unit = torch.zeros_like(G)  # excluded rows stay zero, so the QP leaves them out too
    unit[idx[:, None], idx] = G[idx[:, None], idx] / (n[:, None] * n[None, :])
    qp = min_norm_weights(unit, zero_tol=zero_tol)
    coefficients = zeros.clone()
    coefficients[valid] = qp.weights[valid] * n.mean() / n
    return MarbleSolution(weights=qp.weights, coefficients=coefficients, norms=norms, excluded=excluded,
                          status="single" if len(valid) == 1 else "balanced", qp=qp)  # fmt: skip


def update_cosines(gram: Tensor, coefficients: Tensor, zero_tol: float = 1e-12, cancel_tol: float = 1e-5) -> Tensor:
    """``(M,)`` cosines between the update ``u = sum_j c_j g_j`` and each ``g_k``, from the ``(M, M)`` Gram matrix:
    ``(G c)_k / (sqrt(c^T G c) n_k)``. NaN for a zero (norm <= ``zero_tol``) or non-finite ``g_k``; 0 when the
    update is zero or cancels to ``|u| <= cancel_tol * sum_j |c_j| n_j``. Such an update is a Pareto-stationary
    point, e.g. two rewards whose gradients are opposite: the rounding of float32 gradients (about 1e-7 of their
    norms) is all that is left of it, so its direction is noise and its cosines are not measurements."""
    G = gram.detach().to(device="cpu", dtype=torch.float64)
    c = coefficients.to(torch.float64)
    used = c != 0
    inner = G[:, used] @ c[used]
    update_sq = update_norm_sq(G, c)
    norms = torch.diagonal(G).clamp(min=0).sqrt()
    scale = float((c[used].abs() * norms[used]).sum())
    cancelled = update_sq <= 0 or update_sq**0.5 <= cancel_tol * scale
    cos = torch.zeros_like(norms) if cancelled else inner / (update_sq**0.5 * norms)
    cos[list(invalid_rows(G, zero_tol))] = float("nan")
    return cos


def update_norm_sq(gram: Tensor, coefficients: Tensor) -> float:
    """``|sum_j c_j g_j|^2 = c^T G c`` over the non-zero coefficients (excluded, possibly non-finite, rows of the
    ``(M, M)`` Gram matrix are not touched)."""
    G = gram.detach().to(device="cpu", dtype=torch.float64)
    c = coefficients.to(torch.float64)
    used = c != 0
    return max(float(c[used] @ G[used][:, used] @ c[used]), 0.0) if bool(used.any()) else 0.0


# ----------------------------------------------------------------------------------------------- trainer helpers
def reward_losses(per_sample_loss: Callable[[Tensor], Tensor], advantages: Tensor) -> list[Tensor]:
    """One loss per reward from a per-sample loss of the advantages.

    Args:
        per_sample_loss: advantages ``(B,)`` -> per-sample losses ``(B,)`` (for example Flow-GRPO's clipped
            surrogate at this micro-batch's ratios); called once per reward on the same forward pass.
        advantages: ``(B, K)``, NaN where a reward abstains.

    Returns:
        K scalars: reward k's per-sample loss averaged over the samples where it has an advantage (the others get
        advantage 0 and are masked out); 0 (still attached to the graph) when it has none in this micro-batch.
    """
    if advantages.ndim != 2:
        raise ValueError(f"advantages must be (B, K), got shape {tuple(advantages.shape)}")
    valid = ~torch.isnan(advantages)
    filled = torch.nan_to_num(advantages, nan=0.0)
    out = []
    for k in range(advantages.shape[1]):
        values = per_sample_loss(filled[:, k])
        if values.shape != (advantages.shape[0],):
            raise ValueError(f"per_sample_loss must return ({advantages.shape[0]},), got {tuple(values.shape)}")
        mask = valid[:, k]
        out.append(torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1))
    return out


@dataclass(frozen=True)
class BalanceReport:
    """What one solve or measurement found; ``metrics()`` flattens it for logging.

    Attributes:
        names: the K reward names.
        kind: ``solve`` (marble) or ``measure`` (sum, gdpo).
        status: ``balanced``, ``single``, ``all_zero`` (solve) or ``measured``.
        weights: ``(K,)`` this solve's QP weights (None for a measurement).
        ema_weights: ``(K,)`` the weights amortised steps use after this solve (None before the first solve).
        grad_norms: ``(K,)`` raw per-reward gradient norms (NaN where non-finite; without any loss scaling).
        cosines: ``(K,)`` cosine between the update and each reward's gradient (NaN for excluded rewards).
        update_norm: norm of the update (the balanced direction ``u``, or the measured loss's gradient), without
            the regulariser.
        excluded: reward name -> ``"zero"`` or ``"non-finite"``.
    """

    names: list[str]
    kind: str
    status: str
    weights: Tensor | None
    ema_weights: Tensor | None
    grad_norms: Tensor
    cosines: Tensor
    update_norm: float
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def min_cosine(self) -> float:
        """The smallest cosine over the rewards that were not excluded (NaN if all were)."""
        finite = self.cosines[torch.isfinite(self.cosines)]
        return float(finite.min()) if finite.numel() else float("nan")

    def metrics(self, prefix: str = "balance") -> dict[str, float]:
        """``{prefix}/weight/<name>``, ``ema_weight/<name>``, ``grad_norm/<name>``, ``cos/<name>``, ``min_cos``,
        ``min_cos_negative`` (1 or 0: its mean over logged steps is the fraction of negative batches),
        ``update_norm`` and ``excluded`` (how many rewards)."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            if self.weights is not None:
                out[f"{prefix}/weight/{name}"] = float(self.weights[k])
            if self.ema_weights is not None:
                out[f"{prefix}/ema_weight/{name}"] = float(self.ema_weights[k])
            out[f"{prefix}/grad_norm/{name}"] = float(self.grad_norms[k])
            out[f"{prefix}/cos/{name}"] = float(self.cosines[k])
        out[f"{prefix}/min_cos"] = self.min_cosine
        out[f"{prefix}/min_cos_negative"] = float(self.min_cosine < 0)
        out[f"{prefix}/update_norm"] = self.update_norm
        out[f"{prefix}/excluded"] = float(len(self.excluded))
        return out


# ----------------------------------------------------------------------------------------------- the balancer
def _local(tensor: Tensor) -> Tensor:
    """This process's part of a tensor: the local shard of a ``DTensor``, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class GradientBalancer:
    """Per-reward gradients, the QP weights and their EMA, for one set of trained parameters.

    Args:
        cfg: the ``balance`` section.
        names: the K reward names, in the order of the losses and advantage columns.
        params: the trained parameters (all plain tensors, or all FSDP2 ``DTensor`` shards).
        accelerator: the run's ``Accelerator`` (None: one process, plain ``loss.backward``). Its GradScaler, if
            any, scales the backward passes as in ordinary steps.
        zero_tol: a gradient with a norm at most this is excluded as zero.

    Raises:
        ConfigError: ``marble`` with fewer than two rewards.
    """

    def __init__(
        self,
        cfg: BalanceConfig,
        names: Sequence[str],
        params: Sequence[Tensor],
        accelerator: Any | None = None,
        zero_tol: float = 1e-12,
    ) -> None:
        self.cfg = cfg
        self.names = list(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"need distinct reward names, got {self.names}")
        if cfg.method == "marble" and len(self.names) < 2:
            raise ConfigError(f"config key 'balance.method': marble balances several rewards, got only "
                              f"{self.names}; use balance.method=sum for one reward")  # fmt: skip
        self.params = list(params)
        if not self.params or not all(p.requires_grad for p in self.params):
            raise ValueError("the balancer needs a non-empty list of parameters that require grad")
        shard = [isinstance(p, DTensor) for p in self.params]
        if any(shard) and not all(shard):
            raise ValueError("the parameters must be all sharded (FSDP2 DTensor) or all plain tensors")
        self.sharded = all(shard)
        if self.sharded and accelerator is None:
            raise ValueError("sharded (FSDP2) parameters need the accelerator to reduce the Gram matrix")
        self.accelerator = accelerator
        self.zero_tol = zero_tol
        self._numel = sum(_local(p).numel() for p in self.params)
        self._alpha: Tensor | None = None
        self._last_full: int | None = None
        self.solves = 0

    # ------------------------------------------------------------------------------------------- schedule, state
    @property
    def weights(self) -> Tensor | None:
        """``(K,)`` float64: the EMA of the QP weights (or coefficients, ``cfg.amortise``) that amortised steps use
        (None before the first solve)."""
        return None if self._alpha is None else self._alpha.clone()

    def due(self, optimizer_step: int) -> bool:
        """Whether the micro-step about to run at ``optimizer_step`` should be a solve (``marble``) or a measurement
        (``sum``, ``gdpo``): at the first micro-step, then at the first micro-step of every ``every``-th optimizer
        step after the last one (and, for ``marble``, until a solve has found weights)."""
        if self._last_full is None or (self.cfg.method == "marble" and self._alpha is None):
            return True
        return optimizer_step - self._last_full >= self.cfg.every

    def solve_context(self, model: torch.nn.Module):
        """The context for the forward and the backward passes of a solve or measurement micro-step: DDP's
        ``no_sync`` with several processes and replicated parameters (the balancer reduces the gradients itself),
        else nothing."""
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1 and not self.sharded:
            return acc.no_sync(model)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The amortisation state (for checkpoints): names, EMA weights, last full step, number of solves."""
        return {"names": list(self.names), "weights": self._alpha, "last_full": self._last_full, "solves": self.solves}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"balancer state is for rewards {state['names']}, this run has {self.names}")
        weights = state["weights"]
        if weights is not None and tuple(weights.shape) != (len(self.names),):
            raise ValueError(f"balancer state weights have shape {tuple(weights.shape)}, need ({len(self.names)},)")
        self._alpha = None if weights is None else weights.detach().to(torch.float64).cpu().clone()
        self._last_full = state["last_full"]
        self.solves = int(state["solves"])

    # ------------------------------------------------------------------------------------------- amortised steps
    def amortised_loss(self, losses: Sequence[Tensor]) -> Tensor:
        """``sum_k alpha_k L_k`` with the EMA weights: one ordinary backward of it gives ``sum_k alpha_k g_k``."""
        alpha = self._require_weights()
        if len(losses) != len(self.names):
            raise ValueError(f"need {len(self.names)} losses ({self.names}), got {len(losses)}")
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        return stacked @ alpha.to(device=stacked.device, dtype=stacked.dtype)

    def combined_advantages(self, advantages: Tensor) -> Tensor:
        """``(B, K)`` per-reward advantages (NaN = abstains, counted as 0) -> ``(B,)`` ``sum_k alpha_k A_k``, for a
        loss that is affine in the advantage (DiffusionNFT): its gradient then equals ``amortised_loss``'s up to the
        masked samples, which count here with advantage 0 instead of being left out of each reward's mean."""
        alpha = self._require_weights()
        if advantages.ndim != 2 or advantages.shape[1] != len(self.names):
            raise ValueError(f"advantages must be (B, {len(self.names)}), got shape {tuple(advantages.shape)}")
        filled = torch.nan_to_num(advantages, nan=0.0)
        return filled @ alpha.to(device=filled.device, dtype=filled.dtype)

    def _require_weights(self) -> Tensor:
        if self.cfg.method != "marble":
            raise BalanceError(f"amortised steps belong to balance.method=marble, not {self.cfg.method!r}")
        if self._alpha is None:
            raise BalanceError("no QP weights yet: the first micro-step must be a solve (see GradientBalancer.due)")
        return self._alpha

    # ------------------------------------------------------------------------------------------- full steps
    def solve(self, losses: Sequence[Tensor], optimizer_step: int, regulariser: Tensor | None = None) -> BalanceReport:
        """A full MARBLE micro-step: per-reward gradients, QP, ``.grad += u + g_R``, EMA update.

        Args:
            losses: K scalar losses (``reward_losses``) from one forward pass; each backward retains the graph
                except the last, which frees it.
            optimizer_step: the optimizer step this micro-step belongs to (for ``due``).
            regulariser: a scalar loss whose gradient is added outside the balancing (the KL term), or None.

        Raises:
            BalanceError: every reward gradient is non-finite or zero with at least one non-finite, or the
                regulariser's gradient is non-finite.
        """
        if self.cfg.method != "marble":
            raise BalanceError(f"solve belongs to balance.method=marble, not {self.cfg.method!r}; use measure")
        K = len(self.names)
        extra = []
        if regulariser is not None:
            if regulariser.numel() != 1 or not regulariser.requires_grad:
                raise ValueError("the regulariser must be a scalar that depends on the parameters (or None)")
            extra = [regulariser]
        rows, gram = self._gradients(self._check_losses(losses) + extra)
        if regulariser is not None and not bool(torch.isfinite(gram[K, K])):
            raise BalanceError("the regulariser's gradient is non-finite")
        solution = marble_solution(gram[:K, :K], self.zero_tol)
        self._warn_non_finite(solution.excluded)
        coefficients = solution.coefficients
        self._add_to_grads(rows, torch.cat([coefficients, torch.ones(len(extra), dtype=torch.float64)]))
        if solution.status != "all_zero":
            w = solution.weights if self.cfg.amortise == "weights" else solution.coefficients
            self._alpha = w.clone() if self._alpha is None else self.cfg.ema * self._alpha + (1 - self.cfg.ema) * w
            self.solves += 1
        if self._alpha is not None:
            self._last_full = optimizer_step
        return BalanceReport(names=self.names, kind="solve", status=solution.status, weights=solution.weights,
                             ema_weights=self.weights, grad_norms=solution.norms,
                             cosines=update_cosines(gram[:K, :K], coefficients, self.zero_tol),
                             update_norm=update_norm_sq(gram[:K, :K], coefficients) ** 0.5,
                             excluded={self.names[k]: why for k, why in solution.excluded.items()})  # fmt: skip

    def measure(self, losses: Sequence[Tensor], update: Tensor, optimizer_step: int) -> BalanceReport:
        """A ``sum`` / ``gdpo`` micro-step that also measures gradient conflict: backpropagates each reward's loss and
        the trainer's own ``update`` loss (last, freeing the graph), writes ``.grad += grad update``, and reports the
        cosine between that update and each reward's gradient.

        Raises:
            BalanceError: the update's gradient is non-finite.
        """
        if self.cfg.method == "marble":
            raise BalanceError("measure belongs to balance.method=sum or gdpo; marble solves (see solve)")
        K = len(self.names)
        if update.numel() != 1 or not update.requires_grad:
            raise ValueError("the update loss must be a scalar that depends on the parameters")
        rows, gram = self._gradients(self._check_losses(losses) + [update])
        if not bool(torch.isfinite(gram[K, K])):
            raise BalanceError("the gradient of the update loss is non-finite")
        coefficients = torch.zeros(K + 1, dtype=torch.float64)
        coefficients[K] = 1.0
        self._add_to_grads(rows, coefficients)
        self._last_full = optimizer_step
        excluded = invalid_rows(gram[:K, :K], self.zero_tol)
        self._warn_non_finite(excluded)
        diag = torch.diagonal(gram)[:K]
        norms = torch.where(torch.isfinite(diag), diag.clamp(min=0).sqrt(), torch.full_like(diag, float("nan")))
        return BalanceReport(names=self.names, kind="measure", status="measured", weights=None, ema_weights=None,
                             grad_norms=norms, cosines=update_cosines(gram, coefficients, self.zero_tol)[:K],
                             update_norm=update_norm_sq(gram, coefficients) ** 0.5,
                             excluded={self.names[k]: why for k, why in excluded.items()})  # fmt: skip

    # ------------------------------------------------------------------------------------------- internals
    def _check_losses(self, losses: Sequence[Tensor]) -> list[Tensor]:
        if len(losses) != len(self.names):
            raise ValueError(f"need {len(self.names)} losses ({self.names}), got {len(losses)}")
        for name, loss in zip(self.names, losses, strict=True):
            if loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"the loss of reward {name!r} must be a scalar that depends on the parameters "
                                 "(reward_losses always gives one)")  # fmt: skip
        return list(losses)

    def _backward(self, loss: Tensor, retain_graph: bool) -> None:
        if self.accelerator is None:
            loss.backward(retain_graph=retain_graph)
        else:
            self.accelerator.backward(loss, retain_graph=retain_graph)

    def _gradients(self, losses: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Backpropagate each loss alone; returns this process's ``(M, P)`` gradient rows (float32, or float64 for a
        float64 model) as ``.grad`` holds them (times the GradScaler's scale, if any; averaged over processes under
        DDP; this process's shard of the averaged gradient under FSDP2) and the ``(M, M)`` float64 CPU Gram matrix of
        the whole, unscaled gradients. The ``.grad`` present before is set aside and restored."""
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        first = _local(self.params[0])
        dtype = torch.promote_types(torch.float32, first.dtype)  # float32, or float64 for a float64 model
        rows = torch.zeros(len(losses), self._numel, dtype=dtype, device=first.device)
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            for i, loss in enumerate(losses):
                self._backward(loss, retain_graph=i < len(losses) - 1)
                offset = 0
                for p in self.params:
                    n = _local(p).numel()
                    if p.grad is not None:
                        rows[i, offset : offset + n] = _local(p.grad).detach().reshape(-1)
                        p.grad = None
                    offset += n
        finally:
            for p, grad in zip(self.params, saved, strict=True):
                p.grad = grad
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1 and not self.sharded:
            rows = acc.reduce(rows, reduction="mean")
        gram = torch.zeros(len(losses), len(losses), dtype=torch.float64, device=rows.device)
        for start in range(0, self._numel, 1 << 22):  # float64 products, a column block at a time
            block = rows[:, start : start + (1 << 22)].double()
            gram += block @ block.T
        if self.sharded:
            gram = acc.reduce(gram, reduction="sum")
        return rows, gram.cpu() / scale**2

    @torch.no_grad()
    def _add_to_grads(self, rows: Tensor, coefficients: Tensor) -> None:
        """``.grad += sum_i coefficients_i rows_i`` (rows with a zero coefficient, possibly non-finite, skipped)."""
        used = (coefficients != 0).nonzero().flatten().tolist()
        if not used:
            return
        direction = coefficients[used].to(device=rows.device, dtype=rows.dtype) @ rows[used]
        offset = 0
        for p in self.params:
            local = _local(p)
            n = local.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            _local(p.grad).add_(direction[offset : offset + n].view_as(local).to(local.dtype))
            offset += n

    def _warn_non_finite(self, excluded: dict[int, str]) -> None:
        bad = [self.names[k] for k, why in excluded.items() if why == "non-finite"]
        if bad:
            log.warning("balance: the gradients of rewards %s are non-finite; they are left out of this step", bad)
