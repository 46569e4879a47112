"""The ``diffalign`` command line: ``diffalign COMMAND CONFIG [key=value ...]``.

Commands: ``train`` (RL fine-tuning), ``sample`` (prompts -> images + grid), ``steer`` (inference-time steering
toward a reward), ``eval`` (the embedded world's held-out benchmark), ``pretrain`` (build a world base model),
``score`` and ``train-reward`` (rewards),
``show-config`` (print the resolved config), ``tiny`` (save a tiny random-weight pipeline of a family),
``release`` (a run folder -> a diffusers-loadable folder with a model card, optionally pushed to the Hub) and
``demo`` (a Gradio page: prompt in, steered images out).

This module imports only the standard library at start-up: a command's modules (torch, diffusers...) are imported
when that command runs, so ``diffalign --help`` and ``diffalign COMMAND --help`` answer at once. Before a command
loads any model it checks what can be checked without one (the output folder, the device, that the model folder
holds the configured family and can produce the sampling size), so a bad value fails before any weights load,
naming its key.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("diffalign")

# kind -> "module:Class" of its job schema (``train`` jobs are looked up by algorithm in diffalign.algorithms)
JOBS: dict[str, str] = {
    "sample": "diffalign.config:SampleJob",
    "pretrain": "diffalign.recipes.world_pretrain:PretrainJob",
    "eval": "diffalign.recipes.world_eval:EvalJob",
    "steer": "diffalign.steering.jobs:SteerJob",
    "score": "diffalign.rewards.scoring:ScoreJob",
    "train-reward": "diffalign.algorithms.reward_model:TrainRewardJob",
}

# The project's own errors (bad input, or a run stopped on purpose, e.g. on a NaN loss): reported as one line with
# exit code 2. Any other exception is a bug, or an input nothing checks yet, and keeps its traceback. Given as
# module -> class names and looked up in sys.modules: an exception cannot be an instance of a class whose module
# was never imported, and importing them here would load torch for ``--help``.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "builtins": ("FileNotFoundError", "FloatingPointError"),
    "diffalign.config": ("ConfigError",),
    "diffalign.rewards.base": ("RewardError",),
    "diffalign.rewards.data": ("DataError",),
    "diffalign.rewards.hub": ("CheckpointError",),
    "diffalign.training.checkpoint": ("CheckpointError",),
    "diffalign.steering.base": ("BudgetError",),
    "diffalign.release": ("ReleaseError",),
    "diffalign.demo": ("DemoError",),
}


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one of :data:`USER_ERRORS` (reported as one line, not a traceback)."""
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, n) for n in names)):
            return True
    return False


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def job_schema(kind: str) -> type:
    """The job dataclass of a (non-train) ``kind``."""
    from diffalign.config import ConfigError

    if kind not in JOBS:
        raise ConfigError(f"unknown kind {kind!r}; expected one of {sorted([*JOBS, 'train'])}")
    return _import(JOBS[kind])


def _train_job_class(path: str) -> tuple[type, type]:
    from diffalign.algorithms import ALGORITHMS
    from diffalign.config import ConfigError, _read_yaml

    name = _read_yaml(path).get("algorithm", "flow_grpo")
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm': unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def _load_job(kind: str, path: str, overrides: list[str]) -> Any:
    from diffalign.config import ConfigError, load_config, read_kind

    found = read_kind(path)
    if found != kind:
        raise ConfigError(f"{path} is a '{found}' config; 'diffalign {kind}' needs kind: {kind}")
    if kind == "train":
        return load_config(_train_job_class(path)[0], path, overrides)
    return load_config(job_schema(kind), path, overrides)


def preflight(job: Any, out: str, out_name: str) -> None:
    """Everything that can be checked before a model loads: the output folder can be written, the devices exist
    here, and ``job.model`` (if any) is a pipeline of its family that can produce ``job.sampling``'s size."""
    from diffalign.config import ModelConfig, check_output_dir, resolve_device

    check_output_dir(out, out_name)
    if isinstance(getattr(job, "device", None), str):
        resolve_device(job.device, "device")
    model = getattr(job, "model", None)
    if isinstance(model, ModelConfig):
        from diffalign.pipelines import check_pretrained

        resolve_device(model.device, "model.device")
        sampling = getattr(job, "sampling", None)
        check_pretrained(model.family, model.path, getattr(sampling, "height", None), getattr(sampling, "width", None))
        if model.lora and os.path.isdir(model.lora):
            _check_student(model, sampling)


def _check_student(model: Any, sampling: Any) -> None:
    """A DMD student (``student.json`` beside its LoRA) must be of ``model.family``; sampling it with another
    schedule than its own is allowed, with a warning that says how to sample it as trained."""
    from diffalign.algorithms.dmd import check_student_family, read_student

    check_student_family(model.lora, model.family, "model.lora")
    record = read_student(model.lora)
    if record is None or sampling is None:
        return
    trained = {"num_steps": record["num_inference_steps"], "sigmas": record["sigmas"],
               "guidance_scale": record["guidance_scale"], "sde": record.get("sde", "ode")}  # fmt: skip
    if trained["sde"] != "ode":
        trained["noise_level"] = record["noise_level"]
    if any(getattr(sampling, k) != v for k, v in trained.items()):
        hint = " ".join(f"'sampling.{k}={v}'" if k == "sigmas" else f"sampling.{k}={v}" for k, v in trained.items())
        log.warning("%s is a %d-step student; to sample it as trained, set %s", model.lora,
                    record["num_inference_steps"], hint)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- commands
def cmd_sample(args: argparse.Namespace) -> None:
    from diffalign.config import read_prompt_file, save_config
    from diffalign.images import remove_stale_images, save_grid, save_images
    from diffalign.pipelines import load_model
    from diffalign.sampling.generate import generate

    job = _load_job("sample", args.config, args.overrides)
    prompts = read_prompt_file(args.prompts)
    preflight(job, args.out, "--out")
    flow = load_model(job.model)
    flow.latent_shape(job.sampling.height, job.sampling.width)  # fail on a bad size before any sampling
    expanded = [p for p in prompts for _ in range(job.images_per_prompt)]
    os.makedirs(args.out, exist_ok=True)
    save_config(job, os.path.join(args.out, "config.yaml"))
    images = generate(flow, expanded, job.sampling, seed=job.seed, batch_size=job.batch_size)
    paths = save_images(images, args.out)
    remove_stale_images(args.out, len(paths))
    with open(os.path.join(args.out, "index.jsonl"), "w") as f:
        for i, (path, prompt) in enumerate(zip(paths, expanded, strict=True)):
            row = {"file": os.path.basename(path), "prompt": prompt, "seed": job.seed, "index": i}
            f.write(json.dumps(row) + "\n")
    save_grid(images, os.path.join(args.out, "grid.png"), captions=expanded, ncols=job.images_per_prompt)
    log.info("wrote %d images and grid.png to %s", len(paths), args.out)


def cmd_train(args: argparse.Namespace) -> None:
    from diffalign.training.loop import run_training

    job = _load_job("train", args.config, args.overrides)
    preflight(job, job.output_dir, "config key 'output_dir'")
    args.resume_dir = job.output_dir
    run_training(job, _train_job_class(args.config)[1])


def cmd_pretrain(args: argparse.Namespace) -> None:
    from diffalign.recipes.world_pretrain import pretrain

    job = _load_job("pretrain", args.config, args.overrides)
    preflight(job, job.output_dir, "config key 'output_dir'")
    args.resume_dir = job.output_dir
    pretrain(job)


def cmd_eval(args: argparse.Namespace) -> None:
    from diffalign.recipes.world_eval import run_eval

    job = _load_job("eval", args.config, args.overrides)
    preflight(job, args.out or job.out_dir, "--out" if args.out else "config key 'out_dir'")
    run_eval(job, out=args.out)


def cmd_steer(args: argparse.Namespace) -> None:
    from diffalign.config import read_prompt_file
    from diffalign.steering.jobs import run_steer

    job = _load_job("steer", args.config, args.overrides)
    prompts = read_prompt_file(args.prompts)
    preflight(job, args.out, "--out")
    run_steer(job, prompts, args.out)


def cmd_score(args: argparse.Namespace) -> None:
    from diffalign.rewards.scoring import run_score

    job = _load_job("score", args.config, args.overrides)
    preflight(job, args.out, "--out")
    run_score(job, args.images, args.prompts, args.out)


def cmd_train_reward(args: argparse.Namespace) -> None:
    from diffalign.algorithms.reward_model import train_reward

    job = _load_job("train-reward", args.config, args.overrides)
    preflight(job, job.output_dir, "config key 'output_dir'")
    train_reward(job)


def cmd_show_config(args: argparse.Namespace) -> None:
    from diffalign.config import read_kind, to_yaml

    sys.stdout.write(to_yaml(_load_job(read_kind(args.config), args.config, args.overrides)))


def cmd_tiny(args: argparse.Namespace) -> None:
    from diffalign.config import check_output_dir
    from diffalign.files import respect_umask
    from diffalign.pipelines.tiny import build_tiny

    check_output_dir(args.out, "the output folder")
    pipe = build_tiny(args.family, seed=args.seed)
    pipe.save_pretrained(args.out)
    respect_umask(args.out)
    log.info("saved a tiny random-weight %s pipeline to %s", args.family, args.out)


def cmd_release(args: argparse.Namespace) -> None:
    from diffalign.release import release

    release(args.run_dir, args.out, repo_id=args.repo_id, base_model=args.base_model, merge=args.merge,
            push=args.push, private=args.private, space=args.space, force=args.force)  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from diffalign.demo import build_app, serve

    app = build_app(args.model, family=args.family, lora=args.lora, reward=args.reward, device=args.device)
    serve(app, host=args.host, port=args.port)


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
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=20 output_dir=runs/x")
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

    p = sub.add_parser("score", help="score a folder of images with rewards (table, CSV, JSON)")
    p.add_argument("config", help="YAML config with kind: score")
    p.add_argument("--images", required=True, help="folder of images (png/jpg/webp/bmp)")
    p.add_argument("--prompts", default=None,
                   help="text file with one prompt per image (sorted filename order) or an index.jsonl "
                        "(default: DIR/index.jsonl as written by 'diffalign sample')")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (scores.csv, scores.json, config.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=8 rewards.1.weight=0")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train-reward", help="train a preference, artifact or multi-aspect reward model")
    p.add_argument("config", help="YAML config with kind: train-reward")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 output_dir=runs/x")
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("show-config", help="print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("tiny", help="save a tiny random-weight pipeline (for offline trials and tests)")
    p.add_argument("family", choices=["sd3", "flux", "flux2"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("release", help="release a run: a diffusers-loadable folder with a model card (and --push)")
    p.add_argument("run_dir", help="the training run folder (config.yaml, final/, eval_*.json, grids/, curves.png)")
    p.add_argument("--out", required=True, help="release folder to create (written atomically)")
    p.add_argument("--repo-id", default=None, help="Hub repository namespace/name (the card's snippet loads it)")
    p.add_argument("--push", action="store_true", help="upload to --repo-id (token: HF_TOKEN or 'hf auth login')")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--merge", action="store_true", help="release the whole pipeline with the LoRA fused in")
    p.add_argument("--space", action="store_true", help="also write a Gradio Space into OUT/space")
    p.add_argument("--base-model", default=None,
                   help="Hub id of the base model for the card (when model.path is a local copy of it)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("demo", help="serve a Gradio page: prompt in, steered image out (needs diffalign[demo])")
    p.add_argument("model", nargs="?", default="builtin:world-sd3", help="hub id, folder or builtin:NAME")
    p.add_argument("--lora", default=None, help="a LoRA in diffusers' format (a run's final/ or a release)")
    p.add_argument("--family", default=None, choices=["sd3", "flux", "flux2"], help="default: read from the model")
    p.add_argument("--reward", default=None, help="reward registry name (default: world for the world model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_demo)
    return parser


def _resume_hint(args: argparse.Namespace) -> str:
    """What running the same command again does, for a command that resumes from its run folder's checkpoints."""
    run_dir = getattr(args, "resume_dir", None)
    if run_dir is None:
        return ""
    from diffalign.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None:
        return (" before the first checkpoint (one is saved every train.checkpoint_every); the same command starts "
                "the run over")  # fmt: skip
    return f"; the same command resumes from the newest checkpoint, {latest}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
    except KeyboardInterrupt:
        print(f"diffalign {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)  # noqa: T201
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    return 0
