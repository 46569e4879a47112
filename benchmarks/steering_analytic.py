"""Steering on the analytic target: distance to the exact ``p(x) exp(lam r(x))`` versus NFE.

    python benchmarks/steering_analytic.py [--lams 1 2 4] [--budgets 2000 8000 32000 128000] [--seeds 5]

The base model is the exact rectified flow to an 8-mode ring of Gaussians in 2-D (closed-form velocity,
``diffalign.steering.analytic``), sampled with the Flow-GRPO SDE in 40 steps. The reward ``cos(4 angle)`` favours
every other mode; the exact target's mass on each mode comes from importance weighting 400k exact draws. The
distance is the total variation between a method's output distribution over modes and the target's:

- DTS: the exact distribution of its read-out (``DiffusionTree.leaf_probabilities``: no read-out sampling noise);
- SMC: its K = budget / 40 final particles (equal weights after the final resampling); best-of-N: best of 4, as
  many outputs as the budget buys; Doob (MC look-ahead, 4 candidates): as many samples as the budget buys.

Each cell is mean +- std over seeds. ``floor`` is the mode TV of the same number of exact target draws (the
metric's sampling noise for that many outputs; DTS's read-out distribution has none). Prints one table and, for
each SMC budget, the smallest DTS budget that matches its distance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffalign.steering import SteeringProblem, steer  # noqa: E402
from diffalign.steering.analytic import (  # noqa: E402
    GaussianMixture,
    GaussianMixtureFlow,
    alternating_reward,
    mode_tv,
    target_mode_weights,
)
from diffalign.steering.doob import doob_cost  # noqa: E402


def floor(lam: float, n: int, target: torch.Tensor, repeats: int = 10) -> float:
    """Mean mode TV of ``n`` exact target draws (importance resampling of many exact mixture draws)."""
    mixture = GaussianMixture.ring()
    values = []
    for seed in range(repeats):
        x = mixture.sample(20_000, torch.Generator().manual_seed(1000 + seed))
        w = torch.softmax(lam * alternating_reward(x).double(), 0)
        idx = torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(seed))
        values.append(mode_tv(mixture, x[idx], target))
    return sum(values) / len(values)


def run(method: str, problem: SteeringProblem, budget: int, seed: int, target: torch.Tensor) -> tuple[float, int, int]:
    g = torch.Generator().manual_seed(seed)
    mixture = problem.flow.mixture
    if method == "dts":
        out = steer(problem, "dts", budget, num_samples=1, generator=g, wave_size=16)
        tree = out.info["tree"]
        ids, probs = tree.leaf_probabilities()
        return mode_tv(mixture, torch.stack([tree.nodes[i].state for i in ids]), target, probs), out.nfe, 0
    if method == "best_of_n":
        out = steer(problem, "best_of_n", budget, num_samples=budget // (4 * problem.sample_cost), generator=g)
    elif method == "doob":
        n = budget // doob_cost(problem, "mc", 4)
        out = steer(problem, "doob", budget, num_samples=n, num_candidates=4, generator=g)
    else:
        out = steer(problem, "smc", budget, generator=g)
    return mode_tv(mixture, out.latents, target), out.nfe, out.latents.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lams", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--budgets", nargs="+", type=int, default=[2000, 8000, 32000, 128000])
    parser.add_argument("--methods", nargs="+", default=["dts", "smc", "best_of_n", "doob"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mixture = GaussianMixture.ring()
    flow = GaussianMixtureFlow(mixture)
    header = ("lam", "budget", "method", "mode TV", "NFE", "outputs", "floor", "s/run")
    print("{:>4} {:>7} {:>10} {:>15} {:>7} {:>7} {:>6} {:>6}".format(*header))
    for lam in args.lams:
        target = target_mode_weights(mixture, alternating_reward, lam)
        problem = SteeringProblem(flow=flow, cond=flow.cond(), times=torch.linspace(1, 0, args.steps + 1),
                                  shape=(2, 1, 1), reward=alternating_reward, inverse_temperature=lam)  # fmt: skip
        results: dict[tuple[str, int], float] = {}
        for budget in args.budgets:
            for method in args.methods:
                if method == "doob" and budget < doob_cost(problem, "mc", 4):
                    continue
                start = time.time()
                runs = [run(method, problem, budget, seed, target) for seed in range(args.seeds)]
                tv = torch.tensor([r[0] for r in runs])
                results[(method, budget)] = float(tv.mean())
                per_run = (time.time() - start) / len(runs)
                outputs = runs[0][2]
                noise = f"{floor(lam, outputs, target):>6.3f}" if outputs else f"{'-':>6}"
                nfe = max(r[1] for r in runs)
                print(f"{lam:>4g} {budget:>7} {method:>10} {tv.mean():>7.3f} +- {tv.std():.3f} "
                      f"{nfe:>7} {outputs or '-':>7} {noise} {per_run:>6.2f}", flush=True)  # fmt: skip
        if "dts" in args.methods and "smc" in args.methods:
            for smc_budget in args.budgets:
                smc_tv = results[("smc", smc_budget)]
                reach = [b for b in args.budgets if results[("dts", b)] <= smc_tv]
                verdict = f"DTS reaches it with {min(reach)} NFE ({smc_budget / min(reach):.2g}x)" if reach else (
                    "DTS does not reach it")  # fmt: skip
                print(f"lam {lam:g}: SMC at {smc_budget} NFE has mode TV {smc_tv:.3f}; {verdict}")


if __name__ == "__main__":
    main()
