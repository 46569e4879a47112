"""Prompts in, images out: batching, per-image seeds, CFG defaults and decoding around ``sample``.

Image ``i`` of a call starts from noise drawn with its own generator seeded ``seed * 1_000_003 + i``, so an ODE
image depends only on (model, prompt, seed, i) and not on the batch size or the order of batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.config import SamplingConfig
from diffalign.pipelines.base import FlowModel
from diffalign.sampling.sampler import SDE, sample


def initial_noise(flow: FlowModel, shape: tuple[int, int, int], seed: int, indices: Sequence[int]) -> Tensor:
    """``(len(indices), C, H, W)`` float32 standard normal noise, row ``k`` from seed ``(seed, indices[k])``."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)), dtype=torch.float32)
        for i in indices
    ]
    return torch.stack(rows).to(flow.device)


def resolve_guidance_scale(flow: FlowModel, cfg: SamplingConfig) -> float:
    """The CFG scale to use: the configured one, else 1 for guidance-embedded checkpoints, else the family's."""
    if cfg.guidance_scale is not None:
        return cfg.guidance_scale
    return 1.0 if flow.has_guidance_embedding else flow.default_guidance_scale


@torch.no_grad()
def generate(
    flow: FlowModel,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    first_index: int = 0,
) -> Tensor:
    """Sample one image per prompt: ``(len(prompts), 3, H, W)`` float32 in [0, 1] on the CPU."""
    if not prompts:
        raise ValueError("no prompts given")
    shape = flow.latent_shape(cfg.height, cfg.width)
    times = flow.time_grid(cfg.num_steps, cfg.height, cfg.width, shift=cfg.shift, sigmas=cfg.sigmas)
    scale = resolve_guidance_scale(flow, cfg)
    sde = None if cfg.sde == "ode" else SDE(kind=cfg.sde, noise_level=cfg.noise_level)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        batch = list(prompts[start : start + batch_size])
        indices = range(first_index + start, first_index + start + len(batch))
        noise = initial_noise(flow, shape, seed, indices)
        generator = torch.Generator(device=flow.device).manual_seed(seed * 1_000_003 + first_index + start)
        traj = sample(
            flow,
            flow.encode_prompt(batch),
            times,
            x_init=noise,
            generator=generator,
            sde=sde,
            guidance_scale=scale,
            guidance=cfg.guidance,
            keep_states=False,
        )
        images.append(flow.decode_latents(traj.final).cpu())
    return torch.cat(images)
