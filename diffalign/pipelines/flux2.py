"""FLUX.2 adapter over ``diffusers.Flux2KleinPipeline`` (Qwen3 text encoder) or ``Flux2Pipeline`` (Mistral).

Family facts encoded here (diffusers 0.42): the VAE (``AutoencoderKLFlux2``) latents are patchified 2x2 and
normalised by the VAE's batch-norm running statistics; the flow runs on those patchified latents, which are the
``(B, 4 C_vae, H/16, W/16)`` latents at diffalign's boundary, and the transformer sees them flattened
``(B, H'W', C)`` with 4-axis position ids. ``timestep`` is passed like FLUX.1 (through the model dtype, / 1000);
FLUX.2-dev embeds a guidance value, klein checkpoints run true CFG. The schedule is the empirical
resolution-and-steps dependent shift ``compute_empirical_mu(H'W', T)`` on ``linspace(1, 1/T, T)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor

from diffalign.pipelines.base import FlowModel, SizeLimits, vae_factor
from diffalign.types import Cond


class Flux2FlowModel(FlowModel):
    """FlowModel over FLUX.2 pipelines (FLUX.2-dev, FLUX.2-klein 4B/9B, base or distilled)."""

    family = "flux2"
    pipeline_classes = (Flux2KleinPipeline, Flux2Pipeline)
    # the double blocks' attention projections and the single blocks' fused QKV + MLP input projection
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "to_qkv_mlp_proj")  # fmt: skip
    default_guidance_scale = 4.0

    @property
    def spatial_factor(self) -> int:
        return self.pipe.vae_scale_factor * 2

    @classmethod
    def size_limits(cls, transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> SizeLimits:
        factor = vae_factor(vae_config)  # rotary positions: no largest size
        return SizeLimits(multiple=factor * 2, why_multiple=f"VAE factor {factor} x 2x2 latent patchify")

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        prompts = self._check_prompts(prompts)
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        with torch.no_grad():
            embeds, text_ids = self.pipe.encode_prompt(prompt=prompts, device=self.device, **kwargs)
        return Cond(embeds=embeds.to(self.dtype), text_ids=text_ids.to(self.device), prompts=prompts)

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        batch, channels, height, width = x_t.shape
        img_ids = Flux2KleinPipeline._prepare_latent_ids(x_t).to(self.device)
        tokens = x_t.to(self.dtype).reshape(batch, channels, height * width).permute(0, 2, 1)
        guidance_tensor = None
        if self.has_guidance_embedding:
            value = self.default_guidance_scale if guidance is None else guidance
            guidance_tensor = torch.full((batch,), value, device=self.device, dtype=torch.float32)
        out = self.network(
            hidden_states=tokens,
            timestep=(t * 1000).to(self.dtype) / 1000,
            guidance=guidance_tensor,
            encoder_hidden_states=cond.embeds,
            txt_ids=cond.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(batch, channels, height, width)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        z = Flux2KleinPipeline._patchify_latents(self._vae_posterior(images, generator))
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def to_vae_latents(self, latents: Tensor) -> Tensor:
        """Flow latents ``(B, 4C, H/16, W/16)`` -> the VAE's ``(B, C, H/8, W/8)`` latents (what the stock pipeline
        returns for ``output_type="latent"``)."""
        mean, std = self._bn_stats(latents)
        return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)

    def _decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        return vae.decode(self.to_vae_latents(latents.to(vae.device, vae.dtype)), return_dict=False)[0]

    def _set_timesteps(
        self, scheduler, num_steps: int, height: int, width: int, sigmas: list[float] | None = None
    ) -> None:
        seq_len = (height // self.spatial_factor) * (width // self.spatial_factor)
        mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=num_steps)
        if sigmas is None and not scheduler.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps if sigmas is None else None, device="cpu", sigmas=sigmas, mu=mu)
