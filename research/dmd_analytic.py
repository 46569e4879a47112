"""The analytic DMD2 check (``docs/dmd.md``, "Analytic check"): energy distances to the data of the exact
Gaussian-mixture teacher's Euler ODE and of DMD2 students (``diffalign/algorithms/dmd_analytic.py``), per seed.

``python -m research.dmd_analytic --seeds 0 1 2`` prints a markdown table (mean and min-max over seeds) and the
wall time of each training.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffalign.algorithms.dmd_analytic import (
    AnalyticDMDConfig,
    euler_samples,
    fit_teacher,
    student_samples,
    train_student,
)
from diffalign.steering.analytic import GaussianMixture, energy_distance

STEPS = {1: [1.0, 0.0], 4: [1.0, 0.75, 0.5, 0.25, 0.0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4000, help="draws per energy distance")
    parser.add_argument("--generator-steps", type=int, default=400)
    args = parser.parse_args()
    mixture = GaussianMixture.ring(8, radius=3.0, std=0.4)
    n = args.samples
    rows: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}

    def record(name: str, x: torch.Tensor, data: torch.Tensor) -> None:
        rows.setdefault(name, []).append(energy_distance(x.reshape(n, -1), data))

    for seed in args.seeds:
        ev = torch.Generator().manual_seed(1000 + seed)
        data = mixture.sample(n, ev)
        record("data floor (fresh data draws)", mixture.sample(n, ev), data)
        for steps in (40, 4, 1):
            record(f"teacher Euler ODE, {steps} steps", euler_samples(mixture, steps, n, ev), data)
        start = time.perf_counter()
        init, _ = fit_teacher(mixture, AnalyticDMDConfig(seed=seed), torch.Generator().manual_seed(seed))
        seconds.setdefault("teacher fit", []).append(time.perf_counter() - start)
        for k, sigmas in STEPS.items():
            record(f"teacher fit, {k}-step re-noising sampler (before DMD)", student_samples(init, sigmas, n, 2, ev),
                   data)  # fmt: skip
        for k, stop in ((1, "last"), (4, "last"), (4, "random")):
            cfg = AnalyticDMDConfig(sigmas=STEPS[k], generator_steps=args.generator_steps, stop=stop, seed=seed)
            start = time.perf_counter()
            student, _ = train_student(mixture, cfg, init)
            name = f"DMD2 student, {k} step{'s' if k > 1 else ''}, stop {stop}"
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            record(name, student_samples(student, STEPS[k], n, 2, ev), data)

    print(f"| sampler | energy distance (mean over seeds {args.seeds}) | min - max |")
    print("| --- | --- | --- |")
    for name, values in rows.items():
        print(f"| {name} | {sum(values) / len(values):.4f} | {min(values):.4f} - {max(values):.4f} |")
    print()
    for name, values in seconds.items():
        print(f"{name}: {sum(values) / len(values):.1f} s per seed")


if __name__ == "__main__":
    main()
