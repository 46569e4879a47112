"""``diffalign steer CONFIG --prompts FILE --out DIR``: steer every prompt toward a reward and save the images,
their rewards and the NFE spent."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from diffalign.config import ConfigError, ModelConfig, SamplingConfig, save_config
from diffalign.images import from_pil, remove_stale_images, save_grid, save_images
from diffalign.pipelines import load_model
from diffalign.rewards import RewardConfig, build_reward_set
from diffalign.sampling.sampler import SDE
from diffalign.steering import METHODS, method_arguments
from diffalign.steering.base import nfe_budget
from diffalign.steering.pipeline import SteeringPipeline

log = logging.getLogger("diffalign.steer")


def _world_model() -> ModelConfig:
    return ModelConfig(family="sd3", path="builtin:world-sd3", max_sequence_length=16)


def _world_sampling() -> SamplingConfig:
    return SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0, sde="flow_sde", noise_level=0.7)


@dataclass(kw_only=True)
class SteerJob:
    """Steering of a prompt file.

    Attributes:
        sampling: the sampler steering runs on: ``num_steps``, size, ``guidance_scale``, the stochastic step
            (``sde``, ``noise_level``) and the time grid (``shift`` or ``sigmas``, e.g. a few-step student's).
        method: ``dts``, ``dts_star``, ``doob``, ``smc`` or ``best_of_n``.
        budget: NFE per prompt (a CFG step costs 2 per particle), a whole number (``800`` or ``800.0``).
        inverse_temperature: ``lam > 0`` in ``p(x) exp(lam r(x))``.
        rewards: the reward(s) steered toward (weighted total).
        images_per_prompt: images kept per prompt (the highest-reward ones the method returns).
        method_args: extra keyword arguments per method, keyed by method name (e.g. ``{dts_star: {c_uct: 0.05},
            smc: {potential: max}, doob: {num_candidates: 4}}``); only the chosen method's entry is used, so one
            config serves every method (``method=best_of_n`` on the command line).
        seed: the noise seed of prompt ``i`` is ``seed * 1_000_003 + i``.
    """

    kind: Literal["steer"] = "steer"
    model: ModelConfig = field(default_factory=_world_model)
    sampling: SamplingConfig = field(default_factory=_world_sampling)
    method: Literal["dts", "dts_star", "doob", "smc", "best_of_n"] = "dts_star"
    budget: float = 800  # a whole number of NFE; stored as an int
    inverse_temperature: float = 1.0
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(name="world")])
    images_per_prompt: int = 1
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.inverse_temperature > 0:
            raise ConfigError(f"config key 'inverse_temperature': must be > 0, got {self.inverse_temperature}")
        if self.sampling.sde == "ode":
            raise ConfigError("config key 'sampling.sde': steering needs a stochastic sampler (flow_sde, cps, dance)")
        try:
            self.budget = nfe_budget(self.budget)
        except ValueError as e:
            raise ConfigError(f"config key 'budget': {e}") from e
        if self.budget < 1:
            raise ConfigError(f"config key 'budget': must be >= 1 NFE, got {self.budget}")
        if self.images_per_prompt < 1:
            raise ConfigError("config key 'images_per_prompt': must be >= 1")
        for name, args in self.method_args.items():
            if name not in METHODS:
                raise ConfigError(f"config key 'method_args.{name}': not a steering method; expected one of "
                                  f"{sorted(METHODS)}")  # fmt: skip
            if not isinstance(args, dict):
                raise ConfigError(f"config key 'method_args.{name}': must be a mapping of argument names to values")
            allowed = method_arguments(name)
            for key in args:
                if key not in allowed:
                    raise ConfigError(f"config key 'method_args.{name}.{key}': not an argument of {name}; "
                                      f"expected one of {sorted(allowed)}")  # fmt: skip
        scale = self.sampling.guidance_scale
        per_sample = self.sampling.num_steps * (1 if scale in (None, 1.0) else 2) * self.images_per_prompt
        if scale is not None and self.budget < per_sample:
            raise ConfigError(f"config key 'budget': {self.budget} NFE is below the cost of {self.images_per_prompt} "
                              f"sample(s) ({per_sample} NFE)")  # fmt: skip


def run_steer(job: SteerJob, prompts: list[str], out: str) -> dict[str, Any]:
    """Steer every prompt; writes images, ``index.jsonl``, ``grid.png``, ``summary.json`` and ``config.yaml``."""
    rewards = build_reward_set(job.rewards)
    flow = load_model(job.model)
    flow.latent_shape(job.sampling.height, job.sampling.width)
    rewards.to(flow.device)
    pipe = SteeringPipeline(flow)
    os.makedirs(out, exist_ok=True)
    save_config(job, os.path.join(out, "config.yaml"))
    images, rows, captions = [], [], []
    sde = SDE(kind=job.sampling.sde, noise_level=job.sampling.noise_level)
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(flow.device).manual_seed(job.seed * 1_000_003 + i)
        result = pipe(
            prompt,
            rewards,
            method=job.method,
            budget=job.budget,
            num_inference_steps=job.sampling.num_steps,
            height=job.sampling.height,
            width=job.sampling.width,
            guidance_scale=job.sampling.guidance_scale,
            num_images_per_prompt=job.images_per_prompt,
            inverse_temperature=job.inverse_temperature,
            sde=sde.kind,
            noise_level=sde.noise_level,
            shift=job.sampling.shift,
            sigmas=job.sampling.sigmas,
            generator=generator,
            method_kwargs=job.method_args.get(job.method, {}),
            progress=False,
        )
        images.append(from_pil(result.images))
        for k, reward in enumerate(result.rewards.tolist()):
            rows.append({"prompt": prompt, "index": k, "reward": reward, "nfe": result.nfe[0], "method": job.method})
            captions.append(f"{reward:.2f} {prompt.removeprefix('a photo of ')}")
        log.info("[%d/%d] %s: reward %.3f with %d NFE", i + 1, len(prompts), prompt, max(result.rewards.tolist()),
                 result.nfe[0])  # fmt: skip
    stacked = torch.cat(images)
    paths = save_images(stacked, out)
    remove_stale_images(out, len(paths))
    with open(os.path.join(out, "index.jsonl"), "w") as f:
        for path, row in zip(paths, rows, strict=True):
            f.write(json.dumps({"file": os.path.basename(path), **row}) + "\n")
    save_grid(stacked, os.path.join(out, "grid.png"), captions=captions, ncols=max(job.images_per_prompt, 4),
              min_tile=96)  # fmt: skip
    summary = {
        "method": job.method,
        "budget": job.budget,
        "prompts": len(prompts),
        "mean_reward": sum(r["reward"] for r in rows) / len(rows),
        "mean_nfe": sum(r["nfe"] for r in rows if r["index"] == 0) / len(prompts),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("mean reward %.4f, mean NFE %.0f per prompt; wrote %s", summary["mean_reward"], summary["mean_nfe"], out)
    return summary
