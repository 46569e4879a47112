"""An analytic test bed for steering: a rectified flow whose data distribution is a Gaussian mixture.

With isotropic components ``N(m_k, s_k^2 I)`` and ``x_t = (1 - t) x0 + t eps``, each component's marginal is
``N((1 - t) m_k, a_k^2 I)`` with ``a_k^2 = (1 - t)^2 s_k^2 + t^2``, and the exact velocity is the
responsibility-weighted ``E[eps - x0 | x_t, k]``:

    E[x0 | x_t, k]  = m_k + (1 - t) s_k^2 / a_k^2 (x_t - (1 - t) m_k)
    E[eps | x_t, k] = t / a_k^2 (x_t - (1 - t) m_k)

For a linear reward ``r(x) = <c, x>`` the steering target ``p(x) exp(lam r(x))`` is again a mixture: component
``k`` moves to ``m_k + lam s_k^2 c`` and its weight is multiplied by ``exp(lam <c, m_k> + lam^2 s_k^2 |c|^2 / 2)``
(``tilt_linear``), so steered samples can be compared with exact target samples (``energy_distance``). For a
bounded reward ``r <= r_max`` rejection sampling of base draws with acceptance ``exp(lam (r - r_max))`` gives
exact target draws as well (``rejection_sample``). ``measure_energy_distance`` compares a weighted output (a
tree's read-out distribution, SMC's weighted particles) with those draws. The target's mass on each mixture
component (``target_mode_weights``, by self-normalised importance weighting of 400k exact draws) gives the
coarse-grained total variation ``mode_tv``; the ring's ``alternating_reward`` ``cos(K/2 * angle)`` favours
every other mode.
Latents are ``(B, D, 1, 1)``, the image convention with a 1x1 "image" of D channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.types import Cond


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture: ``means (K, D)``, ``stds (K,)``, ``weights (K,)`` (normalised here)."""

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        self.means = self.means.double()
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).expand(k).clone()
        if bool((self.stds <= 0).any()) or bool((self.weights < 0).any()):
            raise ValueError("mixture stds must be > 0 and weights >= 0")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 3.0, std: float = 0.4) -> GaussianMixture:
        """``modes`` equal-weight components evenly spaced on a circle in 2-D."""
        angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return cls(means, torch.tensor(std), torch.ones(modes))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, D)`` float32 draws."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * noise).float()

    def tilt_linear(self, direction: Tensor, lam: float) -> GaussianMixture:
        """The exact ``p(x) exp(lam <direction, x>)`` (module docstring)."""
        c = direction.double().view(1, -1)
        log_w = torch.log(self.weights) + lam * (self.means * c).sum(1) + 0.5 * lam**2 * self.stds**2 * (c**2).sum()
        return GaussianMixture(self.means + lam * self.stds[:, None] ** 2 * c, self.stds, torch.softmax(log_w, 0))


class GaussianMixtureFlow:
    """The exact velocity field of the rectified flow to a ``GaussianMixture`` (a ``VelocityField``).

    ``nfe`` counts evaluated rows like ``FlowModel.velocity``; conditioning is ignored (``cond()`` gives an
    empty-prompt ``Cond`` of the requested batch), and ``guidance`` must be None.
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture = mixture
        self.nfe = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def cond(self, batch: int = 1) -> Cond:
        return Cond(embeds=torch.zeros(batch, 1, 1), prompts=[""] * batch)

    def empty_cond(self, batch: int) -> Cond:
        return self.cond(batch)

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Cond, guidance: float | None = None) -> Tensor:
        """``(B, D, 1, 1)`` exact velocity at ``(x_t, t)``."""
        if guidance is not None:
            raise ValueError("the analytic flow has no guidance embedding")
        b = x_t.shape[0]
        x = x_t.reshape(b, -1).double()
        tt = torch.as_tensor(t, dtype=torch.float64).expand(b).reshape(b, 1, 1)
        m = self.mixture.means[None]  # (1, K, D)
        s2 = self.mixture.stds[None, :, None] ** 2  # (1, K, 1)
        a2 = (1 - tt) ** 2 * s2 + tt**2  # (B, K, 1)
        centred = x[:, None] - (1 - tt) * m  # (B, K, D)
        log_resp = torch.log(self.mixture.weights)[None] - 0.5 * (
            (centred**2).sum(-1) / a2[..., 0] + self.mixture.dim * torch.log(a2[..., 0])
        )
        resp = torch.softmax(log_resp, dim=1)[..., None]  # (B, K, 1)
        x0 = m + (1 - tt) * s2 / a2 * centred
        eps = tt / a2 * centred
        self.nfe += b
        return (resp * (eps - x0)).sum(1).float().view_as(x_t)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between sample sets ``(n, D)`` and ``(m, D)``.

    Within-set terms exclude the diagonal (U-statistics), so independent draws from the same distribution give
    ~0 for any n; repeated points (e.g. duplicated particles) are not free.
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()

    def mean_dist(a: Tensor, b: Tensor, same: bool) -> float:
        d = torch.cdist(a, b)
        if same:
            n = a.shape[0]
            return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0
        return float(d.mean())

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)


def _mean_distance(a: Tensor, b: Tensor, weights: Tensor | None = None, chunk: int = 2048) -> float:
    """``sum_i w_i mean_j |a_i - b_j|`` (``w`` uniform when None), in row chunks so large sets fit in memory."""
    w = torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=torch.float64) if weights is None else weights
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        d = torch.cdist(a[start : start + chunk], b)
        total += float((w[start : start + chunk, None] * d).sum()) / b.shape[0]
    return total


def measure_energy_distance(
    x: Tensor, y: Tensor, weights: Tensor | None = None, y_spread: float | None = None
) -> float:
    """Energy distance between the discrete measure ``sum_i w_i delta(x_i)`` and the distribution ``y`` was drawn
    from: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with ``X, X'`` independent draws of the measure (so repeated or
    heavily weighted points cost what they cost a sampler that returns them) and ``E|Y - Y'|`` over distinct pairs.

    Args:
        x: ``(n, ...)`` support points; ``weights``: ``(n,)`` non-negative (normalised here; None = uniform).
        y: ``(m, ...)`` independent draws of the reference distribution.
        y_spread: ``E|Y - Y'|`` when already known (``mean_pairwise_distance(y)``), to skip recomputing it.

    For ``n`` independent draws of the reference with equal weights its expectation is ``E|Y - Y'| / n``: the
    sampling floor of an ``n``-sample output.
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    w = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64) if weights is None else weights.double()
    if bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    within = 0.0
    for start in range(0, x.shape[0], 2048):
        d = torch.cdist(x[start : start + 2048], x)
        within += float((w[start : start + 2048, None] * d * w[None]).sum())
    spread = mean_pairwise_distance(y) if y_spread is None else y_spread
    return 2 * _mean_distance(x, y, w) - within - spread


def mean_pairwise_distance(y: Tensor) -> float:
    """``E|Y - Y'|`` over the distinct pairs of ``(m, ...)`` samples."""
    y = y.reshape(y.shape[0], -1).double()
    m = y.shape[0]
    return _mean_distance(y, y) * m / (m - 1)


def rejection_sample(
    mixture: GaussianMixture,
    reward: Callable[[Tensor], Tensor],
    lam: float,
    num: int,
    r_max: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(num, D)`` exact draws of ``p(x) exp(lam r(x))`` for a reward bounded by ``r_max``: base draws accepted
    with probability ``exp(lam (r - r_max))``."""
    kept: list[Tensor] = []
    count = 0
    while count < num:
        x = mixture.sample(max(4 * num, 10_000), generator)
        r = reward(x).double()
        if bool((r > r_max + 1e-6).any()):
            raise ValueError(f"reward exceeds r_max={r_max}: max {float(r.max())}")
        accept = torch.rand(x.shape[0], generator=generator, dtype=torch.float64) < torch.exp(lam * (r - r_max))
        kept.append(x[accept])
        count += int(accept.sum())
    return torch.cat(kept)[:num]


def alternating_reward(z: Tensor, modes: int = 8) -> Tensor:
    """``cos(modes/2 * angle(z))``: +1 at the even modes of ``GaussianMixture.ring(modes)``, -1 at the odd ones."""
    z = z.reshape(z.shape[0], -1).float()
    return torch.cos(modes / 2 * torch.atan2(z[:, 1], z[:, 0]))


def nearest_mode(mixture: GaussianMixture, x: Tensor) -> Tensor:
    """``(n,)`` index of the component mean nearest to each sample."""
    return torch.cdist(x.reshape(x.shape[0], -1).double(), mixture.means).argmin(1)


def target_mode_weights(
    mixture: GaussianMixture, reward: Callable[[Tensor], Tensor], lam: float, num: int = 400_000, seed: int = 0
) -> Tensor:
    """``(K,)`` mass of ``p(x) exp(lam r(x))`` on each component's nearest-mode cell (importance weighting)."""
    x = mixture.sample(num, torch.Generator().manual_seed(seed))
    w = torch.softmax(lam * reward(x).double(), 0)
    return torch.zeros(len(mixture.weights), dtype=torch.float64).index_add_(0, nearest_mode(mixture, x), w)


def mode_tv(mixture: GaussianMixture, x: Tensor, target: Tensor, weights: Tensor | None = None) -> float:
    """Total variation between the (optionally weighted) nearest-mode histogram of ``x`` and ``target`` (K,)."""
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double()
    hist = torch.zeros(len(target), dtype=torch.float64).index_add_(0, nearest_mode(mixture, x), w)
    return 0.5 * float((hist / hist.sum() - target).abs().sum())
