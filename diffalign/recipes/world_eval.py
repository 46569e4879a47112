"""``diffalign eval``: sample the world's held-out prompts with a model, print the per-category accuracy table,
write a grid of every image with its verdict and a JSON of the numbers."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import ConfigError, ModelConfig, SamplingConfig, save_config
from diffalign.images import save_grid
from diffalign.pipelines import load_model
from diffalign.recipes.world_benchmark import evaluate_world, format_summary
from diffalign.training.evaluation import select_prompts
from diffalign.world.prompts import split_prompts

log = logging.getLogger("diffalign.eval")


def _world_model() -> ModelConfig:
    return ModelConfig(family="sd3", path="builtin:world-sd3", max_sequence_length=16)


def _world_sampling() -> SamplingConfig:
    return SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)


@dataclass(kw_only=True)
class EvalJob:
    """Evaluate a model (optionally with a LoRA: ``model.lora``) on the embedded world.

    Attributes:
        split: ``test`` (held-out novel bindings), ``test_seen`` (held-out, GenEval-comparable) or ``train``.
        images_per_prompt: samples per prompt (GenEval uses 4).
        max_prompts: evaluate at most this many prompts, taken round-robin over the categories (None: all).
        seed: image ``i`` uses seed ``(seed, i)``; the numbers are reproducible.
        out_dir: where ``eval.json``, ``grid.png`` and ``config.yaml`` go.
    """

    kind: Literal["eval"] = "eval"
    model: ModelConfig = field(default_factory=_world_model)
    sampling: SamplingConfig = field(default_factory=_world_sampling)
    split: Literal["test", "test_seen", "train"] = "test"
    images_per_prompt: int = 4
    max_prompts: int | None = None
    seed: int = 0
    batch_size: int = 32
    out_dir: str = "runs/eval"

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ConfigError("config key 'images_per_prompt': must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError("config key 'max_prompts': must be >= 1")


def run_eval(job: EvalJob, out: str | None = None) -> dict:
    """Run the evaluation; returns the summary dict (also written to ``out/eval.json``)."""
    out = out or job.out_dir
    flow = load_model(job.model)
    flow.latent_shape(job.sampling.height, job.sampling.width)
    os.makedirs(out, exist_ok=True)
    save_config(job, os.path.join(out, "config.yaml"))
    prompts = select_prompts([p.text for p in split_prompts(job.split)], job.max_prompts)
    result = evaluate_world(flow, prompts, job.sampling, images_per_prompt=job.images_per_prompt, seed=job.seed,
                            batch_size=job.batch_size)  # fmt: skip
    table = format_summary(result.summary)
    print(table)  # noqa: T201  (the command's output)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"model": job.model.path, "lora": job.model.lora, "split": job.split, **result.summary}, f, indent=1)
    captions = [("OK " if v.correct else "NO ") + p.removeprefix("a photo of ")
                for p, v in zip(result.prompts, result.verdicts, strict=True)]  # fmt: skip
    colors = [(0, 120, 0) if v.correct else (180, 0, 0) for v in result.verdicts]
    save_grid(result.images, os.path.join(out, "grid.png"), captions=captions, caption_colors=colors,
              ncols=4 * job.images_per_prompt, min_tile=96)  # fmt: skip
    log.info("wrote eval.json and grid.png to %s", out)
    return result.summary
