"""Fine-tuning a loaded flow model on prompts: the config sections every such job shares (``RunSection``) and
``Finetuning``, the setup that trainers of those jobs (Flow-GRPO and relatives) build in their ``__init__``.

``Finetuning(ctx, updates_per_epoch)`` loads ``cfg.model`` (merging a starting LoRA into the base), attaches the
trained LoRA (``cfg.lora``; ``rank = 0``: the whole transformer is trained instead), registers it as the module
``policy`` with its AdamW optimizer, LR schedule and EMA (``cfg.train``), exported as ``final/`` (a diffusers
LoRA, or a transformer folder), and loads the prompt sets, the rewards and the monitors. Its ``evaluator``
samples the held-out prompts with the EMA weights (see ``training.evaluation``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers.optimization import get_scheduler
from omegaconf import MISSING
from torch import Tensor

from diffalign.config import ConfigError, ModelConfig, SamplingConfig, read_prompt_file, resolve_device
from diffalign.pipelines import FlowModel, load_model
from diffalign.rewards import RewardConfig, RewardSet, build_reward_set
from diffalign.training.ema import EMA
from diffalign.training.evaluation import EvalPrompts, Evaluator, plot_history, select_prompts
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Cadence, TrainedModule


# ----------------------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class LoraSection:
    """LoRA on the transformer (``rank = 0``: full fine-tuning of the transformer instead).

    Defaults are Flow-GRPO's: rank 32, alpha 64, gaussian init, attention projections of both streams.
    """

    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"config key 'lora.rank': must be >= 1 for a LoRA or 0 for full fine-tuning, got "
                              f"{self.rank}")  # fmt: skip
        if self.rank > 0 and self.alpha <= 0:
            raise ConfigError(f"config key 'lora.alpha': must be > 0, got {self.alpha}")


@dataclass(kw_only=True)
class TrainConfig:
    """Shared optimisation and bookkeeping.

    Attributes:
        epochs: number of collect -> update rounds.
        lr, weight_decay, adam_beta1/2, adam_eps: AdamW (Flow-GRPO: 3e-4, 1e-4, 0.9, 0.999, 1e-8 for LoRA).
        lr_scheduler, warmup_epochs: diffusers scheduler name over optimizer steps.
        grad_clip: max gradient norm (Flow-GRPO: 1.0).
        mixed_precision: ``no`` / ``fp16`` / ``bf16`` (accelerate autocast); null: accelerate's own setting (an
            ``accelerate launch`` config or ``ACCELERATE_MIXED_PRECISION``; ``no`` without one).
        gradient_checkpointing: recompute activations in the backward pass (saves memory).
        ema_decay, ema_every: EMA of the trained weights, updated every ``ema_every`` optimizer steps
            (Flow-GRPO: 0.9 every 8); ``ema_decay = 0`` disables it. Evaluation and export use the EMA.
        eval_every, checkpoint_every, log_every: in epochs.
        keep_checkpoints: newest checkpoints kept.
        eval_images_per_prompt: images per evaluation prompt (an evaluation set may set its own).
        max_eval_prompts: cap on the prompts of each evaluation set, taken round-robin over the world's
            categories (None: all; an evaluation set may set its own).
        report_to: the experiment tracker, through accelerate: ``tensorboard`` (logs under the run folder),
            ``wandb`` (needs the ``wandb`` extra; ``WANDB_MODE=offline`` works without a network) or ``none``.
            Scalars, evaluation grids and the resolved config go to it; ``history.jsonl`` and ``curves.png`` are
            written either way.
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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    gradient_checkpointing: bool = False
    ema_decay: float = 0.9
    ema_every: int = 8
    eval_every: int = 10
    checkpoint_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    eval_images_per_prompt: int = 2
    max_eval_prompts: int | None = None
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"

    def __post_init__(self) -> None:
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("config key 'train.report_to': 'wandb' needs the wandb package (pip install "
                              "'diffalign[wandb]'); use tensorboard or none")  # fmt: skip
        for key in ("epochs", "eval_every", "checkpoint_every", "log_every", "ema_every", "eval_images_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}': must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config key 'train.ema_decay': must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'train.lr': must be > 0, got {self.lr}")

    def cadence(self, progress: tuple[str, ...] = ()) -> Cadence:
        """The loop's cadence of these settings (an evaluation before the first epoch and after the last)."""
        return Cadence(epochs=self.epochs, eval_every=self.eval_every, log_every=self.log_every,
                       checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
                       evaluate_before=True, progress=progress)  # fmt: skip


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig(name="world")]


@dataclass(kw_only=True)
class EvalSet:
    """One evaluation prompt set.

    Attributes:
        prompts: a prompt source (see :func:`load_prompts`).
        images_per_prompt: images per prompt (None: ``train.eval_images_per_prompt``).
        max_prompts: cap on its prompts, round-robin over the world's categories (None: ``train.max_eval_prompts``).
    """

    prompts: str = MISSING
    images_per_prompt: int | None = None
    max_prompts: int | None = None


def _default_eval_sets() -> dict[str, EvalSet]:
    return {"test": EvalSet(prompts="world:test"), "test_seen": EvalSet(prompts="world:test_seen")}


@dataclass(kw_only=True)
class RunSection:
    """What every fine-tuning job shares: the model, prompts, rewards, monitors and the loop settings.

    Attributes:
        output_dir: the run folder (checkpoints, logs, grids, plots, the final LoRA, ``config.yaml``).
        seed: every random draw is a function of (seed, epoch, process, ...), so runs are reproducible.
        prompts: the training prompts: ``world:train`` (the embedded world's split; ``:balanced`` weights its
            categories equally, see :func:`load_prompts`) or a text file.
        eval_sets: named evaluation prompt sets (default: the world's held-out splits ``test``, novel bindings,
            and ``test_seen``, GenEval-comparable), each reported under its name.
        rewards: the optimised rewards (weighted sum).
        monitors: rewards that are logged on evaluation images but never optimised (reward-hacking watch).
        sampling: how evaluation images are drawn (ODE, possibly more steps than training rollouts).
    """

    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    prompts: str = "world:train"
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)
    rewards: list[RewardConfig] = field(default_factory=_default_rewards)
    monitors: list[RewardConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)
    )

    def __post_init__(self) -> None:
        if not self.eval_sets:  # the default (a schema default would be merged with the sets a config gives)
            self.eval_sets = _default_eval_sets()
        for name, evalset in self.eval_sets.items():
            if not name.replace("_", "").isalnum():
                raise ConfigError(f"config key 'eval_sets.{name}': a set's name must be letters, digits and '_'")
            for key in ("images_per_prompt", "max_prompts"):
                value = getattr(evalset, key)
                if value is not None and value < 1:
                    raise ConfigError(f"config key 'eval_sets.{name}.{key}': must be >= 1, got {value}")
            _check_source(evalset.prompts, f"eval_sets.{name}.prompts")
        _check_source(self.prompts, "prompts")


def _check_source(source: str, key: str) -> None:
    """A ``world:`` source names a known split and option (checked before any model loads)."""
    if source.startswith("world:"):
        from diffalign.world.prompts import SPLITS

        split, _, option = source.removeprefix("world:").partition(":")
        if split not in SPLITS:
            raise ConfigError(f"config key '{key}': unknown world split {split!r} ({', '.join(SPLITS)})")
        if option not in ("", "balanced"):
            raise ConfigError(f"config key '{key}': unknown option {option!r} (only 'balanced')")


def load_prompts(source: str, key: str) -> list[str]:
    """``world:train`` / ``world:test`` / ``world:test_seen``, ``world:train:balanced`` or a text file (one prompt
    per line).

    ``world:<split>:balanced`` repeats each category's prompts so that every category carries the same total
    weight (the world's benchmark is the mean over categories, while ``world:train`` is 71% colour attribution);
    uniform draws from the returned list are then category-balanced.
    """
    if source.startswith("world:"):
        from diffalign.world.prompts import prompts_by_category, split_prompts

        _check_source(source, key)
        split, _, option = source.removeprefix("world:").partition(":")
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


# ----------------------------------------------------------------------------------------------------- setup
class Finetuning:
    """The model, its registered ``policy`` module, prompts, rewards and monitors of a ``RunSection`` job (see the
    module docstring). The trainer calls ``ctx.prepare()`` once it has registered anything else, then routes the
    flow through ``policy.network`` (``flow.use_network``).

    Attributes:
        cfg, accelerator, seed: the job's (from the context).
        flow: the loaded model; ``uses_lora``: a LoRA is trained (else the whole transformer).
        policy: the registered trained module (LoRA parameters, or every transformer parameter).
        prompts: the training prompt list; ``eval_sets``: name -> the evaluation set's prompts.
        rewards, monitors: the optimised rewards and the logged-only ones (None if there are none).
        evaluator: samples every evaluation set with the EMA weights and scores it.
    """

    def __init__(self, ctx: TrainContext, updates_per_epoch: int) -> None:
        cfg = ctx.cfg
        self.cfg, self.accelerator, self.seed = cfg, ctx.accelerator, ctx.seed
        self.prompts = load_prompts(cfg.prompts, "prompts")
        t = cfg.train
        self.eval_sets: dict[str, EvalPrompts] = {}
        for name, evalset in cfg.eval_sets.items():
            prompts = load_prompts(evalset.prompts, f"eval_sets.{name}.prompts")
            limit = evalset.max_prompts if evalset.max_prompts is not None else t.max_eval_prompts
            images = evalset.images_per_prompt or t.eval_images_per_prompt
            self.eval_sets[name] = EvalPrompts(name, select_prompts(prompts, limit), images)
        self.rewards: RewardSet = build_reward_set(cfg.rewards, "rewards")
        self.monitors: RewardSet | None = build_reward_set(cfg.monitors, "monitors") if cfg.monitors else None
        device = ctx.device if cfg.model.device == "auto" else resolve_device(cfg.model.device)
        self.flow: FlowModel = load_model(cfg.model, device)
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
        optimizer = torch.optim.AdamW(
            [p for p in transformer.parameters() if p.requires_grad], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay, eps=t.adam_eps,
        )  # fmt: skip
        scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_epochs * updates_per_epoch,
            num_training_steps=t.epochs * updates_per_epoch,
        )  # fmt: skip
        self.policy: TrainedModule = ctx.register(
            "policy", transformer, optimizer, scheduler, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
            ema_every=t.ema_every, export=self._export, export_dir="final", export_whole=not self.uses_lora,
        )  # fmt: skip
        self.evaluator = Evaluator(self)

    @property
    def ema(self) -> EMA | None:
        """The policy's EMA (what evaluation and export use), once prepared."""
        return self.policy.ema

    @property
    def final_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, self.policy.export_dir)

    def _export(self, directory: str, state: dict[str, Tensor]) -> None:
        if self.uses_lora:
            self.flow.save_lora(directory, state_dict=state)
        else:
            self.flow.save_transformer(directory, state)

    def finish(self) -> dict:
        """End of a run: plot ``history.jsonl`` into ``curves.png`` and return the final evaluation
        (``eval_after.json``) on the main process, ``{}`` on the others."""
        out = self.cfg.output_dir
        if not self.accelerator.is_main_process:
            return {}
        plot_history(os.path.join(out, "history.jsonl"), os.path.join(out, "curves.png"))
        with open(os.path.join(out, "eval_after.json")) as f:
            return json.load(f)
