"""Tiny random-weight pipelines of each family, built offline from the real diffusers/transformers classes.

Used by the tests and by ``diffalign tiny FAMILY DIR``. Nothing is downloaded: tokenizers are built from
in-memory vocabularies (transformers 5). Sizes follow diffusers' own dummy components; every module is put in
eval mode (T5 and friends have dropout active right after construction).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from diffalign.pipelines.tokenizers import clip_tokenizer, t5_tokenizer

_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A real Qwen2 byte-level tokenizer with the chat template the FLUX.2-klein pipeline applies."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def _clip_text(vocab_size: int, hidden: int, projection: int | None, layers: int = 2) -> torch.nn.Module:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
        num_hidden_layers=layers, projection_dim=projection or hidden, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(vocab_size=128, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0)
    )  # fmt: skip


def _vae(cls: type = AutoencoderKL, latent_channels: int = 4, **extra) -> torch.nn.Module:
    return cls(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, **extra,
    )  # fmt: skip


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """A ~0.4M-parameter ``StableDiffusion3Pipeline``: 32x32 images <-> 4x16x16 latents, patch 2."""
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    return _finish(
        StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=32,
                pooled_projection_dim=64,
                out_channels=4,
                pos_embed_max_size=32,
            ),  # fmt: skip
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(shift_factor=0.0609, scaling_factor=1.5305),
            text_encoder=_clip_text(len(tok), 16, 32),
            tokenizer=tok,
            text_encoder_2=_clip_text(len(tok), 16, 32),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5(32),
            tokenizer_3=t5_tokenizer(),
        )
    )


def tiny_flux(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """A tiny ``FluxPipeline`` (packed 2x2 latents); ``guidance_embeds=True`` mimics FLUX.1-dev's distillation."""
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    return _finish(
        FluxPipeline(
            transformer=FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                guidance_embeds=guidance_embeds,
                axes_dims_rope=(4, 4, 8),
            ),  # fmt: skip
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
            text_encoder=_clip_text(len(tok), 16, None),
            tokenizer=tok,
            text_encoder_2=_t5(32),
            tokenizer_2=t5_tokenizer(),
        )
    )


def tiny_flux2(seed: int = 0) -> Flux2KleinPipeline:
    """A tiny ``Flux2KleinPipeline``: Qwen3 text encoder (28 layers so the default out-layers 9/18/27 exist),
    batch-normalised patchified VAE latents, 4-axis RoPE."""
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128)
    )  # fmt: skip
    vae = _vae(AutoencoderKLFlux2)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return _finish(
        Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            transformer=Flux2Transformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=48,
                timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4),
                guidance_embeds=False,
            ),  # fmt: skip
        )
    )


TINY_BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "flux2": tiny_flux2}


def build_tiny(family: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny pipeline of ``family`` (``"sd3"``, ``"flux"``, ``"flux2"``)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[family](seed)
