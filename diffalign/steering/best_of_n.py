"""Best-of-N: draw N independent samples per output and keep the highest-reward one.

The baseline every inference-time search is compared with (DTS paper, arXiv 2506.20701, Sec. 5; FK steering,
arXiv 2501.06848). With a budget of ``B`` NFE and ``n`` outputs, each output gets ``N = B // (n * sample_cost)``
candidates. Ties go to the first candidate, so a constant reward returns exactly what plain sampling with the
same generator returns.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffalign.steering.base import SteeringProblem, SteeringResult, chunks


@torch.no_grad()
def best_of_n(
    problem: SteeringProblem,
    budget: int,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> SteeringResult:
    """Best-of-N under an NFE budget.

    Args:
        problem: the prompt, sampler and reward.
        budget: NFE available; must buy at least one full sample per output.
        num_samples: outputs n.
        generator: noise source (initial noise and every stochastic step).
        batch_size: candidates per sampler call.

    Returns:
        ``SteeringResult`` with the n winners; ``info["candidates"]`` = N and ``info["all_rewards"]`` ``(n, N)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    budget = problem.check_budget(budget, num_samples * problem.sample_cost, f"{num_samples} samples")
    per_output = budget // (num_samples * problem.sample_cost)
    total = per_output * num_samples
    nfe_start = problem.flow.nfe
    finals, rewards = [], []
    for size in tqdm(chunks(total, batch_size), desc="best-of-N", disable=not progress, leave=False):
        traj = problem.sample(size, generator)
        finals.append(traj.final)
        rewards.append(problem.score(traj.final, "best-of-N"))
    candidates = torch.cat(finals).view(num_samples, per_output, *problem.shape)
    all_rewards = torch.cat(rewards).view(num_samples, per_output)
    best = all_rewards.argmax(dim=1)
    rows = torch.arange(num_samples, device=best.device)
    return SteeringResult(
        latents=candidates[rows.to(candidates.device), best.to(candidates.device)],
        rewards=all_rewards[rows, best],
        nfe=problem.flow.nfe - nfe_start,
        method="best_of_n",
        info={"candidates": per_output, "all_rewards": all_rewards},
    )


def best_of_n_curve(rewards: list[float], correct: list[bool]) -> list[tuple[float, float]]:
    """Expected (reward, accuracy) of the best of ``n`` draws without replacement from one pool, ``n = 1..len(pool)``.

    The exact mean over all size-``n`` subsets of the pool (ties broken by correctness), so one pool of ``N``
    samples per prompt gives best-of-n for every ``n <= N`` without resampling. Returns ``len(rewards)`` pairs.
    """
    order = sorted(range(len(rewards)), key=lambda k: (rewards[k], correct[k]))
    size = len(order)
    # weights[n - 1, r] = C(r, n - 1) / C(size, n) for the 0-based rank r, through log-gamma (pools of thousands)
    n = torch.arange(1, size + 1, dtype=torch.float64)[:, None]
    r = torch.arange(size, dtype=torch.float64)[None, :]
    log_comb_r = torch.lgamma(r + 1) - torch.lgamma(n) - torch.lgamma((r - n + 2).clamp(min=1))
    log_weights = (
        log_comb_r - torch.lgamma(torch.tensor(size + 1.0)) + torch.lgamma(n + 1) + torch.lgamma(size - n + 1)
    )
    weights = torch.where(r >= n - 1, log_weights.exp(), torch.zeros(()))
    values = torch.tensor([[rewards[k], float(correct[k])] for k in order], dtype=torch.float64)
    return [(float(a), float(b)) for a, b in (weights @ values).tolist()]
