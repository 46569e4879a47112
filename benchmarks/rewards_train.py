"""Train the three world reward models from their recipes and print held-out accuracies.

    nice -n 19 python benchmarks/rewards_train.py [--models preference artifact multi_aspect] [--threads 1]
                                                 [--out runs/bench-rewards] [key=value ...]

Runs ``configs/rewards/train_<model>_world.yaml`` (``key=value`` overrides apply to every model, e.g.
``train.steps=300``), then prints one table: for each model and held-out set (fresh scenes of the training
prompts, ``seen_prompts``; the test split's unseen prompt combinations, ``novel_prompts``) the headline metric and
its break-down by pair or artifact kind, with data-synthesis and training wall times. Metrics JSONs stay in
``--out/<model>/metrics.json``.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from diffalign.algorithms.reward_model import TrainRewardJob, train_reward
from diffalign.config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "rewards")


def rows_for(model: str, metrics: dict) -> list[tuple[str, str, str, float]]:
    """``(model, held-out set, metric, value)`` rows."""
    rows = []
    for split, h in metrics["held_out"].items():
        if "pair_accuracy" in h:
            rows.append((model, split, "pair accuracy", h["pair_accuracy"]))
            rows += [(model, split, f"  {k}", v) for k, v in h["by_kind"].items()]
        if "accuracy" in h:
            rows.append((model, split, "accuracy", h["accuracy"]))
            rows += [(model, split, f"  {k}", v) for k, v in h["by_kind"].items()]
        for name, value in h.items():
            if not isinstance(value, dict) or name == "by_kind":
                continue
            if "pair_accuracy" in value:
                rows.append((model, split, f"{name} pair accuracy", value["pair_accuracy"]))
                rows += [(model, split, f"  {k}", v) for k, v in value["by_kind"].items() if k != "alignment"]
            else:
                if "accuracy" in value:
                    rows.append((model, split, f"{name} accuracy", value["accuracy"]))
                rows.append((model, split, f"{name} pearson r", value["pearson"]))
                rows.append((model, split, f"{name} MAE", value["mae"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["artifact", "preference", "multi_aspect"],
                        choices=["artifact", "preference", "multi_aspect"])  # fmt: skip
    parser.add_argument("--out", default="runs/bench-rewards")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    parser.add_argument("--device", default="cpu")
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    table, times = [], []
    for model in args.models:
        path = os.path.join(CONFIGS, f"train_{model}_world.yaml")
        fixed = [f"output_dir={os.path.join(args.out, model)}", f"device={args.device}", f"num_threads={args.threads}",
                 "progress=false"]  # fmt: skip
        job = load_config(TrainRewardJob, path, [*fixed, *overrides])
        metrics = train_reward(job)
        table += rows_for(model, metrics)
        times.append((model, job.train.steps, metrics["train_examples"], metrics["data_seconds"],
                      metrics["train_seconds"]))  # fmt: skip
    print()
    print(f"{'model':<13} {'held-out set':<14} {'metric':<34} {'value':>7}")
    for model, split, metric, value in table:
        print(f"{model:<13} {split:<14} {metric:<34} {value:>7.3f}")
    print()
    print(f"{'model':<13} {'steps':>6} {'train ex.':>9} {'data s':>8} {'train s':>8}  (threads: {args.threads})")
    for model, steps, n, data_s, train_s in times:
        print(f"{model:<13} {steps:>6} {n:>9} {data_s:>8.1f} {train_s:>8.1f}")


if __name__ == "__main__":
    main()
