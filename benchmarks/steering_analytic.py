"""Steering on analytic targets: energy distance to the exact ``p(x) exp(lam r(x))`` against NFE.

    python benchmarks/steering_analytic.py                      # short run: 3 targets, lam 1 2 4, 8k and 32k NFE
    python benchmarks/steering_analytic.py --full               # 2k-128k NFE, 5 seeds, all 4 targets
    python benchmarks/steering_analytic.py --targets mixture-linear --lams 4 --budgets 128000 --seeds 8 \\
        --dts-args widening=3

The base model is the exact rectified flow to a Gaussian mixture (closed-form velocity,
``diffalign.steering.analytic``), sampled with the Flow-GRPO SDE in 40 steps (40 NFE a sample). Targets:

- ``ring``: 8 modes on a circle of radius 3, reward ``cos(4 angle)`` (favours every other mode);
- ``mixture-linear``: 5 modes in 2-D, linear reward ``<c, x>``, so the target is again a mixture, known exactly;
- ``mixture-tanh``: the same mixture, reward ``tanh(3 <c, x>)`` (bounded, saturating);
- ``mixture8-linear`` (``--full``): 6 modes in 8-D, linear reward.

Reference: 20k exact target draws (``tilt_linear``, or rejection sampling for the bounded rewards). Each method's
output measure is compared with them by energy distance (``measure_energy_distance``: repeated and heavily
weighted points count as they would for a sampler):

- ``dts``: the weighted DTS read-out distribution (``DiffusionTree.leaf_probabilities``), ``dts-paper`` the
  published read-out (``readout="paper"``); both exact, no read-out draws;
- ``smc``: FK steering (``diff`` potential), its K = NFE / 40 particles with their final weights (the
  distribution its final resampling draws from);
- ``is``: importance sampling, NFE / 40 plain samples weighted by ``exp(lam r)`` (a reference, not a toolkit
  method: it is what every consistent method has to beat);
- ``best_of_n``: best of 4, as many outputs as the budget buys; ``doob``: MC look-ahead with 4 candidates, as
  many samples as the budget buys.

``floor`` is ``E|Y - Y'| / (NFE / 40)``, the expected distance of NFE / 40 exact target draws (a weighted output
can beat it). Prints one row per target, lam, budget and method (mean +- std over seeds, mean reward of the
output measure, its effective sample size), then a summary table of mean distances with DTS / SMC ratios.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.steering import SteeringProblem, steer
from diffalign.steering.analytic import (
    GaussianMixture,
    GaussianMixtureFlow,
    alternating_reward,
    mean_pairwise_distance,
    measure_energy_distance,
    rejection_sample,
)
from diffalign.steering.doob import doob_cost

METHODS = ("dts", "dts-paper", "smc", "is", "best_of_n", "doob")
TARGETS = ("ring", "mixture-linear", "mixture-tanh", "mixture8-linear")
REFERENCE = 20_000


@dataclass
class Target:
    """A base mixture, a reward and how to draw exact target samples."""

    mixture: GaussianMixture
    reward: Callable[[Tensor], Tensor]
    exact: Callable[[float, int, torch.Generator], Tensor]


def random_mixture(modes: int, dim: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(modes, dim, generator=g)
    return GaussianMixture(means, 0.3 + 0.2 * torch.rand(modes, generator=g), 0.5 + torch.rand(modes, generator=g))


def build_target(name: str) -> Target:
    if name == "ring":
        ring = GaussianMixture.ring()
        return Target(ring, alternating_reward, lambda lam, n, g: rejection_sample(ring, alternating_reward, lam, n,
                                                                                    1.0, g))  # fmt: skip
    if name.startswith("mixture8"):
        mixture, c = random_mixture(6, 8, seed=1), 0.5 * torch.nn.functional.normalize(torch.ones(8), dim=0)
    else:
        mixture, c = random_mixture(5, 2, seed=0), torch.tensor([0.3, 0.4])

    def linear(z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], -1).float() @ c

    if name.endswith("linear"):
        return Target(mixture, linear, lambda lam, n, g: mixture.tilt_linear(c, lam).sample(n, g))

    def saturating(z: Tensor) -> Tensor:
        return torch.tanh(3 * linear(z))

    return Target(mixture, saturating, lambda lam, n, g: rejection_sample(mixture, saturating, lam, n, 1.0, g))


def output_measure(method: str, problem: SteeringProblem, budget: int, seed: int, dts_args: dict) -> tuple:
    """``(points (n, D), weights (n,), nfe)``: the method's output distribution for one run."""
    g = torch.Generator().manual_seed(seed)
    if method in ("dts", "dts-paper"):
        args = {"wave_size": 32, **dts_args} if method == "dts" else {"wave_size": 32, "readout": "paper"}
        out = steer(problem, "dts", budget, generator=g, **args)
        tree = out.info["tree"]
        ids, probs = tree.leaf_probabilities()
        return torch.stack([tree.nodes[i].state for i in ids]), probs, out.nfe
    if method == "smc":
        out = steer(problem, "smc", budget, generator=g)
        return out.info["weighted_latents"], torch.softmax(out.info["final_log_weights"], 0), out.nfe
    if method == "is":
        out = steer(problem, "best_of_n", budget, num_samples=budget // problem.sample_cost, generator=g)
        rewards = out.rewards.double()
        return out.latents, torch.softmax(problem.inverse_temperature * rewards, 0), out.nfe
    if method == "best_of_n":
        out = steer(problem, "best_of_n", budget, num_samples=budget // (4 * problem.sample_cost), generator=g)
    else:
        n = budget // doob_cost(problem, "mc", 4)
        out = steer(problem, "doob", budget, num_samples=n, num_candidates=4, generator=g)
    return out.latents, torch.ones(out.latents.shape[0], dtype=torch.float64), out.nfe


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, help="default: the first 3 (--full: all 4)")
    parser.add_argument("--lams", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--budgets", nargs="+", type=int, default=[8000, 32000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="budgets 2k 8k 32k 128k and 5 seeds")
    parser.add_argument("--dts-args", nargs="*", default=[], help="DiffusionTree options for 'dts', e.g. widening=3")
    args = parser.parse_args()
    if args.targets is None:
        args.targets = list(TARGETS if args.full else TARGETS[:3])
    if args.full:
        args.budgets, args.seeds = [2000, 8000, 32000, 128000], 5
    args.dts_args = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (a.split("=") for a in args.dts_args)}
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"{'target':>15} {'lam':>4} {'NFE':>7} {'method':>10} {'energy dist.':>17} {'floor':>7} {'reward':>7} "
          f"{'target r':>8} {'ESS':>6} {'s/run':>6}", flush=True)  # fmt: skip
    summary: dict[tuple[str, float, int], dict[str, float]] = {}
    for name in args.targets:
        target = build_target(name)
        flow = GaussianMixtureFlow(target.mixture)
        for lam in args.lams:
            reference = target.exact(lam, REFERENCE, torch.Generator().manual_seed(12345))
            spread = mean_pairwise_distance(reference)
            target_reward = float(target.reward(reference).mean())
            problem = SteeringProblem(flow=flow, cond=flow.cond(), times=torch.linspace(1, 0, args.steps + 1),
                                      shape=(target.mixture.dim, 1, 1), reward=target.reward,
                                      inverse_temperature=lam)  # fmt: skip
            for budget in args.budgets:
                floor = spread / (budget // problem.sample_cost)
                row = summary.setdefault((name, lam, budget), {"floor": floor})
                for method in args.methods:
                    if method == "doob" and budget < doob_cost(problem, "mc", 4):
                        continue
                    start, distances, rewards, ess, nfe = time.time(), [], [], [], 0
                    for seed in range(args.seeds):
                        x, w, used = output_measure(method, problem, budget, seed, args.dts_args)
                        w = w.double() / w.sum()
                        distances.append(measure_energy_distance(x, reference, w, y_spread=spread))
                        rewards.append(float((w * target.reward(x).double()).sum()))
                        ess.append(float(1 / (w**2).sum()))
                        nfe = max(nfe, used)
                    d = torch.tensor(distances)
                    row[method] = float(d.mean())
                    print(f"{name:>15} {lam:>4g} {budget:>7} {method:>10} {d.mean():>8.4f} +- {d.std():.4f} "
                          f"{floor:>7.4f} {sum(rewards) / len(rewards):>7.3f} {target_reward:>8.3f} "
                          f"{sum(ess) / len(ess):>6.0f} {(time.time() - start) / args.seeds:>6.1f}",
                          flush=True)  # fmt: skip
    methods = [m for m in args.methods]
    print("\nmean energy distance (lower is better); DTS / SMC: ratio of their distances")
    print("| target | lam | NFE | floor | " + " | ".join(methods) + (" | DTS / SMC |" if {"dts", "smc"} <= set(
        methods) else " |"))  # fmt: skip
    print("|" + " --- |" * (4 + len(methods) + ({"dts", "smc"} <= set(methods))))
    for (name, lam, budget), row in summary.items():
        best = min(row[m] for m in methods if m in row)
        cells = [(f"**{row[m]:.4f}**" if row[m] == best else f"{row[m]:.4f}") if m in row else "-" for m in methods]
        ratio = [f"{row['dts'] / row['smc']:.2f}"] if {"dts", "smc"} <= set(methods) else []
        print(f"| {name} | {lam:g} | {budget} | {row['floor']:.4f} | " + " | ".join(cells + ratio) + " |")


if __name__ == "__main__":
    main()
