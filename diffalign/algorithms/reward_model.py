"""``diffalign train-reward``: train a preference, artifact or multi-aspect reward model.

Losses (one step = one mini-batch):

* preference, ``objective: bradley_terry``: ``-log sigmoid(s(x_chosen, c) - s(x_rejected, c))`` averaged over
  pairs (the Bradley-Terry likelihood, as PickScore / ImageReward / HPSv2 are trained);
* preference, ``objective: regression``: ``(s(x, c) - rating)^2``;
* artifact: binary cross-entropy on "has an artifact" (random horizontal/vertical flips as augmentation);
* multi-aspect: the sum over aspects of the binary cross-entropy with soft targets in [0, 1], each averaged over
  the examples where that aspect is known, plus (with preference pairs) the Bradley-Terry loss of one aspect
  (``train.pair_aspect``, default ``alignment``) on pairs: pointwise targets alone teach prompt alignment slowly.

AdamW, linear warm-up then cosine decay, gradient clipping, a progress bar, on the shared training loop (one
epoch = one step); held-out metrics at the end (and every ``train.eval_every`` steps). The run folder gets
``model/`` (``save_pretrained``), ``metrics.json``, ``history.jsonl`` and ``config.yaml`` (the resolved job).
Data come from the embedded world (synthesised, see :mod:`diffalign.rewards.data`) or from JSONL files / folders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor

from diffalign.config import ConfigError, resolve_device
from diffalign.rewards.artifacts import ARTIFACT_KINDS
from diffalign.rewards.data import (
    LabeledData,
    PairData,
    load_data,
    save_data,
    split_data,
    to_float,
    world_labeled,
    world_pairs,
)
from diffalign.rewards.models import (
    ArtifactModel,
    MultiAspectModel,
    PreferenceModel,
    RewardModel,
    clip_config_dict,
    open_clip_config_dict,
    world_tokenizer,
)
from diffalign.rewards.preprocess import ImageTransform
from diffalign.training.loop import TrainContext, run_training
from diffalign.training.trainer import Batch, Cadence, Trainer

log = logging.getLogger("diffalign.train_reward")


# ------------------------------------------------------------------------------------------------------ config
@dataclass(kw_only=True)
class RewardDataConfig:
    """Where training data come from.

    Attributes:
        source: ``world`` (synthesised from the embedded world), ``jsonl`` (files in the formats of
            :mod:`diffalign.rewards.data`) or ``folder`` (artifact model: ``clean/`` and ``artifact/`` subfolders).
        train_path, eval_path: the files/folders (``jsonl``/``folder``); without ``eval_path`` a random
            ``eval_fraction`` of the training data is held out.
        image_size: square size images are read at (files) or rendered at (world), pixels.
        num_train, num_eval: world examples (pairs or images) for training and for each held-out evaluation.
        eval_split: world prompts of the held-out evaluation: ``train`` (fresh scenes of the training prompts),
            ``test`` (the test split: prompt combinations never seen in training) or ``both``.
        quality_fraction: world preference pairs that are clean-vs-artifact (the rest prompt-violation pairs).
        violation_fraction: world labelled images rendered from a perturbed (violating) prompt.
        artifact_fraction: world labelled images corrupted by an artifact.
        artifacts: artifact kinds to synthesise (see ``diffalign.rewards.artifacts.ARTIFACT_KINDS``).
        min_severity: lowest artifact severity in [0, 1].
        num_train_pairs, train_pairs_path: multi-aspect model only: preference pairs (world: this many
            prompt-violation pairs; files: a pairs JSONL) that train ``train.pair_aspect`` with the Bradley-Terry
            loss besides its pointwise targets (0 / None: no pairs).
        export_dir: if set, the synthesised world data are also written there as PNG + JSONL.
    """

    source: Literal["world", "jsonl", "folder"] = "world"
    train_path: str | None = None
    eval_path: str | None = None
    eval_fraction: float = 0.1
    image_size: int = 64
    num_train: int = 4000
    num_eval: int = 1000
    eval_split: Literal["both", "train", "test"] = "both"
    quality_fraction: float = 0.3
    violation_fraction: float = 0.5
    artifact_fraction: float = 0.5
    artifacts: list[str] = field(default_factory=lambda: list(ARTIFACT_KINDS))
    min_severity: float = 0.25
    num_train_pairs: int = 2000
    train_pairs_path: str | None = None
    export_dir: str | None = None


@dataclass(kw_only=True)
class RewardArchConfig:
    """Model sizes.

    Attributes:
        backbone: image-text backbone of the preference / multi-aspect models: ``open_clip`` (an ``open_clip.CLIP``
            built from the sizes below) or ``transformers`` (a ``CLIPModel``: from the sizes below with the world
            tokenizer, or ``init_from`` a pretrained one).
        init_from: a transformers ``CLIPModel`` folder or Hub id to start from (its config, tokenizer and image
            processor; implies ``backbone: transformers``).
        vision: image tower of a from-scratch backbone: ``resnet`` (CLIP's ModifiedResNet, open_clip only; learns
            fastest from scratch) or ``vit``.
        image_size: model input side, pixels.
        vision_width, vision_layers: ResNet stem width and blocks per stage, or ViT width and depth.
        patch_size: ViT patch, pixels.
        text_width, text_layers, heads, embed_dim: text tower, attention heads, joint embedding width.
        max_length: prompt token limit.
        head: preference head, ``mlp`` or ``cosine`` (PickScore-style).
        head_hidden: hidden width of the MLP heads.
        aspects: multi-aspect head names.
        channels: artifact CNN stage widths.
    """

    backbone: Literal["open_clip", "transformers"] = "open_clip"
    init_from: str | None = None
    vision: Literal["resnet", "vit"] = "resnet"
    image_size: int = 64
    vision_width: int = 16
    vision_layers: int = 1
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    heads: int = 4
    embed_dim: int = 64
    max_length: int = 16
    head: Literal["mlp", "cosine"] = "mlp"
    head_hidden: int = 128
    aspects: list[str] = field(default_factory=lambda: ["alignment", "aesthetics", "artifacts"])
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])


@dataclass(kw_only=True)
class RewardOptimConfig:
    """Optimisation.

    Attributes:
        objective: preference model only: ``bradley_terry`` (pairs) or ``regression`` (ratings).
        steps, batch_size: optimiser steps; examples (pairs) per step.
        lr, weight_decay, warmup_steps, grad_clip: AdamW and schedule.
        log_every: steps between loss log lines; eval_every: steps between held-out evaluations (0: only at the
            end).
        pair_aspect, pair_weight, pair_batch_size: multi-aspect model: the aspect trained on preference pairs (if
            any), the weight of that Bradley-Terry term and the pairs added to each step.
    """

    objective: Literal["bradley_terry", "regression"] = "bradley_terry"
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    log_every: int = 100
    eval_every: int = 0
    pair_aspect: str = "alignment"
    pair_weight: float = 1.0
    pair_batch_size: int = 16


@dataclass(kw_only=True)
class TrainRewardJob:
    """``diffalign train-reward``: train one reward model.

    Attributes:
        model: ``preference``, ``artifact`` or ``multi_aspect``.
        output_dir: run folder (``model/``, ``metrics.json``, ``config.yaml``).
        seed: seeds data synthesis, initialisation and batches.
        device: ``auto``, ``cpu``, ``cuda``...
        num_threads: torch CPU threads (None: torch's default).
        progress: show a progress bar.
    """

    kind: Literal["train-reward"] = "train-reward"
    model: Literal["preference", "artifact", "multi_aspect"] = "preference"
    output_dir: str = "runs/reward"
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    arch: RewardArchConfig = field(default_factory=RewardArchConfig)
    train: RewardOptimConfig = field(default_factory=RewardOptimConfig)

    def __post_init__(self) -> None:
        t, d = self.train, self.data
        for key in ("steps", "batch_size", "log_every", "pair_batch_size"):
            if getattr(t, key) < 1:
                raise ConfigError(f"config key 'train.{key}': must be >= 1, got {getattr(t, key)}")
        if t.lr <= 0:
            raise ConfigError(f"config key 'train.lr': must be > 0, got {t.lr}")
        if d.source != "world" and not d.train_path:
            raise ConfigError(f"config key 'data.train_path': required when data.source is {d.source!r}")
        if d.source == "world" and (d.num_train < 1 or d.num_eval < 1):
            raise ConfigError("config keys 'data.num_train'/'data.num_eval': must be >= 1")
        if not 0 < d.eval_fraction < 1:
            raise ConfigError(f"config key 'data.eval_fraction': must be in (0, 1), got {d.eval_fraction}")
        unknown = [a for a in d.artifacts if a not in ARTIFACT_KINDS]
        if unknown or not d.artifacts:
            raise ConfigError(f"config key 'data.artifacts': unknown {unknown}; choose from {list(ARTIFACT_KINDS)}")
        for key in ("quality_fraction", "violation_fraction", "artifact_fraction", "min_severity"):
            if not 0 <= getattr(d, key) <= 1:
                raise ConfigError(f"config key 'data.{key}': must be in [0, 1]")
        aspects = self.arch.aspects
        if self.model == "multi_aspect" and (not aspects or len(set(aspects)) != len(aspects)):
            raise ConfigError("config key 'arch.aspects': must be a non-empty list of unique names")
        if self.model == "multi_aspect" and (d.num_train_pairs > 0 or d.train_pairs_path):
            if t.pair_aspect not in aspects:
                raise ConfigError(f"config key 'train.pair_aspect': {t.pair_aspect!r} is not one of arch.aspects")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("config key 'num_threads': must be >= 1")


# ------------------------------------------------------------------------------------------------------- data
def build_data(job: TrainRewardJob) -> tuple[PairData | LabeledData, dict[str, tuple], PairData | None]:
    """``(train, held_out, train_pairs)`` with ``held_out`` = name -> ``(data, pairs or None)`` and
    ``train_pairs`` the multi-aspect model's preference pairs (None otherwise).

    World data are evaluated on fresh scenes of the training prompts (``seen_prompts``) and of the test split's
    held-out prompt combinations (``novel_prompts``), as ``data.eval_split`` asks; ``pairs`` is a set of world
    preference pairs used to report the pair accuracy of a model trained on labels. File data have one held-out
    set (``held_out``).
    """
    d, seed = job.data, job.seed
    if d.source == "world":
        common = dict(size=d.image_size, artifact_kinds=d.artifacts, min_severity=d.min_severity)
        labeled = dict(common, violation_fraction=d.violation_fraction, artifact_fraction=d.artifact_fraction)
        if job.model == "artifact":
            labeled["violation_fraction"] = 0.0
        pair_quality = 0.0 if job.model == "multi_aspect" else d.quality_fraction
        bt = job.model == "preference" and job.train.objective == "bradley_terry"
        if bt:
            train = world_pairs(d.num_train, seed, "train", quality_fraction=d.quality_fraction, **common)
        else:
            train = world_labeled(d.num_train, seed, "train", **labeled)
        splits = {"train": ["train"], "test": ["test"], "both": ["train", "test"]}[d.eval_split]
        held: dict[str, tuple] = {}
        for k, split in enumerate(splits):
            eval_seed = seed + 1_000_003 * (k + 1)
            name = "seen_prompts" if split == "train" else "novel_prompts"
            if bt:
                held[name] = (world_pairs(d.num_eval, eval_seed, split, quality_fraction=d.quality_fraction,
                                          **common), None)  # fmt: skip
            else:
                pairs = None
                if job.model != "artifact":
                    pairs = world_pairs(d.num_eval, eval_seed + 1, split, quality_fraction=pair_quality, **common)
                held[name] = (world_labeled(d.num_eval, eval_seed, split, **labeled), pairs)
        train_pairs = None
        if job.model == "multi_aspect" and d.num_train_pairs > 0:
            train_pairs = world_pairs(d.num_train_pairs, seed + 7, "train", quality_fraction=0.0, **common)
        if d.export_dir:
            save_data(train, os.path.join(d.export_dir, "train"))
            if train_pairs is not None:
                save_data(train_pairs, os.path.join(d.export_dir, "train_pairs"))
            for name, (data, _) in held.items():
                save_data(data, os.path.join(d.export_dir, name))
        return train, held, train_pairs
    train = load_data(d.train_path, d.image_size, job.arch.aspects)
    held_data = load_data(d.eval_path, d.image_size, job.arch.aspects) if d.eval_path else None
    if held_data is None:
        train, held_data = split_data(train, d.eval_fraction, seed)
    _check_data_kind(job, train)
    _check_data_kind(job, held_data)
    train_pairs = None
    if job.model == "multi_aspect" and d.train_pairs_path:
        train_pairs = load_data(d.train_pairs_path, d.image_size)
        if not isinstance(train_pairs, PairData):
            raise ValueError(f"data.train_pairs_path {d.train_pairs_path!r} must hold chosen/rejected pairs")
    return train, {"held_out": (held_data, None)}, train_pairs


def _check_data_kind(job: TrainRewardJob, data: PairData | LabeledData) -> None:
    if job.model == "preference" and job.train.objective == "bradley_terry" and not isinstance(data, PairData):
        raise ValueError("preference model with objective bradley_terry needs pair data (chosen/rejected rows)")
    if job.model == "preference" and job.train.objective == "regression":
        if not isinstance(data, LabeledData) or "rating" not in data.targets:
            raise ValueError("preference model with objective regression needs rows with a 'rating'")
    if job.model == "artifact" and (not isinstance(data, LabeledData) or not _artifact_target_available(data)):
        raise ValueError("artifact model needs rows with an 'artifact' label (or a clean/ + artifact/ folder)")
    if job.model == "multi_aspect":
        if not isinstance(data, LabeledData) or not any(a in data.targets for a in job.arch.aspects):
            raise ValueError(f"multi-aspect model needs rows with at least one of the aspects {job.arch.aspects}")


def _artifact_target_available(data: LabeledData) -> bool:
    return "artifact" in data.targets or "artifacts" in data.targets


def artifact_labels(data: LabeledData) -> Tensor:
    """``(N,)`` 1 = has an artifact (from ``artifact``, or ``1 - artifacts`` of world data)."""
    if "artifact" in data.targets:
        return data.targets["artifact"]
    return 1.0 - data.targets["artifacts"]


# ------------------------------------------------------------------------------------------------------ model
def build_model(job: TrainRewardJob) -> RewardModel:
    """A freshly initialised model for the job (seeded)."""
    a = job.arch
    torch.manual_seed(job.seed)
    if job.model == "artifact":
        return ArtifactModel(channels=a.channels, image_size=a.image_size)
    pretrained, tokenizer = None, None
    world_transform = ImageTransform(size=a.image_size, crop=a.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if a.init_from:
        from transformers import AutoTokenizer, CLIPModel

        from diffalign.rewards.hub import from_pretrained
        from diffalign.rewards.preference import processor_transform

        pretrained = from_pretrained(CLIPModel.from_pretrained, a.init_from, "train-reward")
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, a.init_from, "train-reward")
        backbone = {"type": "transformers", "clip_config": pretrained.config.to_dict(),
                    "transform": _transform_dict(processor_transform(a.init_from, "train-reward")),
                    "max_length": a.max_length}  # fmt: skip
    elif a.backbone == "open_clip":
        model_config = open_clip_config_dict(
            image_size=a.image_size, vision=a.vision, vision_width=a.vision_width, vision_layers=a.vision_layers,
            patch_size=a.patch_size, text_width=a.text_width, text_layers=a.text_layers, heads=a.heads,
            embed_dim=a.embed_dim, max_length=a.max_length,
        )  # fmt: skip
        backbone = {"type": "open_clip", "model_config": model_config, "transform": _transform_dict(world_transform)}
    else:
        if a.vision != "vit":
            raise ConfigError("config key 'arch.vision': a transformers CLIP backbone has a ViT image tower (vit)")
        tokenizer = world_tokenizer(a.max_length)
        clip_config = clip_config_dict(
            len(tokenizer), image_size=a.image_size, patch_size=a.patch_size, vision_width=a.vision_width,
            vision_layers=a.vision_layers, text_width=a.text_width, text_layers=a.text_layers, heads=a.heads,
            embed_dim=a.embed_dim, max_length=a.max_length,
        )  # fmt: skip
        backbone = {"type": "transformers", "clip_config": clip_config, "transform": _transform_dict(world_transform),
                    "max_length": a.max_length}  # fmt: skip
    if job.model == "preference":
        model: RewardModel = PreferenceModel(backbone, tokenizer, head=a.head, head_hidden=a.head_hidden)
    else:
        model = MultiAspectModel(backbone, tokenizer, aspects=a.aspects, head_hidden=a.head_hidden)
    if pretrained is not None:
        model.backbone.clip.load_state_dict(pretrained.state_dict())
    return model


def _transform_dict(transform: ImageTransform) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(transform).items()}


# ------------------------------------------------------------------------------------------------- the losses
def _bce_soft(logits: Tensor, targets: Tensor) -> Tensor:
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], targets[known])


def batch_loss(job: TrainRewardJob, model: RewardModel, data: PairData | LabeledData, rows: Tensor,
               device: torch.device, generator: torch.Generator, pairs: PairData | None = None) -> Tensor:  # fmt: skip
    """The training loss of the examples at ``rows`` (see the module docstring); for the multi-aspect model with
    ``pairs``, plus ``pair_weight`` times the Bradley-Terry loss of ``pair_aspect`` on ``pair_batch_size`` random
    pairs."""
    idx = rows.tolist()
    prompts = [data.prompts[i] for i in idx]
    if isinstance(data, PairData):
        images = to_float(torch.cat([data.chosen[rows], data.rejected[rows]])).to(device)
        scores = model(images, prompts + prompts)
        margin = scores[: len(idx)] - scores[len(idx) :]
        return F.softplus(-margin).mean()  # -log sigmoid(s_chosen - s_rejected)
    images = to_float(data.images[rows]).to(device)
    if job.model == "preference":
        return F.mse_loss(model(images, prompts), data.targets["rating"][rows].to(device))
    if job.model == "artifact":
        flip_h = torch.rand(len(idx), generator=generator) < 0.5
        flip_v = torch.rand(len(idx), generator=generator) < 0.5
        images = torch.where(flip_h.view(-1, 1, 1, 1).to(device), images.flip(-1), images)
        images = torch.where(flip_v.view(-1, 1, 1, 1).to(device), images.flip(-2), images)
        return F.binary_cross_entropy_with_logits(model(images), artifact_labels(data)[rows].to(device))
    logits = model(images, prompts)
    losses = [_bce_soft(logits[a], data.targets[a][rows].to(device)) for a in model.aspects if a in data.targets]
    if pairs is not None:
        k = job.train.pair_batch_size
        prow = torch.randint(len(pairs), (k,), generator=generator)
        p_prompts = [pairs.prompts[i] for i in prow.tolist()]
        both = to_float(torch.cat([pairs.chosen[prow], pairs.rejected[prow]])).to(device)
        s = model(both, p_prompts + p_prompts)[job.train.pair_aspect]
        losses.append(job.train.pair_weight * F.softplus(-(s[:k] - s[k:])).mean())
    return torch.stack(losses).sum()


# ---------------------------------------------------------------------------------------------- the evaluation
@torch.no_grad()
def _predict(model: RewardModel, images: Tensor, prompts: list[str], device: torch.device, chunk: int = 256) -> Any:
    outs = []
    for i in range(0, len(prompts), chunk):
        x = to_float(images[i : i + chunk]).to(device)
        outs.append(model(x) if isinstance(model, ArtifactModel) else model(x, prompts[i : i + chunk]))
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}
    return torch.cat(outs).cpu()


def _group_accuracy(correct: Tensor, kinds: list[str]) -> dict[str, float]:
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
        if ":" in kind:
            groups.setdefault(kind.split(":")[0], []).append(i)
    return {k: float(correct[v].float().mean()) for k, v in sorted(groups.items())}


def pair_accuracy(model: RewardModel, pairs: PairData, device: torch.device,
                  aspect: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Fraction of pairs with ``s(chosen) > s(rejected)``, overall and per pair kind."""
    sc = _predict(model, pairs.chosen, pairs.prompts, device)
    sr = _predict(model, pairs.rejected, pairs.prompts, device)
    if isinstance(sc, dict):
        sc, sr = sc[aspect], sr[aspect]
    correct = sc > sr
    return {"pair_accuracy": float(correct.float().mean()), "pairs": len(pairs),
            "by_kind": _group_accuracy(correct, pairs.kinds)}  # fmt: skip


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def evaluate_model(job: TrainRewardJob, model: RewardModel, held: PairData | LabeledData,
                   pairs: PairData | None, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Held-out metrics of the model: pair accuracy, classification accuracy or per-target error."""
    model.eval()
    out: dict[str, Any] = {}
    if isinstance(held, PairData):
        out.update(pair_accuracy(model, held, device))
    elif job.model == "artifact":
        labels = artifact_labels(held)
        p_artifact = torch.sigmoid(_predict(model, held.images, held.prompts, device))
        correct = (p_artifact > 0.5) == (labels > 0.5)
        out.update(accuracy=float(correct.float().mean()), examples=len(held),
                   clean_accuracy=float(correct[labels < 0.5].float().mean()),
                   artifact_accuracy=float(correct[labels > 0.5].float().mean()),
                   by_kind=_group_accuracy(correct, held.kinds))  # fmt: skip
    else:
        pred = _predict(model, held.images, held.prompts, device)
        preds = pred if isinstance(pred, dict) else {"rating": pred}
        for name, value in preds.items():
            if name not in held.targets:
                continue
            target = held.targets[name]
            known = ~torch.isnan(target)
            v, t = value[known], target[known]
            if job.model == "multi_aspect":
                v = torch.sigmoid(v)
            metrics: dict[str, float] = {"mae": float((v - t).abs().mean()), "pearson": _pearson(v, t)}
            if bool(((t == 0) | (t == 1)).all()):
                metrics["accuracy"] = float(((v > 0.5) == (t > 0.5)).float().mean())
            out[name] = metrics
        if pairs is not None:
            aspect = "alignment" if job.model == "multi_aspect" else None
            if aspect is None or aspect in model.aspects:
                key = "alignment_pairs" if aspect else "pairs_eval"
                out[key] = pair_accuracy(model, pairs, device, aspect)
    model.train()
    return out


# -------------------------------------------------------------------------------------------------- training
def evaluate_all(job: TrainRewardJob, model: RewardModel, held: dict[str, tuple],
                 device: torch.device) -> dict[str, Any]:  # fmt: skip
    """:func:`evaluate_model` on every held-out set."""
    return {name: evaluate_model(job, model, data, pairs, device) for name, (data, pairs) in held.items()}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


@dataclass(kw_only=True)
class RewardBatch(Batch):
    """One step's examples: ``rows`` ``(B,)`` long, indices into the training data."""

    rows: Tensor


class RewardModelTrainer(Trainer):
    """Reward-model training over the shared loop (see the module docstring): the model is the one registered
    module; batches and augmentations come from one running generator (``seed + 17``)."""

    name = "train-reward"

    def __init__(self, ctx: TrainContext, job: TrainRewardJob, device: torch.device) -> None:
        super().__init__(ctx)
        self.job, self.device = job, device
        t0 = time.time()
        self.data, self.held, self.pairs = build_data(job)
        self.data_seconds = time.time() - t0
        self.sizes = {name: len(data) for name, (data, _) in self.held.items()}
        log.info("train-reward: %d training examples, held out %s (%.1f s)", len(self.data), self.sizes,
                 self.data_seconds)  # fmt: skip
        self.model = build_model(job).to(device).train()
        t = job.train
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                      weight_decay=t.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, t.steps))
        ctx.register("reward_model", self.model, optimizer, scheduler, grad_clip=t.grad_clip)
        ctx.prepare()
        self.generator = torch.Generator().manual_seed(job.seed + 17)
        ctx.generators["batches"] = self.generator
        self.cadence = Cadence(epochs=t.steps, eval_every=t.eval_every, log_every=t.log_every,
                               evaluate_at_end=False, checkpoint_at_end=False, progress_bar=job.progress,
                               progress=("loss_running",))  # fmt: skip
        self.history: list[dict[str, Any]] = []
        self.running = 0.0
        self.started = time.time()

    def collect(self, epoch: int) -> RewardBatch:
        rows = torch.randint(len(self.data), (min(self.job.train.batch_size, len(self.data)),),
                             generator=self.generator)  # fmt: skip
        return RewardBatch(rows=rows)

    def loss(self, batch: RewardBatch, micro: None) -> dict[str, Tensor]:
        loss = batch_loss(self.job, self.model, self.data, batch.rows, self.device, self.generator, self.pairs)
        return {"loss_reward": loss}

    def update(self, batch: RewardBatch, epoch: int) -> dict[str, float]:
        """The default update, and the smoothed loss ``loss_running`` (an EMA with weight 0.1 per step)."""
        metrics = super().update(batch, epoch)
        value = metrics["loss_reward"]
        self.running = 0.9 * self.running + 0.1 * value if epoch else value
        metrics["loss_running"] = self.running
        if (epoch + 1) % self.job.train.log_every == 0:
            log.info("step %d  loss %.4f  lr %.2e", epoch + 1, self.running, self.ctx.learning_rates()["lr"])
            self.history.append({"step": epoch + 1, "loss": self.running})
        return metrics

    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        self.history.append({"step": epoch, "eval": evaluate_all(self.job, self.model, self.held, self.device)})
        return {}

    def finish(self) -> dict[str, Any]:
        """The final held-out evaluation; writes ``model/`` and ``metrics.json``; returns the metrics."""
        job = self.job
        train_seconds = time.time() - self.started
        self.model.eval()
        held_out = evaluate_all(job, self.model, self.held, self.device)
        model_dir = os.path.join(job.output_dir, "model")
        metrics = {"model": job.model, "model_dir": model_dir, "steps": job.train.steps, "final_loss": self.running,
                   "train_examples": len(self.data), "held_out_examples": self.sizes, "held_out": held_out,
                   "data_seconds": self.data_seconds, "train_seconds": train_seconds,
                   "history": self.history}  # fmt: skip
        if self.ctx.accelerator.is_main_process:
            self.model.cpu().save_pretrained(model_dir)
            with open(os.path.join(job.output_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            log.info("train-reward: held-out %s; wrote %s", headline(metrics), job.output_dir)
        return metrics


def train_reward(job: TrainRewardJob) -> dict[str, Any]:
    """Run a :class:`TrainRewardJob`; returns the metrics (also written to ``output_dir/metrics.json``)."""
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    device = resolve_device(job.device, "device")
    # the model is placed on `device` itself (which may be a given GPU), not on the accelerator's default
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False)
    return run_training(job, lambda ctx: RewardModelTrainer(ctx, job, device), accelerator)


def headline(metrics: dict[str, Any]) -> str:
    """One line with the main held-out numbers."""
    parts = []
    for split, h in metrics["held_out"].items():
        if "pair_accuracy" in h:
            parts.append(f"{split}: pair accuracy {h['pair_accuracy']:.3f}")
        if "accuracy" in h:
            parts.append(f"{split}: accuracy {h['accuracy']:.3f}")
        for name, value in h.items():
            if isinstance(value, dict) and "accuracy" in value:
                parts.append(f"{split}: {name} accuracy {value['accuracy']:.3f}")
            elif isinstance(value, dict) and "pair_accuracy" in value:
                parts.append(f"{split}: {name} pair accuracy {value['pair_accuracy']:.3f}")
            elif isinstance(value, dict) and "pearson" in value:
                parts.append(f"{split}: {name} r {value['pearson']:.3f}")
    return ", ".join(parts)
