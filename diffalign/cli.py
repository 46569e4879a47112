"""The ``diffalign`` command line: ``diffalign COMMAND CONFIG [key=value ...]``.

Commands: ``train`` (RL fine-tuning), ``sample`` (prompts -> images + grid), ``steer`` (inference-time steering
toward a reward), ``eval`` (the embedded world's held-out benchmark), ``pretrain`` (build a world base model),
``score`` and ``train-reward`` (rewards),
``show-config`` (print the resolved config), ``tiny`` (save a tiny random-weight pipeline of a family).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from diffalign.config import (
    ConfigError,
    SampleJob,
    load_config,
    read_kind,
    read_prompt_file,
    resolve_device,
    save_config,
    to_yaml,
)
from diffalign.rewards.base import RewardError
from diffalign.training.checkpoint import CheckpointError

JOBS: dict[str, type] = {"sample": SampleJob}
# errors that mean bad input or a failed run, reported as one line (exit code 2) instead of a traceback
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, TypeError, RewardError, CheckpointError, FloatingPointError)


def _register_jobs() -> None:
    from diffalign.recipes.reward_commands import JOBS as REWARD_JOBS
    from diffalign.recipes.world_eval import EvalJob
    from diffalign.recipes.world_pretrain import PretrainJob
    from diffalign.steering.jobs import SteerJob

    JOBS.update({"pretrain": PretrainJob, "eval": EvalJob, "steer": SteerJob, **REWARD_JOBS})


def _train_job_class(path: str) -> tuple[type, type]:
    from diffalign.algorithms import ALGORITHMS
    from diffalign.config import _read_yaml

    name = _read_yaml(path).get("algorithm", "flow_grpo")
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm': unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


log = logging.getLogger("diffalign")


def _load_job(kind: str, path: str, overrides: list[str]):
    found = read_kind(path)
    if found != kind:
        raise ConfigError(f"{path} is a '{found}' config; 'diffalign {kind}' needs kind: {kind}")
    return load_config(JOBS[kind], path, overrides)


def cmd_sample(args: argparse.Namespace) -> None:
    from diffalign.images import save_grid, save_images
    from diffalign.pipelines import load_flow_model
    from diffalign.sampling.generate import generate

    job: SampleJob = _load_job("sample", args.config, args.overrides)
    prompts = read_prompt_file(args.prompts)
    flow = load_flow_model(
        job.model.family,
        job.model.path,
        dtype=job.model.dtype,
        device=resolve_device(job.model.device),
        lora=job.model.lora,
        max_sequence_length=job.model.max_sequence_length,
    )
    flow.latent_shape(job.sampling.height, job.sampling.width)  # fail on a bad size before any sampling
    expanded = [p for p in prompts for _ in range(job.images_per_prompt)]
    os.makedirs(args.out, exist_ok=True)
    save_config(job, os.path.join(args.out, "config.yaml"))
    images = generate(flow, expanded, job.sampling, seed=job.seed, batch_size=job.batch_size)
    paths = save_images(images, args.out)
    with open(os.path.join(args.out, "index.jsonl"), "w") as f:
        for i, (path, prompt) in enumerate(zip(paths, expanded, strict=True)):
            row = {"file": os.path.basename(path), "prompt": prompt, "seed": job.seed, "index": i}
            f.write(json.dumps(row) + "\n")
    save_grid(images, os.path.join(args.out, "grid.png"), captions=expanded, ncols=job.images_per_prompt)
    log.info("wrote %d images and grid.png to %s", len(paths), args.out)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from diffalign.recipes.world_pretrain import pretrain

    pretrain(_load_job("pretrain", args.config, args.overrides))


def cmd_train(args: argparse.Namespace) -> None:
    from diffalign.config import load_config
    from diffalign.training.loop import run_training

    found = read_kind(args.config)
    if found != "train":
        raise ConfigError(f"{args.config} is a '{found}' config; 'diffalign train' needs kind: train")
    job_cls, trainer_cls = _train_job_class(args.config)
    run_training(load_config(job_cls, args.config, args.overrides), trainer_cls)


def cmd_eval(args: argparse.Namespace) -> None:
    from diffalign.recipes.world_eval import run_eval

    run_eval(_load_job("eval", args.config, args.overrides), out=args.out)


def cmd_steer(args: argparse.Namespace) -> None:
    from diffalign.steering.jobs import run_steer

    job = _load_job("steer", args.config, args.overrides)
    run_steer(job, read_prompt_file(args.prompts), args.out)


def cmd_show_config(args: argparse.Namespace) -> None:
    kind = read_kind(args.config)
    if kind == "train":
        sys.stdout.write(to_yaml(load_config(_train_job_class(args.config)[0], args.config, args.overrides)))
        return
    if kind not in JOBS:
        raise ConfigError(f"{args.config}: unknown kind {kind!r}; expected one of {sorted(JOBS)}")
    sys.stdout.write(to_yaml(load_config(JOBS[kind], args.config, args.overrides)))


def cmd_tiny(args: argparse.Namespace) -> None:
    from diffalign.pipelines.tiny import build_tiny

    pipe = build_tiny(args.family, seed=args.seed)
    pipe.save_pretrained(args.out)
    log.info("saved a tiny random-weight %s pipeline to %s", args.family, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images for a prompt file")
    p.add_argument("config", help="YAML config with kind: sample")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (images, grid.png, index.jsonl, config.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampling.num_steps=20")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="fine-tune a model with an RL algorithm (kind: train)")
    p.add_argument("config", help="YAML config with kind: train and an algorithm (flow_grpo)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="pretrain a world base model (codec + flow matching)")
    p.add_argument("config", help="YAML config with kind: pretrain")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a model on the embedded world's held-out prompts")
    p.add_argument("config", help="YAML config with kind: eval")
    p.add_argument("--out", default=None, help="output folder (default: the config's out_dir)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("steer", help="inference-time steering toward a reward (DTS, DTS*, Doob, SMC, best-of-N)")
    p.add_argument("config", help="YAML config with kind: steer")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (images, grid.png, index.jsonl, summary.json)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=best_of_n budget=400")
    p.set_defaults(func=cmd_steer)

    from diffalign.recipes.reward_commands import add_commands as add_reward_commands

    add_reward_commands(sub)

    p = sub.add_parser("show-config", help="print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("tiny", help="save a tiny random-weight pipeline (for offline trials and tests)")
    p.add_argument("family", choices=["sd3", "flux", "flux2"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _register_jobs()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"'{args.command}' takes no key=value overrides: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    return 0
