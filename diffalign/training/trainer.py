"""The trainer seam: what an algorithm implements (``Trainer``) on top of the shared loop (``training.loop``).

A trainer, in its ``__init__(ctx)``:

- builds its models and registers each trained module with ``ctx.register(name, module, optimizer, scheduler,
  ema_decay=..., export=...)`` (a generator LoRA and a fake-score LoRA on one transformer are two registrations
  of that transformer, with disjoint parameters), then calls ``ctx.prepare()`` (accelerate wrapping, EMAs);
- says how often the loop evaluates, logs and checkpoints (``self.cadence``).

Per epoch the loop calls ``collect(epoch) -> Batch`` (the trainer's own dataclass, e.g. rollouts with rewards, or
clean latents with noise), then ``update(batch, epoch)``. The default ``update`` splits the batch into optimizer
steps of micro-batches (``split``), sums the ``loss_*`` terms of ``loss(batch, micro)`` into the objective,
accumulates it over the step's micro-batches, clips and steps every registered optimizer (with its scheduler
and EMA). A trainer that alternates phases overrides ``update`` and calls ``optimize`` once per phase with the
modules that phase trains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from diffalign.config import ConfigError
from diffalign.training.ema import EMA

if TYPE_CHECKING:
    from diffalign.training.loop import TrainContext

Exporter = Callable[[str, dict[str, Tensor]], None]


# ----------------------------------------------------------------------------------------------------- helpers
def seeded(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose seed is a deterministic function of the integer ``keys``."""
    seed = int(np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys]).integers(2**62))
    return torch.Generator(device).manual_seed(seed)


def check_finite(value: Tensor, what: str, epoch: int) -> None:
    """Raise (never train on) NaN/inf, naming what and when."""
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()[:8]
        raise FloatingPointError(f"{what} is not finite at epoch {epoch} (entries {bad}); stopping before the update")


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


# ----------------------------------------------------------------------------------------------------- types
@dataclass(kw_only=True)
class Batch:
    """Base of a trainer's batch type: one epoch's data on this process, with the trainer's own fields.

    Attributes:
        metrics: scalars that ``collect`` reports for the epoch (already reduced over processes), logged by the
            loop beside the update's.
    """

    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cadence:
    """How often the loop evaluates, logs and checkpoints, in epochs (one epoch = one collect + one update).

    Attributes:
        epochs: epochs of the run.
        eval_every, log_every, checkpoint_every: periods (0: never, apart from the end of the run).
        keep_checkpoints: newest checkpoints kept (None: all).
        evaluate_before: evaluate once before the first epoch (tag ``before``) when the run starts fresh.
        evaluate_at_end, checkpoint_at_end: also evaluate (tag ``after``) / checkpoint after the last epoch.
        progress_bar: show a progress bar (on the main process); ``progress``: metric keys shown in it.
    """

    epochs: int
    eval_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 2
    evaluate_before: bool = False
    evaluate_at_end: bool = True
    checkpoint_at_end: bool = True
    progress_bar: bool = True
    progress: tuple[str, ...] = ()


@dataclass(eq=False)
class TrainedModule:
    """One registered trained module (see ``TrainContext.register``).

    Attributes:
        name: its name in logs, checkpoints (``modules/<name>.safetensors``) and exports.
        module: the ``nn.Module`` holding its parameters (several registrations may share one: LoRA adapters
            on one transformer).
        parameters: names (in ``module``) of the trained parameters, in ``module.named_parameters()`` order.
        optimizer: its optimizer (accelerate's wrapper after ``prepare``); ``scheduler``: its LR scheduler, stepped
            once per optimizer step (None: a constant learning rate).
        grad_clip: max gradient norm (None: not clipped; the norm is still logged).
        ema_decay, ema_every: EMA of the parameters, updated every ``ema_every`` of its optimizer steps
            (``ema_decay = 0``: none).
        export: writes the module into a folder from its whole tensors (None: not exported); ``export_dir``:
            that folder, relative to the run folder; ``export_whole``: hand it the module's whole state
            (a full transformer) instead of the trained parameters (a LoRA).
        network: what runs the module after ``prepare`` (its DDP / FSDP wrapper, or the module itself).
        ema: its EMA after ``prepare`` (None without one).
        steps: optimizer steps taken.
    """

    name: str
    module: nn.Module
    parameters: list[str]
    optimizer: Any
    scheduler: Any | None = None
    grad_clip: float | None = None
    ema_decay: float = 0.0
    ema_every: int = 1
    export: Exporter | None = None
    export_dir: str | None = None
    export_whole: bool = False
    network: nn.Module | None = None
    ema: EMA | None = None
    steps: int = 0

    def trainable(self) -> list[nn.Parameter]:
        """The trained parameters as the module holds them now (sharded ones after FSDP2 ``prepare``)."""
        params = dict(self.module.named_parameters())
        return [params[n] for n in self.parameters]


# ----------------------------------------------------------------------------------------------------- trainer
class Trainer(ABC):
    """Algorithm hooks over the shared loop (see the module docstring).

    Attributes:
        name: the run's tracker and progress-bar name.
        cadence: set in ``__init__``; how often the loop evaluates, logs and checkpoints.
    """

    name: ClassVar[str] = "train"
    cadence: Cadence

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def collect(self, epoch: int) -> Batch:
        """This process's data for ``epoch`` (rollouts, samples, a data batch), with every random draw a function
        of (seed, epoch, process) so that a resumed run collects the same. Runs with the modules in eval mode."""

    def split(self, batch: Batch, epoch: int) -> list[list[Any]]:
        """The epoch's optimizer steps, each a list of micro-batches (one forward and backward each), as keys
        that ``loss`` understands. Default: one step of one micro-batch, the whole batch (key ``None``)."""
        return [[None]]

    @abstractmethod
    def loss(self, batch: Batch, micro: Any) -> dict[str, Tensor]:
        """Named terms of micro-batch ``micro`` of ``batch``, run under autocast with the modules in train mode.

        The ``loss_*`` terms (0-d tensors) are summed into the objective that is back-propagated; over the
        micro-batches of one optimizer step the objectives accumulate, so each is that micro-batch's share of
        the step's loss (e.g. weighted by its fraction of the step's samples). Other terms are diagnostics: any
        shape, averaged over their entries and then over the epoch's micro-batches, and logged.
        """

    def update(self, batch: Batch, epoch: int) -> dict[str, float]:
        """One epoch of optimisation: every registered module through ``optimize``. Returns the diagnostics."""
        return self.optimize(batch, epoch, self.split(batch, epoch), self.loss, list(self.ctx.modules))

    def optimize(
        self,
        batch: Batch,
        epoch: int,
        steps: Sequence[Sequence[Any]],
        loss: Callable[[Batch, Any], dict[str, Tensor]],
        modules: Sequence[str],
    ) -> dict[str, float]:
        """Take the optimizer ``steps`` of the registered ``modules`` (by name): per step, zero their gradients,
        back-propagate the terms of ``loss(batch, micro)`` for every micro-batch (``backward``: their summed
        ``loss_*`` terms; gradients are synchronised over processes where ``micro_sync`` says, the last one), then
        clip, step the optimizer and scheduler and update the EMA of each. A NaN/inf objective raises before its
        backward pass, a NaN/inf gradient norm before the optimizer step.

        Returns the diagnostics averaged over the micro-batches, each ``loss_*`` term as the mean over steps of
        its per-step sum (averaged over processes), and ``grad_norm`` (``grad_norm/<name>`` with several
        registered modules).
        """
        ctx = self.ctx
        trained = [ctx.modules[name] for name in modules]
        several = len(ctx.modules) > 1
        sums: dict[str, float] = {}
        losses: dict[str, float] = {}
        count = 0
        for step in steps:
            for m in trained:
                m.optimizer.zero_grad(set_to_none=True)
            for k, micro in enumerate(step):
                with ctx.sync_context(self.micro_sync(k, len(step))), ctx.accelerator.autocast():
                    terms = loss(batch, micro)
                self.backward(terms, epoch)
                for key, value in terms.items():
                    into = losses if key.startswith("loss_") else sums
                    into[key] = into.get(key, 0.0) + float(value.detach().float().mean())
                count += 1
            for m in trained:
                key = f"grad_norm/{m.name}" if several else "grad_norm"
                sums[key] = sums.get(key, 0.0) + ctx.step(m, epoch) * len(step)
        out = {k: v / max(count, 1) for k, v in sums.items()}
        if losses:
            keys = sorted(losses)
            means = torch.tensor([losses[k] / len(steps) for k in keys], dtype=torch.float64, device=ctx.device)
            means = ctx.accelerator.reduce(means, reduction="mean")
            out.update({k: float(v) for k, v in zip(keys, means, strict=True)})
        return out

    def micro_sync(self, index: int, micros: int) -> bool:
        """Called before the forward pass of micro-batch ``index`` of an optimizer step of ``micros``: whether its
        backward synchronises the gradients over processes. Default: only the step's last one. A trainer that
        forms some micro-steps' gradients itself (the reward balancer's solves) decides per micro-step here."""
        return index == micros - 1

    def backward(self, terms: dict[str, Tensor], epoch: int) -> None:
        """Back-propagate one micro-batch's ``terms``: by default the sum of its ``loss_*`` terms, refused when it is
        not finite. A trainer that forms the gradient otherwise (the reward balancer) overrides it; it may remove
        from ``terms`` what it consumed, and what is left is logged."""
        objective = _objective(terms)
        check_finite(objective.detach(), "training loss", epoch)
        self.ctx.accelerator.backward(objective)

    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        """Evaluate after ``epoch`` epochs (``tag``: ``before``, ``epoch-00010``, ``after``); called on every
        process; returns scalars to log (as ``eval/<key>``). Default: nothing."""
        return {}

    def finish(self) -> dict[str, Any]:
        """Called on every process after the last epoch and the export; returns the run's summary."""
        return {}


def _objective(terms: dict[str, Tensor]) -> Tensor:
    """The sum of the ``loss_*`` terms, in their order."""
    parts = [value for key, value in terms.items() if key.startswith("loss_")]
    if not parts:
        raise ValueError(f"the trainer's loss returned no 'loss_*' term (got {sorted(terms)})")
    for key, value in terms.items():
        if key.startswith("loss_") and value.ndim != 0:
            raise ValueError(f"loss term {key!r} must be a 0-d tensor, got shape {tuple(value.shape)}")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
