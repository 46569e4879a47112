"""The one accelerate training loop for online RL of flow models (Flow-GRPO and relatives).

Contract: a ``Trainer`` implements ``collect(epoch) -> Rollout`` (rollouts, rewards, advantages) and
``loss(rollout, rows, step_index) -> (loss, metrics)``; this module does everything else: seeding, the prompt
schedule (groups of K samples per prompt spread over processes), mixed precision, LoRA or full fine-tuning,
gradient checkpointing, accumulation and clipping, EMA, evaluation with image grids and reward-hacking
monitors, tensorboard logging, a progress bar, atomic checkpoints with exact resume, and NaN/inf checks. It runs
on one process, under DDP and under FSDP2 (``configs/accelerate/``): checkpoints and exports hold whole tensors,
gathered from the shards, so they are the same files whichever way a run was distributed.

Sizes that depend on the number of processes (samples per process, optimizer steps per epoch) are derived here
from the global sizes in the config and logged; they are never written per GPU count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from huggingface_hub import save_torch_state_dict
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from diffalign.config import ConfigError, ModelConfig, SamplingConfig, read_prompt_file, resolve_device, save_config
from diffalign.pipelines import FlowModel, load_flow_model
from diffalign.rewards import RewardConfig, RewardSet, build_reward_set
from diffalign.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from diffalign.training.ema import EMA
from diffalign.training.sharding import full_parameters, full_tensor, load_full_parameters_, reshard

log = logging.getLogger("diffalign.train")


# ----------------------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class LoraSection:
    """LoRA on the transformer (``rank = 0``: full fine-tuning of the transformer instead).

    Defaults are Flow-GRPO's: rank 32, alpha 64, gaussian init, attention projections of both streams.
    """

    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] | None = None


@dataclass(kw_only=True)
class TrainConfig:
    """Shared optimisation and bookkeeping.

    Attributes:
        epochs: number of collect -> update rounds.
        lr, weight_decay, adam_beta1/2, adam_eps: AdamW (Flow-GRPO: 3e-4, 1e-4, 0.9, 0.999, 1e-8 for LoRA).
        lr_scheduler, warmup_epochs: diffusers scheduler name over optimizer steps.
        grad_clip: max gradient norm (Flow-GRPO: 1.0).
        mixed_precision: ``no`` / ``fp16`` / ``bf16`` (accelerate autocast).
        gradient_checkpointing: recompute activations in the backward pass (saves memory).
        ema_decay, ema_every: EMA of the trained weights, updated every ``ema_every`` optimizer steps
            (Flow-GRPO: 0.9 every 8); ``ema_decay = 0`` disables it. Evaluation and export use the EMA.
        eval_every, checkpoint_every, log_every: in epochs.
        keep_checkpoints: newest checkpoints kept.
        eval_images_per_prompt: images per evaluation prompt.
        max_eval_prompts: cap on evaluation prompts (None: all).
    """

    epochs: int = 100
    lr: float = 3e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant"
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.9
    ema_every: int = 8
    eval_every: int = 10
    checkpoint_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    eval_images_per_prompt: int = 2
    max_eval_prompts: int | None = None

    def __post_init__(self) -> None:
        for key in ("epochs", "eval_every", "checkpoint_every", "log_every", "ema_every", "eval_images_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}': must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config key 'train.ema_decay': must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'train.lr': must be > 0, got {self.lr}")


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig(name="world")]


@dataclass(kw_only=True)
class RunSection:
    """What every training job shares: the model, prompts, rewards, monitors and the loop settings.

    Attributes:
        output_dir: the run folder (checkpoints, logs, grids, plots, the final LoRA, ``config.yaml``).
        seed: every random draw is a function of (seed, epoch, process, ...), so runs are reproducible.
        prompts, eval_prompts: ``world:train`` / ``world:test`` (the embedded world's splits; ``:balanced`` weights
            its categories equally, see :func:`load_prompts`) or a text file.
        rewards: the optimised rewards (weighted sum).
        monitors: rewards that are logged on evaluation images but never optimised (reward-hacking watch).
        sampling: how evaluation images are drawn (ODE, possibly more steps than training rollouts).
    """

    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    prompts: str = "world:train"
    eval_prompts: str = "world:test"
    rewards: list[RewardConfig] = field(default_factory=_default_rewards)
    monitors: list[RewardConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)
    )


def load_prompts(source: str, key: str) -> list[str]:
    """``world:train`` / ``world:test``, ``world:train:balanced`` or a text file (one prompt per line).

    ``world:<split>:balanced`` repeats each category's prompts so that every category carries the same total
    weight (the world's benchmark is the mean over categories, while ``world:train`` is 71% colour attribution);
    uniform draws from the returned list are then category-balanced.
    """
    if source.startswith("world:"):
        from diffalign.world.prompts import prompts_by_category, split_prompts

        split, _, option = source.removeprefix("world:").partition(":")
        if split not in ("train", "test"):
            raise ConfigError(f"config key '{key}': unknown world split {split!r} (train or test)")
        if option not in ("", "balanced"):
            raise ConfigError(f"config key '{key}': unknown option {option!r} (only 'balanced')")
        specs = split_prompts(split)
        if option == "balanced":
            groups = prompts_by_category(specs).values()
            largest = max(len(g) for g in groups)
            specs = [p for g in groups for p in g * round(largest / len(g))]
        return [p.text for p in specs]
    try:
        return read_prompt_file(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key '{key}': {e}") from e


# ----------------------------------------------------------------------------------------------------- seeding
def seeded(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose seed is a deterministic function of the integer ``keys``."""
    seed = int(np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys]).integers(2**62))
    return torch.Generator(device).manual_seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_finite(value: Tensor, what: str, epoch: int) -> None:
    """Raise (never train on) NaN/inf, naming what and when."""
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()[:8]
        raise FloatingPointError(f"{what} is not finite at epoch {epoch} (entries {bad}); stopping before the update")


# ----------------------------------------------------------------------------------------------------- trainer
@dataclass
class Rollout:
    """One epoch's on-policy data on this process; every tensor has the local batch ``N`` first.

    Attributes:
        states: ``(N, T+1, C, H, W)`` trajectory latents; ``log_probs``: ``(N, T)`` sampling log-probs.
        times: ``(T+1,)``; ``train_steps``: ``(N, S)`` long, the step indices each sample is trained on.
        prompts: N prompts; ``advantages``: ``(N,)``; ``rewards``: ``(N,)`` total reward.
        metrics: scalars to log for this epoch (already reduced over processes).
    """

    states: Tensor
    log_probs: Tensor
    times: Tensor
    train_steps: Tensor
    prompts: list[str]
    advantages: Tensor
    rewards: Tensor
    metrics: dict[str, float]


class Trainer(ABC):
    """Algorithm hooks over the shared loop (see the module docstring)."""

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def collect(self, epoch: int) -> Rollout:
        """Sample this process's share of the epoch's rollouts, score them, compute advantages."""

    @abstractmethod
    def loss(self, rollout: Rollout, rows: Tensor, step_index: int, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss (scalar, to be averaged) for samples ``rows`` at denoising step column ``step_index`` of
        ``rollout.train_steps``; returns it with per-term diagnostics."""

    @property
    @abstractmethod
    def train_batch_size(self) -> int:
        """Samples per backward pass."""

    @property
    @abstractmethod
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch."""

    def update(self, rollout: Rollout, epoch: int) -> dict[str, float]:
        """Shuffle this process's samples, split them into ``updates_per_epoch`` optimizer steps, accumulate the
        loss over micro-batches and trained steps, clip and step. Returns averaged diagnostics."""
        ctx = self.ctx
        n = rollout.states.shape[0]
        order = torch.randperm(n, generator=seeded(ctx.seed, epoch, ctx.accelerator.process_index, 11))
        chunks = order.chunk(self.updates_per_epoch)
        sums: dict[str, float] = {}
        count = 0
        for chunk in chunks:
            micro = chunk.split(self.train_batch_size)
            terms = [(rows, j) for rows in micro for j in range(rollout.train_steps.shape[1])]
            ctx.optimizer.zero_grad(set_to_none=True)
            for k, (rows, j) in enumerate(terms):
                sync = k == len(terms) - 1
                with ctx.sync_context(sync), ctx.accelerator.autocast():
                    loss, info = self.loss(rollout, rows, j, epoch)
                check_finite(loss.detach(), "training loss", epoch)
                ctx.accelerator.backward(loss * rows.numel() / chunk.numel() / rollout.train_steps.shape[1])
                for key, value in info.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach().float().mean())
                count += 1
            grad_norm = ctx.accelerator.clip_grad_norm_(ctx.trainable, ctx.cfg.train.grad_clip)
            grad_norm = full_tensor(torch.as_tensor(grad_norm))  # FSDP2 returns a replicated DTensor
            check_finite(torch.as_tensor(float(grad_norm)), "gradient norm", epoch)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) * len(terms)
            ctx.optimizer.step()
            ctx.scheduler.step()
            ctx.optimizer_steps += 1
            if ctx.ema is not None and ctx.optimizer_steps % ctx.cfg.train.ema_every == 0:
                ctx.ema.update()
        return {k: v / max(count, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------------- context
class TrainContext:
    """Everything a trainer needs: accelerator, model, rewards, optimizer, EMA, prompts, derived sizes."""

    def __init__(self, cfg: Any, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.seed = cfg.seed
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with="tensorboard", project_dir=cfg.output_dir
        )
        seed_everything(cfg.seed)
        self.prompts = load_prompts(cfg.prompts, "prompts")
        self.eval_prompts = load_prompts(cfg.eval_prompts, "eval_prompts")
        self.rewards: RewardSet = build_reward_set(cfg.rewards, "rewards")
        self.monitors: RewardSet | None = build_reward_set(cfg.monitors, "monitors") if cfg.monitors else None
        device = self.accelerator.device if cfg.model.device == "auto" else resolve_device(cfg.model.device)
        self.flow: FlowModel = load_flow_model(
            cfg.model.family, cfg.model.path, dtype=cfg.model.dtype, device=device, lora=cfg.model.lora,
            max_sequence_length=cfg.model.max_sequence_length,
        )  # fmt: skip
        self.flow.latent_shape(cfg.sampling.height, cfg.sampling.width)
        self.rewards.to(device)
        if self.monitors is not None:
            self.monitors.to(device)
        transformer = self.flow.transformer
        if cfg.model.lora:  # a LoRA loaded as the starting point is merged, and a fresh one is trained on top
            self.flow.pipe.fuse_lora()
            self.flow.pipe.unload_lora_weights()
        self.uses_lora = cfg.lora.rank > 0
        if self.uses_lora:
            self.flow.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
        else:
            transformer.requires_grad_(True)
        if cfg.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.trained_names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [p for p in transformer.parameters() if p.requires_grad], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay, eps=t.adam_eps,
        )  # fmt: skip
        self.trainable: list[torch.nn.Parameter] = []  # set by finish_setup (sharding replaces the parameters)
        self.ema: EMA | None = None
        self.optimizer_steps = 0
        self.scheduler = None  # built once the trainer says how many optimizer steps an epoch has
        self.network = None

    def finish_setup(self, updates_per_epoch: int) -> None:
        t = self.cfg.train
        self.scheduler = get_scheduler(
            t.lr_scheduler, self.optimizer, num_warmup_steps=t.warmup_epochs * updates_per_epoch,
            num_training_steps=t.epochs * updates_per_epoch,
        )  # fmt: skip
        self.network, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.flow.transformer, self.optimizer, self.scheduler
        )
        self.flow.use_network(self.network)
        # after prepare: under FSDP2 the transformer's parameters are now sharded DTensors
        self.trainable = [p for p in self.flow.transformer.parameters() if p.requires_grad]
        if t.ema_decay > 0:
            self.ema = EMA(self.flow.transformer, t.ema_decay)

    def sync_context(self, sync: bool):
        """Gradient synchronisation only on the last backward of an accumulation (DDP's ``no_sync``)."""
        if sync or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.network)

    # -------------------------------------------------------------------------------- trained-state (de)serialise
    def trained_state(self) -> dict[str, Tensor]:
        """The trained parameters (LoRA, or the whole transformer) as whole CPU tensors keyed by parameter name;
        a collective under FSDP (every process calls it)."""
        reshard(self.flow.transformer)
        return full_parameters(self.flow.transformer, self.trained_names)

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        reshard(self.flow.transformer)
        try:
            load_full_parameters_(self.flow.transformer, state, self.trained_names)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not fit this run's trained parameters: {e}") from e

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state with whole tensors keyed by parameter name (torch's distributed-checkpoint format,
        the same with or without sharding); a collective under FSDP, and complete on the main process."""
        reshard(self.network)
        return get_optimizer_state_dict(self.network, _unwrap(self.optimizer, "optimizer"),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # fmt: skip

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        reshard(self.network)
        set_optimizer_state_dict(self.network, _unwrap(self.optimizer, "optimizer"), state,
                                 options=StateDictOptions(full_state_dict=True))  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the loop
def run_training(cfg: Any, trainer_cls: type[Trainer], accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train ``trainer_cls`` under ``cfg`` (a job dataclass with the ``RunSection`` fields); resumes from the newest
    checkpoint in ``cfg.output_dir`` if there is one. Returns the final evaluation summary."""
    from diffalign.training.evaluation import Evaluator, plot_history

    ctx = TrainContext(cfg, accelerator)
    acc = ctx.accelerator
    trainer = trainer_cls(ctx)
    ctx.finish_setup(trainer.updates_per_epoch)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if acc.is_main_process:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    evaluator = Evaluator(ctx)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    history_path = os.path.join(cfg.output_dir, "history.jsonl")
    start = 0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        start = _resume(ctx, latest)
        log.info("resumed from %s (epoch %d)", latest, start)
    else:
        if acc.is_main_process and os.path.exists(history_path):
            os.remove(history_path)
        summary = evaluator.run(0, "before")
        _append_history(ctx, history_path, {"epoch": 0, **{f"eval/{k}": v for k, v in summary.items()}})
    if acc.is_main_process:
        acc.init_trackers("train")

    bar = tqdm(range(start, cfg.train.epochs), initial=start, total=cfg.train.epochs, desc="train",
               disable=not acc.is_main_process)  # fmt: skip
    started = time.time()
    for epoch in bar:
        ctx.flow.transformer.eval()
        rollout = trainer.collect(epoch)
        ctx.flow.transformer.train()
        metrics = {**rollout.metrics, **trainer.update(rollout, epoch)}
        ctx.flow.transformer.eval()
        done = epoch + 1
        metrics["lr"] = ctx.scheduler.get_last_lr()[0]
        metrics["epoch_seconds"] = (time.time() - started) / (done - start)
        record = {"epoch": done, **metrics}
        if done % cfg.train.eval_every == 0 or done == cfg.train.epochs:
            tag = "after" if done == cfg.train.epochs else f"epoch-{done:05d}"
            record.update({f"eval/{k}": v for k, v in evaluator.run(done, tag).items()})
        if done % cfg.train.log_every == 0 or done == cfg.train.epochs:
            acc.log(record, step=done)
            bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}")
        _append_history(ctx, history_path, record)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.epochs:
            _checkpoint(ctx, ckpt_dir, done)

    final = _export(ctx)
    summary = {}
    if acc.is_main_process:
        plot_history(history_path, os.path.join(cfg.output_dir, "curves.png"))
        with open(os.path.join(cfg.output_dir, "eval_after.json")) as f:
            summary = json.load(f)
        log.info("final LoRA/weights: %s", final)
    acc.end_training()
    return summary


def _append_history(ctx: TrainContext, path: str, record: dict[str, Any]) -> None:
    if ctx.accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _checkpoint(ctx: TrainContext, directory: str, epoch: int) -> None:
    ctx.accelerator.wait_for_everyone()
    # gathering whole tensors is a collective under FSDP: every process takes part, the main one writes
    modules = {"trained": ctx.trained_state()}
    if ctx.ema is not None:
        modules["ema"] = ctx.ema.state_dict()
    optimizer = ctx.optimizer_state()
    if ctx.accelerator.is_main_process:
        extra = {"optimizer_steps": ctx.optimizer_steps}
        save_checkpoint(directory, epoch, modules, optimizer, _unwrap(ctx.scheduler, "scheduler"), extra=extra,
                        keep=ctx.cfg.train.keep_checkpoints)  # fmt: skip
    ctx.accelerator.wait_for_everyone()


def _unwrap(obj: Any, attr: str) -> Any:
    """The torch optimizer / scheduler inside accelerate's wrapper."""
    return getattr(obj, attr, obj)


def _resume(ctx: TrainContext, path: str) -> int:
    from safetensors.torch import load_file

    try:
        trained = load_file(os.path.join(path, "modules", "trained.safetensors"))
        ema = load_file(os.path.join(path, "modules", "ema.safetensors")) if ctx.ema is not None else None
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    ctx.load_trained_state(trained)
    state = load_checkpoint(path, {}, None, _unwrap(ctx.scheduler, "scheduler"))
    try:
        ctx.load_optimizer_state(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        if ema is not None:
            ctx.ema.load_state_dict(ema)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    ctx.optimizer_steps = int(state["extra"].get("optimizer_steps", 0))
    return int(state["step"])


def _export(ctx: TrainContext) -> str:
    """Write the trained weights (EMA if enabled) as ``output_dir/final``: a diffusers-format LoRA, or a full
    transformer folder; returns its path."""
    final = os.path.join(ctx.cfg.output_dir, "final")
    ctx.accelerator.wait_for_everyone()
    ctx.flow.use_network(None)
    if ctx.ema is not None:
        ctx.ema.copy_to()
    # whole tensors (a collective under FSDP): the LoRA, or the transformer's full state with its buffers
    reshard(ctx.network)
    state = ctx.trained_state() if ctx.uses_lora else ctx.accelerator.get_state_dict(ctx.network)
    if ctx.accelerator.is_main_process:
        tmp = f"{final}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if ctx.uses_lora:
            ctx.flow.save_lora(tmp, state_dict=state)
        else:
            ctx.flow.transformer.save_config(tmp)
            save_torch_state_dict(state, tmp, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    ctx.accelerator.wait_for_everyone()
    return final


def derive_layout(total: int, num_processes: int, batch_size: int, key: str) -> int:
    """Samples per process for ``total`` samples per epoch; errors (naming ``key``) when it does not divide."""
    if total % num_processes:
        raise ConfigError(f"config key '{key}': {total} samples per epoch do not split over {num_processes} processes")
    local = total // num_processes
    if local % batch_size:
        raise ConfigError(
            f"config key '{key}': {local} samples per process are not a multiple of the batch size {batch_size}"
        )
    return local
