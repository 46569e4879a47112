"""The min-norm point of the convex hull of K vectors, solved on their Gram matrix (MGDA: Désidéri 2012; Sener and
Koltun 2018, arXiv 1810.04650).

Given K vectors g_1..g_K and their Gram matrix ``G_ij = g_i . g_j``, find weights on the simplex::

    w* = argmin_w  w^T G w     subject to  w >= 0,  sum_k w_k = 1

so that ``d = sum_k w*_k g_k`` is the shortest vector in the convex hull. Its optimality (KKT) conditions read
``d . g_k >= |d|^2`` for every k, with equality where ``w*_k > 0``: when 0 is not in the hull, ``d`` has a positive
inner product with every ``g_k`` (a common ascent direction); when it is, ``d = 0`` (Pareto-stationary). ``d`` is
unique; ``w*`` is unique only when the vectors on its support are affinely independent.

Two solvers, both on the K x K matrix only (never the vectors), in float64, deterministic:

- ``exact`` (the default up to ``max_exact`` vectors): enumerate every support S. On S the problem with the
  inequalities dropped is the linear KKT system ``G_SS w = lambda 1, 1^T w = 1``; it is non-singular exactly when
  the vectors of S are affinely independent, and the optimum lies in the relative interior of the hull of such an S
  (Caratheodory). Every solution with ``w >= 0`` is a feasible point, so the optimum is the feasible candidate of
  smallest objective (ties: the smallest support, then the first in lexicographic order).
- ``frank_wolfe`` (beyond): Frank-Wolfe with away steps (Lacoste-Julien and Jaggi 2015) and the exact line search on
  the segment between the current point and a vertex (the two-point step of Sener and Koltun's MGDA solver). It
  stops when the duality gap ``w^T G w - min_k (G w)_k`` (the largest KKT violation) is below ``tol``.

Rows whose vector is zero (``sqrt(G_kk) <= zero_tol``) or non-finite are excluded (weight 0) and reported.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor


class BalanceError(ValueError):
    """Nothing to balance: no valid gradient, no valid reward, or an unusable configuration."""


@dataclass(frozen=True)
class MinNormSolution:
    """The min-norm point of the hull.

    Attributes:
        weights: ``(K,)`` float64 on the simplex, 0 for excluded rows.
        norm_sq: ``|d|^2 = w^T G w``.
        gap: the duality gap ``w^T G w - min_k (G w)_k`` over the valid rows (the largest KKT violation; >= 0 up to
            rounding).
        method: ``exact``, ``frank_wolfe`` or ``single`` (one valid row: weight 1).
        excluded: row index -> ``"zero"`` or ``"non-finite"``.
        iterations: Frank-Wolfe iterations (the number of supports tried for ``exact``).
    """

    weights: Tensor
    norm_sq: float
    gap: float
    method: str
    excluded: dict[int, str] = field(default_factory=dict)
    iterations: int = 0


def invalid_rows(gram: Tensor, zero_tol: float = 1e-12) -> dict[int, str]:
    """Rows of ``gram`` ``(K, K)`` to exclude: ``"non-finite"`` when ``G_kk`` is NaN or inf, ``"zero"`` when
    ``sqrt(G_kk) <= zero_tol`` (a NaN anywhere in a vector makes its whole row and column NaN)."""
    diag = torch.diagonal(gram).double()
    out: dict[int, str] = {}
    for k, value in enumerate(diag.tolist()):
        if not math.isfinite(value):
            out[k] = "non-finite"
        elif value <= zero_tol**2:
            out[k] = "zero"
    return out


def min_norm_weights(
    gram: Tensor,
    method: Literal["auto", "exact", "frank_wolfe"] = "auto",
    max_exact: int = 8,
    zero_tol: float = 1e-12,
    tol: float = 1e-12,
    max_iter: int = 100_000,
) -> MinNormSolution:
    """Weights of the min-norm point of the convex hull of the vectors behind ``gram``.

    Args:
        gram: ``(K, K)`` symmetric positive semi-definite Gram matrix (any float dtype; solved in float64).
        method: ``exact`` (support enumeration), ``frank_wolfe``, or ``auto``: exact for at most ``max_exact``
            valid rows (2^K - 1 small linear systems), Frank-Wolfe beyond.
        zero_tol: a row whose vector norm ``sqrt(G_kk)`` is at most this is excluded as zero.
        tol: Frank-Wolfe stops at a duality gap below ``tol * max_k G_kk``.
        max_iter: Frank-Wolfe iteration cap (the result still reports its gap).

    Raises:
        BalanceError: no valid row (every vector is zero or non-finite), or non-finite entries between valid rows.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square (K, K) matrix, got shape {tuple(gram.shape)}")
    if method not in ("auto", "exact", "frank_wolfe"):
        raise ValueError(f"unknown method {method!r}; expected auto, exact or frank_wolfe")
    G = gram.detach().to(device="cpu", dtype=torch.float64)
    K = G.shape[0]
    excluded = invalid_rows(G, zero_tol)
    valid = [k for k in range(K) if k not in excluded]
    if not valid:
        zero = [k for k, why in excluded.items() if why == "zero"]
        bad = [k for k, why in excluded.items() if why == "non-finite"]
        raise BalanceError(f"no valid vector to balance: all {K} are zero {zero} or non-finite {bad}")
    Gv = G[valid][:, valid]
    if not torch.isfinite(Gv).all():
        raise BalanceError(f"the Gram matrix has non-finite entries between valid rows {valid}")
    Gv = 0.5 * (Gv + Gv.T)
    if len(valid) == 1:
        wv, used, iterations = torch.ones(1, dtype=torch.float64), "single", 0
    elif method == "exact" or (method == "auto" and len(valid) <= max_exact):
        (wv, iterations), used = _exact(Gv), "exact"
    else:
        (wv, iterations), used = _frank_wolfe(Gv, tol * float(torch.diagonal(Gv).max()), max_iter), "frank_wolfe"
    weights = torch.zeros(K, dtype=torch.float64)
    weights[valid] = wv
    Gw = Gv @ wv
    norm_sq = float(wv @ Gw)
    return MinNormSolution(weights=weights, norm_sq=norm_sq, gap=norm_sq - float(Gw.min()), method=used,
                           excluded=excluded, iterations=iterations)  # fmt: skip


def _affine_min_norm(G: Tensor, supports: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``supports`` ``(C, s)``, the min-norm point of the affine hull of its vectors: the solution of
    the bordered KKT system ``[[G_SS, 1], [1^T, 0]] [w; -lambda] = [0; 1]``. Returns ``(C, s)`` weights (summing to
    1) and a ``(C,)`` mask of the systems that are non-singular (affinely independent vectors)."""
    count, size = supports.shape
    system = torch.zeros(count, size + 1, size + 1, dtype=torch.float64)
    system[:, :size, :size] = G[supports[:, :, None], supports[:, None, :]]
    system[:, :size, size] = 1.0
    system[:, size, :size] = 1.0
    rhs = torch.zeros(count, size + 1, dtype=torch.float64)
    rhs[:, size] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = solution[:, :size]
    return w, (info == 0) & torch.isfinite(w).all(dim=1)


def _exact(G: Tensor) -> tuple[Tensor, int]:
    """Support enumeration, one batch of KKT systems per support size; among the non-singular systems whose
    weights are all >= 0 (feasible points), the one of smallest objective. Returns it and the number of supports."""
    K = G.shape[0]
    scale = float(torch.diagonal(G).max())
    best_objective, best = float("inf"), None
    tried = 0
    for size in range(1, K + 1):
        supports = torch.tensor(list(itertools.combinations(range(K), size)), dtype=torch.long)  # (C, size)
        tried += supports.shape[0]
        w, ok = _affine_min_norm(G, supports)
        feasible = ok & (w >= -1e-12).all(dim=1)
        if not bool(feasible.any()):
            continue
        w = w[feasible].clamp(min=0)
        w = w / w.sum(dim=1, keepdim=True)
        block = G[supports[feasible][:, :, None], supports[feasible][:, None, :]]
        objective = torch.einsum("ci,cij,cj->c", w, block, w)
        c = int(torch.argmin(objective))  # the first of equal minima: the lexicographically first support
        if float(objective[c]) < best_objective - 1e-13 * scale:  # ties keep the smaller support
            best_objective = float(objective[c])
            best = torch.zeros(K, dtype=torch.float64)
            best[supports[feasible][c]] = w[c]
    if best is None:  # a single vertex is always a non-singular support when G_kk > 0
        raise BalanceError("the exact min-norm solver found no feasible support (the Gram matrix is not PSD)")
    return best, tried


def _polish(G: Tensor, w: Tensor) -> Tensor:
    """Wolfe's minor cycle (Wolfe 1976) on the support of ``w``: move to the min-norm point of the support's affine
    hull, or, if that leaves the simplex, as far towards it as stays feasible, dropping the vertex that reaches 0;
    repeat. The objective never increases; a singular support (affinely dependent vectors) returns ``w``."""
    while True:
        support = (w > 0).nonzero().flatten()
        v, ok = _affine_min_norm(G, support[None])
        if not bool(ok[0]):
            return w
        v = v[0]
        if bool((v >= 0).all()):
            target = torch.zeros_like(w)
            target[support] = v
            return target if float(target @ G @ target) <= float(w @ G @ w) else w
        current = w[support]
        shrinking = v < 0
        ratios = current[shrinking] / (current[shrinking] - v[shrinking])
        theta = float(ratios.min())
        moved = current + theta * (v - current)
        moved[int(shrinking.nonzero().flatten()[torch.argmin(ratios)])] = 0.0
        w = torch.zeros_like(w)
        w[support] = moved.clamp(min=0)
        w /= w.sum()


def _frank_wolfe(G: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int]:
    """Away-step Frank-Wolfe on ``min w^T G w`` over the simplex, from the vertex of smallest norm. Each step moves
    along one segment (towards the best vertex, or away from the worst vertex of the support) with the exact line
    search ``gamma = -(dir^T G w) / (dir^T G dir)`` clipped to the segment. Every K steps the point is polished by
    Wolfe's minor cycle on its support (``_polish``), which lands on the exact optimum once the support is right."""
    K = G.shape[0]
    w = torch.zeros(K, dtype=torch.float64)
    w[int(torch.argmin(torch.diagonal(G)))] = 1.0
    iteration = 0
    while iteration < max_iter:
        iteration += 1
        Gw = G @ w
        objective = float(w @ Gw)
        toward = int(torch.argmin(Gw))
        fw_gap = objective - float(Gw[toward])
        if fw_gap <= tol:
            break
        support = (w > 0).nonzero().flatten()
        away = int(support[torch.argmax(Gw[support])])
        away_gap = float(Gw[away]) - objective
        if fw_gap >= away_gap:
            direction = -w.clone()
            direction[toward] += 1.0
            gamma_max = 1.0
        else:
            direction = w.clone()
            direction[away] -= 1.0
            gamma_max = float(w[away] / (1.0 - w[away]))
        curvature = float(direction @ G @ direction)
        slope = float(direction @ Gw)
        gamma = gamma_max if curvature <= 0 else min(max(-slope / curvature, 0.0), gamma_max)
        w = w + gamma * direction
        if fw_gap < away_gap and gamma == gamma_max:
            w[away] = 0.0  # a drop step removes the away vertex from the support exactly
        w = w.clamp(min=0)
        w /= w.sum()
        if iteration % K == 0:
            w = _polish(G, w)
    return w, iteration
