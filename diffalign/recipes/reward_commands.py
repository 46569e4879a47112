"""Command-line wiring of the reward commands.

``diffalign.cli`` calls :func:`add_commands` with its subparsers and merges :data:`JOBS` into its own table (for
``show-config``):

* ``diffalign score CONFIG --images DIR [--prompts FILE] --out DIR [key=value ...]`` (``kind: score``);
* ``diffalign train-reward CONFIG [key=value ...]`` (``kind: train-reward``).
"""

from __future__ import annotations

import argparse
from typing import Any

from diffalign.algorithms.reward_model import TrainRewardJob
from diffalign.config import ConfigError, load_config, read_kind
from diffalign.rewards.scoring import ScoreJob

JOBS: dict[str, type] = {"score": ScoreJob, "train-reward": TrainRewardJob}


def load_job(kind: str, path: str, overrides: list[str]) -> Any:
    """The job of ``kind`` in the YAML file ``path`` (its ``kind`` must match) with ``key=value`` overrides."""
    found = read_kind(path)
    if found != kind:
        raise ConfigError(f"{path} is a '{found}' config; 'diffalign {kind}' needs kind: {kind}")
    return load_config(JOBS[kind], path, overrides)


def cmd_score(args: argparse.Namespace) -> None:
    """``diffalign score``."""
    from diffalign.rewards.scoring import run_score

    job: ScoreJob = load_job("score", args.config, list(getattr(args, "overrides", []) or []))
    run_score(job, args.images, args.prompts, args.out)


def cmd_train_reward(args: argparse.Namespace) -> None:
    """``diffalign train-reward``."""
    from diffalign.algorithms.reward_model import train_reward

    job: TrainRewardJob = load_job("train-reward", args.config, list(getattr(args, "overrides", []) or []))
    train_reward(job)


def add_commands(subparsers: Any) -> None:
    """Add the ``score`` and ``train-reward`` subcommands to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("score", help="score a folder of images with rewards (table, CSV, JSON)")
    p.add_argument("config", help="YAML config with kind: score")
    p.add_argument("--images", required=True, help="folder of images (png/jpg/webp/bmp)")
    p.add_argument("--prompts", default=None,
                   help="text file with one prompt per image (sorted filename order) or an index.jsonl "
                        "(default: DIR/index.jsonl as written by 'diffalign sample')")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (scores.csv, scores.json, config.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=8")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("train-reward", help="train a preference, artifact or multi-aspect reward model")
    p.add_argument("config", help="YAML config with kind: train-reward")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 output_dir=runs/x")
    p.set_defaults(func=cmd_train_reward)
