"""Pretrain the embedded world's base model: a complete, small diffusers pipeline (SD3 or FLUX.1 family).

Two stages, one command (``diffalign pretrain CONFIG``):

1. **Codec.** An ``AutoencoderKL`` (64 px -> 4 x 16 x 16 with the default three blocks) trained on rendered
   scenes with ``MSE(recon, x) + kl_weight * KL``; then ``shift_factor`` / ``scaling_factor`` are set from the
   latent mean and std, as SD3's VAE config carries them. Written to ``output_dir/vae`` when done (a finished
   codec is reused on restart; the stage is short and not checkpointed mid-way).
2. **Flow.** Rectified-flow matching of the transformer with the codec and the text encoders frozen, on the
   shared training loop (:mod:`diffalign.algorithms.flow_matching`: logit-normal times, the prompt dropped to
   "" with probability ``cfg_dropout`` for classifier-free guidance). The text encoders are real CLIP and T5
   encoders at random initialisation (a world tokenizer makes each world word one token); their outputs are an
   injective code of the prompt that the transformer learns to read, and since the world has a finite prompt
   set they are computed once. ``dataset_size`` rendered scenes are encoded once; each step draws its batch
   from them. AdamW, warm-up + cosine LR, gradient clipping, EMA, accelerate (mixed precision, several
   processes: each rank draws its own data), atomic checkpoints every ``checkpoint_every`` steps with exact
   resume (every batch and noise draw is a function of (seed, rank, step)), tensorboard logs, a progress bar,
   and a sample grid judged by the world evaluator every ``sample_every`` steps.

The result, ``output_dir/pipeline``, is a plain diffusers folder: ``StableDiffusion3Pipeline.from_pretrained``
(or ``FluxPipeline``) loads it and generates world images (pass ``max_sequence_length=arch.t5_max_length``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffalign.algorithms.flow_matching import FlowMatchingConfig, FlowMatchingTrainer, LatentDataset, PromptCache
from diffalign.config import ConfigError, SamplingConfig
from diffalign.images import save_grid
from diffalign.pipelines import FlowModel, wrap_pipeline
from diffalign.pipelines.tokenizers import clip_tokenizer, t5_tokenizer
from diffalign.recipes.world_benchmark import evaluate_world, format_summary
from diffalign.training.loop import TrainContext, run_training
from diffalign.training.trainer import Cadence, check_finite
from diffalign.world.prompts import test_prompts, train_prompts, world_words
from diffalign.world.render import dataset_examples

log = logging.getLogger("diffalign.pretrain")


# ----------------------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class ArchConfig:
    """Architecture of the world model (sizes in pixels, channels, tokens).

    Attributes:
        image_size: square image side in pixels.
        vae_blocks: channels of the VAE's down blocks; ``len - 1`` halvings (3 blocks: 64 px -> 16 x 16).
        latent_channels: VAE latent channels.
        layers: transformer blocks (SD3 joint blocks; FLUX double-stream blocks).
        single_layers: FLUX single-stream blocks (ignored for SD3).
        heads, head_dim: attention heads and their width.
        patch_size: SD3 patch size (FLUX always packs 2x2).
        text_width: CLIP hidden size; T5 width and the transformer's text width are ``2 * text_width``.
        text_layers: layers of each text encoder.
        clip_max_length, t5_max_length: token lengths of the CLIP and T5 prompts.
    """

    image_size: int = 64
    vae_blocks: list[int] = field(default_factory=lambda: [16, 32, 32])
    latent_channels: int = 4
    layers: int = 4
    single_layers: int = 2
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    text_width: int = 32
    text_layers: int = 2
    clip_max_length: int = 24
    t5_max_length: int = 16


@dataclass(kw_only=True)
class CodecTrainConfig:
    """Stage 1 (VAE): steps, batch size, learning rate and KL weight."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6


@dataclass(kw_only=True)
class FlowTrainConfig:
    """Stage 2 (flow matching) optimisation and bookkeeping.

    ``dataset_size`` scenes are rendered and encoded once (posterior mode); each step draws its batch from them.
    ``layout`` is how they are laid out (``free`` or ``grid``, see :func:`~diffalign.world.render.sample_scene`).
    """

    dataset_size: int = 20000
    layout: Literal["free", "grid"] = "free"
    steps: int = 6000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    checkpoint_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    keep_checkpoints: int = 2


@dataclass(kw_only=True)
class PretrainJob:
    """``diffalign pretrain``: build and train a world base model.

    Attributes:
        family: ``sd3`` (``StableDiffusion3Pipeline``) or ``flux`` (``FluxPipeline``).
        output_dir: run folder (codec, checkpoints, logs, samples, the final pipeline).
        seed: seeds initialisation, data and noise.
        sampling: how the periodic and final sample grids are drawn.
        eval_images_per_prompt: images per held-out prompt in the final evaluation.
    """

    kind: Literal["pretrain"] = "pretrain"
    family: Literal["sd3", "flux"] = "sd3"
    output_dir: str = "runs/world-pretrain"
    seed: int = 0
    arch: ArchConfig = field(default_factory=ArchConfig)
    codec: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)
    )
    eval_images_per_prompt: int = 4

    def __post_init__(self) -> None:
        if self.arch.image_size % (2 ** (len(self.arch.vae_blocks) - 1) * 2):
            raise ConfigError("config key 'arch.image_size': must be divisible by the VAE factor times 2")
        if self.arch.head_dim % 4:
            raise ConfigError("config key 'arch.head_dim': must be a multiple of 4")
        if not 0 <= self.train.cfg_dropout < 1:
            raise ConfigError("config key 'train.cfg_dropout': must be in [0, 1)")
        for key in ("dataset_size", "steps", "batch_size", "checkpoint_every", "sample_every", "log_every"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"config key 'train.{key}': must be >= 1")


# ----------------------------------------------------------------------------------------------------- building
def build_vae(arch: ArchConfig) -> AutoencoderKL:
    n = len(arch.vae_blocks)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(arch.vae_blocks), layers_per_block=1,
        latent_channels=arch.latent_channels, norm_num_groups=8, sample_size=arch.image_size,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )  # fmt: skip


def _clip(arch: ArchConfig, vocab: int, projection: bool) -> torch.nn.Module:
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=arch.text_width, intermediate_size=4 * arch.text_width, num_attention_heads=2,
        num_hidden_layers=arch.text_layers, projection_dim=arch.text_width, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(arch: ArchConfig, vocab: int) -> T5EncoderModel:
    d = 2 * arch.text_width
    return T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=arch.text_layers, num_heads=4,
                 relative_attention_num_buckets=16, decoder_start_token_id=0)
    )  # fmt: skip


def build_pipeline(family: str, arch: ArchConfig, vae: AutoencoderKL, seed: int) -> DiffusionPipeline:
    """A fresh world pipeline of ``family`` around a trained ``vae`` (random text encoders and transformer)."""
    torch.manual_seed(seed)
    words = world_words()
    tok = clip_tokenizer(words, max_length=arch.clip_max_length)
    t5_tok = t5_tokenizer(words, max_length=arch.t5_max_length)
    inner = arch.heads * arch.head_dim
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=arch.image_size // vae_factor(arch), patch_size=arch.patch_size,
            in_channels=arch.latent_channels, out_channels=arch.latent_channels, num_layers=arch.layers,
            attention_head_dim=arch.head_dim, num_attention_heads=arch.heads,
            joint_attention_dim=2 * arch.text_width, caption_projection_dim=inner,
            pooled_projection_dim=2 * arch.text_width, pos_embed_max_size=arch.image_size // vae_factor(arch),
        )  # fmt: skip
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
            text_encoder=_clip(arch, len(tok), True), tokenizer=tok,
            text_encoder_2=_clip(arch, len(tok), True), tokenizer_2=clip_tokenizer(words, arch.clip_max_length),
            text_encoder_3=_t5(arch, len(t5_tok)), tokenizer_3=t5_tok,
        )  # fmt: skip
    elif family == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * arch.latent_channels, num_layers=arch.layers,
            num_single_layers=arch.single_layers, attention_head_dim=arch.head_dim, num_attention_heads=arch.heads,
            joint_attention_dim=2 * arch.text_width, pooled_projection_dim=arch.text_width, guidance_embeds=False,
            axes_dims_rope=rope_axes(arch.head_dim),
        )  # fmt: skip
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=64),
            vae=vae, text_encoder=_clip(arch, len(tok), False), tokenizer=tok,
            text_encoder_2=_t5(arch, len(t5_tok)), tokenizer_2=t5_tok,
        )  # fmt: skip
    else:
        raise ConfigError(f"config key 'family': cannot pretrain {family!r}; expected 'sd3' or 'flux'")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def vae_factor(arch: ArchConfig) -> int:
    return 2 ** (len(arch.vae_blocks) - 1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a FLUX head width into three even RoPE axes (index, row, column) that sum to it: 32 -> (8, 12, 12)."""
    first = 2 * (head_dim // 8)
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


def _replace_dir(tmp: str, final: str) -> None:
    """Move a finished folder into place (removing an older one)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------------------------------- data
def _step_rng(seed: int, rank: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, step, stream])


def _step_generator(seed: int, rank: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_step_rng(seed, rank, step, stream).integers(2**62)))


def world_batch(seed: int, rank: int, step: int, batch: int, size: int) -> tuple[list[str], Tensor]:
    """The training batch of ``(rank, step)``: prompts and images ``(B, 3, size, size)`` in [0, 1]."""
    texts, images = dataset_examples(batch, _step_rng(seed, rank, step, 0), split="train", size=size)
    return texts, torch.from_numpy(images)


# ----------------------------------------------------------------------------------------------------- stage 1
def train_codec(job: PretrainJob, accelerator: Accelerator) -> AutoencoderKL:
    """Train the VAE on the main process (or reuse ``output_dir/vae``), set its latent shift and scale, save it;
    every process then loads the same saved codec."""
    path = os.path.join(job.output_dir, "vae")
    if accelerator.is_main_process and not os.path.isfile(os.path.join(path, "config.json")):
        _fit_codec(job, accelerator.device, path)
    accelerator.wait_for_everyone()
    log.info("codec: %s", path)
    return AutoencoderKL.from_pretrained(path).to(accelerator.device).eval().requires_grad_(False)


def _fit_codec(job: PretrainJob, device: torch.device, path: str) -> None:
    torch.manual_seed(job.seed)
    vae = build_vae(job.arch).to(device).train()
    cfg = job.codec
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, cfg.steps // 10), cfg.steps)
    loss = torch.zeros(())
    for step in tqdm(range(cfg.steps), desc="codec"):
        _, images = world_batch(job.seed, 0, step, cfg.batch_size, job.arch.image_size)
        x = (images * 2 - 1).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(_step_generator(job.seed, 0, step, 1))
        loss = F.mse_loss(vae.decode(z).sample, x) + cfg.kl_weight * posterior.kl().mean()
        check_finite(loss, "codec loss", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        _, images = world_batch(job.seed, 0, 10**9, 512, job.arch.image_size)
        z = vae.encode((images * 2 - 1).to(device)).latent_dist.mode()
        mean, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    _replace_dir(tmp, path)
    log.info("codec: final loss %.5f, latent mean %.3f std %.3f -> %s", loss.item(), mean, std, path)


# ----------------------------------------------------------------------------------------------------- stage 2
@torch.no_grad()
def latent_dataset(flow: FlowModel, job: PretrainJob, chunk: int = 256) -> tuple[list[str], Tensor]:
    """``dataset_size`` training scenes (the same on every process) as prompts and latents ``(N, C, H', W')``."""
    texts, images = dataset_examples(job.train.dataset_size, np.random.default_rng([job.seed, 7]), split="train",
                                     size=job.arch.image_size, layout=job.train.layout)  # fmt: skip
    latents = [
        flow.encode_images(torch.from_numpy(images[i : i + chunk]).to(flow.device)).cpu()
        for i in tqdm(range(0, len(texts), chunk), desc="encoding dataset", leave=False)
    ]
    return texts, torch.cat(latents)


class WorldFlowTrainer(FlowMatchingTrainer):
    """Stage 2 on the shared loop: flow matching of the whole transformer of a fresh world pipeline (``pipe``,
    around the trained codec) on the encoded dataset; a judged sample grid every ``sample_every`` steps; the
    EMA weights exported as the pipeline folder ``output_dir/pipeline`` and evaluated on the held-out prompts."""

    name = "pretrain"

    def __init__(self, ctx: TrainContext, job: PretrainJob, pipe: DiffusionPipeline) -> None:
        self.job = job
        cfg = job.train
        flow = wrap_pipeline(pipe, max_sequence_length=job.arch.t5_max_length)
        transformer = flow.transformer.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        ctx.register("transformer", transformer, optimizer, scheduler, grad_clip=cfg.grad_clip,
                     ema_decay=cfg.ema_decay, export=self._export, export_dir="pipeline")  # fmt: skip
        self.module = ctx.modules["transformer"]
        ctx.prepare()
        flow.use_network(self.module.network)
        cache = PromptCache(flow, [""] + [p.text for p in train_prompts()])
        source = LatentDataset(*latent_dataset(flow, job))
        settings = FlowMatchingConfig(batch_size=cfg.batch_size, cfg_dropout=cfg.cfg_dropout)
        super().__init__(ctx, flow, source, settings, encode=cache)
        self.cadence = Cadence(epochs=cfg.steps, eval_every=cfg.sample_every, log_every=cfg.log_every,
                               checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                               progress=("loss_fm",))  # fmt: skip

    def _export(self, directory: str, state: dict[str, Tensor]) -> None:
        """The whole pipeline from its live modules (world pretraining runs unsharded: ``state`` equals them)."""
        self.flow.pipe.save_pretrained(directory, safe_serialization=True)

    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        """A grid of 16 held-out prompts with the EMA weights, judged by the world evaluator (main process)."""
        if not self.ctx.accelerator.is_main_process:
            return {}
        ema = self.module.ema
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            path = os.path.join(self.job.output_dir, "samples", f"step-{epoch:06d}.png")
            return {"sample_accuracy": _sample_grid(self.job, self.flow, path)}

    def finish(self) -> dict[str, Any]:
        """The held-out evaluation of the exported pipeline (``eval.json``, on the main process)."""
        self.flow.use_network(None)
        self.flow.transformer.eval().requires_grad_(False)
        final = os.path.join(self.job.output_dir, "pipeline")
        summary: dict[str, Any] = {"pipeline": final}
        if self.ctx.accelerator.is_main_process:
            job = self.job
            evaluation = evaluate_world(self.flow, test_prompts(), job.sampling,
                                        images_per_prompt=job.eval_images_per_prompt, seed=job.seed)  # fmt: skip
            with open(os.path.join(job.output_dir, "eval.json"), "w") as f:
                json.dump(evaluation.summary, f, indent=1)
            log.info("held-out evaluation of %s:\n%s", final, format_summary(evaluation.summary))
            summary["eval"] = evaluation.summary
        return summary


def pretrain(job: PretrainJob, accelerator: Accelerator | None = None) -> str:
    """Run both stages; returns the path of the final pipeline folder."""
    if accelerator is None:
        precision = {} if job.train.mixed_precision is None else {"mixed_precision": job.train.mixed_precision}
        accelerator = Accelerator(log_with="tensorboard", project_dir=job.output_dir, **precision)
    os.makedirs(job.output_dir, exist_ok=True)
    vae = train_codec(job, accelerator)  # the loop writes config.yaml once it knows the run can resume

    def trainer(ctx: TrainContext) -> WorldFlowTrainer:
        pipe = build_pipeline(job.family, job.arch, vae, job.seed).to(accelerator.device)
        return WorldFlowTrainer(ctx, job, pipe)

    return run_training(job, trainer, accelerator)["pipeline"]


def _sample_grid(job: PretrainJob, flow: FlowModel, path: str) -> float:
    """Write a judged grid of 16 held-out prompts to ``path``; returns its image accuracy."""
    prompts = test_prompts()
    picked = [prompts[i] for i in np.linspace(0, len(prompts) - 1, 16).round().astype(int)]
    evaluation = evaluate_world(flow, picked, job.sampling, images_per_prompt=1, seed=job.seed, progress=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    marks = [("OK " if v.correct else "NO ") + p.removeprefix("a photo of ") for p, v in
             zip(evaluation.prompts, evaluation.verdicts, strict=True)]  # fmt: skip
    colors = [(0, 120, 0) if v.correct else (180, 0, 0) for v in evaluation.verdicts]
    save_grid(evaluation.images, path, captions=marks, ncols=4, caption_colors=colors)
    accuracy = evaluation.summary["image_accuracy"]
    log.info("samples -> %s (accuracy %.2f on %d prompts)", path, accuracy, len(picked))
    return accuracy
