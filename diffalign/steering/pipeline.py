"""A steering pipeline that is called like a diffusers pipeline.

``SteeringPipeline`` wraps any supported diffusers pipeline (SD3/SD3.5, FLUX.1, FLUX.2) through its family
adapter and adds ``reward``, ``method`` and ``budget`` (NFE per prompt) to the usual call arguments. It returns
PIL images plus each image's reward and the NFE spent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from diffalign.images import to_pil
from diffalign.pipelines import load_flow_model, wrap_pipeline
from diffalign.pipelines.base import FlowModel
from diffalign.rewards import build_reward
from diffalign.rewards.base import Reward
from diffalign.sampling.sampler import SDE
from diffalign.steering.base import SteeringProblem, SteeringResult, image_reward


@dataclass
class SteeringPipelineOutput:
    """``images``: PIL images (``num_images_per_prompt`` per prompt, prompt-major); ``rewards``: ``(N,)``;
    ``nfe``: NFE spent per prompt; ``results``: the methods' full results (trees, candidates, ...)."""

    images: list[Image.Image]
    rewards: Tensor
    nfe: list[int]
    results: list[SteeringResult] = field(default_factory=list)


class SteeringPipeline:
    """Inference-time steering over a diffusers pipeline (module docstring)."""

    def __init__(self, flow: FlowModel) -> None:
        self.flow = flow

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        family: str = "sd3",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        lora: str | None = None,
        max_sequence_length: int | None = None,
    ) -> SteeringPipeline:
        """Load a pipeline (hub id, folder or ``builtin:NAME``) of ``family``, optionally with a LoRA."""
        return cls(load_flow_model(family, path, dtype=dtype, device=device, lora=lora,
                                   max_sequence_length=max_sequence_length))  # fmt: skip

    @classmethod
    def from_pipe(cls, pipe: Any, max_sequence_length: int | None = None) -> SteeringPipeline:
        """Wrap an already-loaded diffusers pipeline."""
        return cls(wrap_pipeline(pipe, max_sequence_length=max_sequence_length))

    def problem(
        self,
        prompt: str,
        reward: Reward | Callable[..., Tensor],
        *,
        num_inference_steps: int,
        height: int,
        width: int,
        guidance_scale: float,
        sde: SDE,
        inverse_temperature: float,
        shift: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SteeringProblem:
        """The ``SteeringProblem`` of one prompt (for the function API: ``steer(problem, ...)``); ``shift`` and
        ``sigmas`` choose the time grid as ``FlowModel.time_grid`` does (default the checkpoint's own)."""
        flow = self.flow
        return SteeringProblem(
            flow=flow,
            cond=flow.encode_prompt([prompt]),
            times=flow.time_grid(num_inference_steps, height, width, shift=shift, sigmas=sigmas),
            shape=flow.latent_shape(height, width),
            reward=image_reward(flow, reward, prompt),
            sde=sde,
            guidance_scale=guidance_scale,
            inverse_temperature=inverse_temperature,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        reward: Reward | str | Callable[..., Tensor],
        *,
        method: str = "dts_star",
        budget: int | float = 1000,
        num_inference_steps: int = 28,
        height: int = 512,
        width: int = 512,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        inverse_temperature: float = 1.0,
        sde: str = "flow_sde",
        noise_level: float = 0.7,
        shift: float | None = None,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        method_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> SteeringPipelineOutput:
        """Steer each prompt toward ``reward`` with ``budget`` NFE.

        Args:
            prompt: one prompt or a list.
            reward: a ``Reward``, a registry name (``"world"``, ``"pickscore"``, ...) or ``f(images, prompts)``.
            method: ``dts``, ``dts_star``, ``doob``, ``smc`` or ``best_of_n``. With ``num_images_per_prompt = n``
                DTS* returns its ``n`` best distinct leaves and DTS ``n`` draws of its read-out distribution.
            budget: NFE per prompt, a whole number (a CFG step costs 2 per particle).
            guidance_scale: CFG scale (None: the family default).
            inverse_temperature: ``lam`` in ``exp(lam r)``.
            sde, noise_level: the stochastic step steering runs on (``flow_sde``, ``cps``, ``dance``).
            shift, sigmas: the time grid (``FlowModel.time_grid``): a static shift, or ``num_inference_steps``
                step times in (0, 1] such as a few-step student's (default: the checkpoint's own schedule).
            generator: noise source (default: seed 0).
            method_kwargs: extra arguments of the method (e.g. ``{"c_uct": 0.5}``).
        """
        from diffalign.steering import steer

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(reward, str):
            reward = build_reward(reward)
        if sde == "ode":
            raise ValueError("steering needs a stochastic sampler: sde must be flow_sde, cps or dance, not 'ode'")
        if guidance_scale is None:
            guidance_scale = 1.0 if self.flow.has_guidance_embedding else self.flow.default_guidance_scale
        generator = generator if generator is not None else torch.Generator(self.flow.device).manual_seed(0)
        kwargs = dict(method_kwargs or {})
        if method != "smc":  # SMC returns all its particles; the highest-reward ones are kept
            kwargs.setdefault("num_samples", num_images_per_prompt)
        images, rewards, nfe, results = [], [], [], []
        for text in prompts:
            problem = self.problem(text, reward, num_inference_steps=num_inference_steps, height=height, width=width,
                                   guidance_scale=guidance_scale, sde=SDE(kind=sde, noise_level=noise_level),
                                   inverse_temperature=inverse_temperature, shift=shift,
                                   sigmas=sigmas)  # fmt: skip
            result = steer(problem, method, budget, generator=generator, progress=progress, **kwargs)
            keep = torch.argsort(result.rewards, descending=True)[:num_images_per_prompt]
            pixels = self.flow.decode_latents(result.latents[keep.to(result.latents.device)])
            images.extend(to_pil(pixels))
            rewards.append(result.rewards[keep].cpu())
            nfe.append(result.nfe)
            results.append(result)
        return SteeringPipelineOutput(images=images, rewards=torch.cat(rewards), nfe=nfe, results=results)
