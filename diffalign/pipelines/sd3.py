"""SD3 / SD3.5 adapter over ``diffusers.StableDiffusion3Pipeline`` components.

Family facts encoded here (diffusers 0.42): the transformer takes ``timestep = 1000 t`` (float32) and unpacked
latents ``(B, 16, H/8, W/8)``; prompts go through two CLIP text encoders and T5 (``encode_prompt``); the VAE's
latents are normalised as ``(z - shift_factor) * scaling_factor``; the schedule is a static shift (3.0 for
SD3.5) of the uniform grid, computed by the checkpoint's ``FlowMatchEulerDiscreteScheduler``. The stock
``JointAttnProcessor2_0`` calls SDPA directly, so an attention backend other than ``native`` replaces it with
``DispatchJointAttnProcessor``, the same attention through diffusers' dispatcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import Tensor

from diffalign.pipelines.base import FlowModel, SizeLimits, vae_factor
from diffalign.types import Cond


class DispatchJointAttnProcessor:
    """SD3's joint attention through diffusers' attention dispatcher, so that ``set_attention_backend`` reaches it.

    The image tokens ``(B, N, D)`` and, when given, the text tokens ``(B, M, D')`` are projected to per-head
    queries, keys and values ``(B, S, heads, head_dim)`` (optionally RMS/layer-normed per head), attend jointly
    over the ``N + M`` tokens, and are split and projected back: the same maths as ``JointAttnProcessor2_0``.
    """

    _attention_backend = None  # set by ModelMixin.set_attention_backend; None: the dispatcher's active backend
    _parallel_config = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError("SD3's joint attention takes no attention mask")

        def heads(x: Tensor, norm: torch.nn.Module | None) -> Tensor:  # (B, S, heads * d) -> (B, S, heads, d)
            x = x.unflatten(-1, (attn.heads, -1))
            return x if norm is None else norm(x)

        query = heads(attn.to_q(hidden_states), attn.norm_q)
        key = heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=1)
            key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=1)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states), None)], dim=1)
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = out.flatten(2).to(query.dtype)
        image, text = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1] :]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class SD3FlowModel(FlowModel):
    """FlowModel over a ``StableDiffusion3Pipeline`` (SD3-Medium, SD3.5-Medium/Large, our world base model)."""

    family = "sd3"
    pipeline_classes = (StableDiffusion3Pipeline,)
    lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )  # fmt: skip
    default_guidance_scale = 4.5

    @classmethod
    def size_limits(cls, transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> SizeLimits:
        # the transformer crops its learned position table (pos_embed_max_size patches a side) to the latent size
        factor, patch = vae_factor(vae_config), transformer_config["patch_size"]
        table, sample = transformer_config.get("pos_embed_max_size"), transformer_config.get("sample_size")
        return SizeLimits(
            multiple=factor * patch,
            largest=table * patch * factor if table else None,
            native=sample * factor if sample else None,
            why_multiple=f"VAE factor {factor} x patch size {patch}",
            why_largest=f"position table of {table} patches x patch size {patch} x VAE factor {factor}",
        )

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        prompts = self._check_prompts(prompts)
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, **kwargs,
            )  # fmt: skip
        return Cond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype), prompts=prompts)

    def _use_dispatcher(self) -> None:
        for module in self.transformer.modules():
            if isinstance(module, Attention) and isinstance(module.processor, JointAttnProcessor2_0):
                module.set_processor(DispatchJointAttnProcessor())
        super()._use_dispatcher()

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        return self.network(
            hidden_states=x_t.to(self.dtype),
            timestep=t * 1000,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

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
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            patch = self.transformer.config.patch_size
            seq_len = (height // self.spatial_factor // patch) * (width // self.spatial_factor // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        scheduler.set_timesteps(None if sigmas is not None else num_steps, device="cpu", **kwargs)
