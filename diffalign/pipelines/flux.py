"""FLUX.1 adapter over ``diffusers.FluxPipeline`` components.

Family facts encoded here (diffusers 0.42): the transformer works on packed latents ``(B, H'W'/4, 4C)`` (2x2
patches) with image position ids, takes ``timestep = t`` cast through the model dtype exactly as the stock
pipeline does (it passes ``(1000 t).to(dtype) / 1000`` and the transformer multiplies by 1000 again), and
guidance-distilled checkpoints (FLUX.1-dev) embed the guidance value instead of running CFG. At diffalign's
boundary the latents are unpacked ``(B, C, H/8, W/8)``. The schedule is the resolution-dependent dynamic shift
``mu = calculate_shift(H'W'/4)`` applied to ``linspace(1, 1/T, T)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from diffalign.pipelines.base import FlowModel, SizeLimits, vae_factor
from diffalign.types import Cond


class FluxFlowModel(FlowModel):
    """FlowModel over a ``FluxPipeline`` (FLUX.1-dev / -schnell and fine-tunes)."""

    family = "flux"
    pipeline_classes = (FluxPipeline,)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_guidance_scale = 3.5  # the distilled guidance of FLUX.1-dev

    @classmethod
    def size_limits(cls, transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> SizeLimits:
        factor = vae_factor(vae_config)  # rotary positions: no largest size
        return SizeLimits(multiple=factor * 2, why_multiple=f"VAE factor {factor} x 2x2 latent packing")

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        prompts = self._check_prompts(prompts)
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device, **kwargs)
        return Cond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype), prompts=prompts)

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        batch, channels, height, width = x_t.shape
        packed = FluxPipeline._pack_latents(x_t.to(self.dtype), batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance_tensor = None
        if self.has_guidance_embedding:
            value = self.default_guidance_scale if guidance is None else guidance
            guidance_tensor = torch.full((batch,), value, device=self.device, dtype=torch.float32)
        out = self.network(
            hidden_states=packed,
            timestep=(t * 1000).to(self.dtype) / 1000,
            guidance=guidance_tensor,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, height, width)

    @staticmethod
    def pack(latents: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, HW/4, 4C)``, the layout ``FluxPipeline`` uses for ``latents=``."""
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(packed: Tensor, height: int, width: int) -> Tensor:
        """``(B, HW/4, 4C)`` -> ``(B, C, H, W)`` for latent size ``height x width``."""
        b, n, c4 = packed.shape
        x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, height, width)

    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        cfg = self.pipe.vae.config
        return (self._vae_posterior(images, generator) - cfg.shift_factor) * cfg.scaling_factor

    def _decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]

    def _set_timesteps(
        self, scheduler, num_steps: int, height: int, width: int, sigmas: list[float] | None = None
    ) -> None:
        seq_len = (height // self.spatial_factor // 2) * (width // self.spatial_factor // 2)
        cfg = scheduler.config
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if sigmas is None and not cfg.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps if sigmas is None else None, device="cpu", sigmas=sigmas, mu=mu)
