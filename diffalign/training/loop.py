"""The one training loop: ``run_training(cfg, trainer)`` runs any ``Trainer`` (``training.trainer``).

The trainer registers its trained modules on the ``TrainContext`` and implements ``collect`` and ``loss``; the
loop does the rest for every registered module: seeding, accelerate (one process, DDP or FSDP2, mixed
precision), the epochs with their train/eval modes, evaluation, logging (tensorboard, ``history.jsonl``, a
progress bar) and atomic checkpoints with exact resume, then exports. Checkpoints and exports hold whole
tensors, gathered from the shards, so they are the same files whichever way a run was distributed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from diffalign.config import save_config, to_yaml
from diffalign.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from diffalign.training.ema import EMA
from diffalign.training.sharding import full_parameters, full_tensor, load_full_parameters_, reshard
from diffalign.training.trainer import Exporter, TrainedModule, Trainer, check_finite

log = logging.getLogger("diffalign.train")

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
#: The checkpoint file (``modules/<name>.safetensors``) of ``TrainContext.states``; not a valid module name.
TRAINER_STATE = "trainer.state"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- context
class TrainContext:
    """What the loop hands a trainer: the job config ``cfg`` (any dataclass with ``seed`` and ``output_dir``), the
    accelerator, and the registry of trained modules.

    Attributes:
        modules: registered modules by name, in registration order.
        states: tensors a trainer keeps across epochs (e.g. per-prompt statistics), checkpointed with the run
            and restored in place on resume.
        generators: ``torch.Generator`` s whose state is checkpointed with the run (for a trainer that draws its
            data from one running stream rather than from per-epoch seeds).
    """

    def __init__(self, cfg: Any, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.seed: int = cfg.seed
        self.output_dir: str = cfg.output_dir
        if accelerator is None:
            # an explicit setting wins; without one, accelerate's (the launcher's config or environment) applies
            precision = getattr(getattr(cfg, "train", None), "mixed_precision", None)
            kwargs = {} if precision is None else {"mixed_precision": precision}
            tracker = getattr(getattr(cfg, "train", None), "report_to", "tensorboard")
            log_with = None if tracker == "none" else tracker
            accelerator = Accelerator(log_with=log_with, project_dir=cfg.output_dir, **kwargs)
        self.accelerator = accelerator
        seed_everything(cfg.seed)
        self.modules: dict[str, TrainedModule] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.states: dict[str, Tensor] = {}
        self.prepared = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def register(
        self,
        name: str,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        *,
        grad_clip: float | None = None,
        ema_decay: float = 0.0,
        ema_every: int = 1,
        export: Exporter | None = None,
        export_dir: str | None = None,
        export_whole: bool = False,
    ) -> TrainedModule:
        """Register a trained module: the parameters of ``module`` that ``optimizer`` holds, with its LR
        ``scheduler`` and an optional EMA (``ema_decay`` > 0, updated every ``ema_every`` optimizer steps).

        Several registrations may share ``module`` (LoRA adapters on one transformer): their parameters must be
        disjoint; they are marked as requiring gradients. ``export(directory, state)`` writes the module into
        ``output_dir/export_dir`` (default ``final/<name>``) at the end of the run, from whole CPU tensors: the
        trained parameters by name, or with ``export_whole`` the module's whole state dict. Call ``prepare`` once
        everything is registered.
        """
        if self.prepared:
            raise RuntimeError(f"cannot register {name!r}: the modules are already prepared")
        if not _NAME.match(name) or name in self.modules:
            raise ValueError(f"module name {name!r} must be new and made of letters, digits, '_' and '-'")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [n for n, p in module.named_parameters() if id(p) in held]
        if len(names) != len(held):
            raise ValueError(f"module {name!r}: the optimizer holds parameters that are not the module's")
        for other in self.modules.values():
            shared = set(other.parameters) & set(names) if other.module is module else set()
            if shared:
                raise ValueError(f"modules {other.name!r} and {name!r} train the same parameters, e.g. {min(shared)}")
        if not 0 <= ema_decay < 1 or ema_every < 1:
            raise ValueError(f"module {name!r}: need 0 <= ema_decay < 1 and ema_every >= 1")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.requires_grad_(True)
        trained = TrainedModule(
            name=name, module=module, parameters=names, optimizer=optimizer, scheduler=scheduler,
            grad_clip=grad_clip, ema_decay=ema_decay, ema_every=ema_every, export=export,
            export_dir=export_dir or os.path.join("final", name), export_whole=export_whole,
        )  # fmt: skip
        self.modules[name] = trained
        return trained

    def prepare(self) -> None:
        """Hand every registered module to accelerate (device placement, DDP / FSDP2 wrapping, mixed precision)
        with its optimizer, then build the EMAs (after sharding, so they are shards too).

        Registrations that share a module are prepared together (one FSDP2 sharding, one wrapper), except under
        DDP, where each gets a wrapper of its own over its own parameters, so that a phase that trains one of them
        synchronises exactly its gradients (route its forward passes through ``network``)."""
        if self.prepared:
            raise RuntimeError("the modules are already prepared")
        if not self.modules:
            raise ValueError("the trainer registered no trained module")
        acc = self.accelerator
        if acc.mixed_precision == "fp16" and len(self.modules) > 1:
            raise ValueError("fp16 loss scaling supports one optimizer; train several modules in bf16 or fp32")
        groups: dict[int, list[TrainedModule]] = {}
        for m in self.modules.values():
            groups.setdefault(id(m.module), []).append(m)
        # the LR schedulers stay as they are: they count this process's optimizer steps, while accelerate's
        # wrapper would step them once per process at every step
        for group in groups.values():
            if len(group) == 1 or acc.is_fsdp2 or acc.num_processes == 1:
                network, *optimizers = acc.prepare(group[0].module, *[m.optimizer for m in group])
                for m, optimizer in zip(group, optimizers, strict=True):
                    m.network, m.optimizer = network, optimizer
            else:
                for m in group:
                    m.network = self._wrap_alone(m)
                    m.optimizer = acc.prepare_optimizer(m.optimizer)
        for m in self.modules.values():
            if m.ema_decay > 0:
                m.ema = EMA(m.module, m.ema_decay, parameters=m.parameters)
        self.prepared = True

    def _wrap_alone(self, m: TrainedModule) -> nn.Module:
        """accelerate's wrapper of ``m.module`` over ``m``'s parameters only (DDP registers the parameters that
        require gradients when it is built)."""
        flags = {n: p.requires_grad for n, p in m.module.named_parameters()}
        own = set(m.parameters)
        for n, p in m.module.named_parameters():
            p.requires_grad_(n in own)
        try:
            return self.accelerator.prepare_model(m.module)
        finally:
            for n, p in m.module.named_parameters():
                p.requires_grad_(flags[n])

    def sync_context(self, sync: bool):
        """Gradient synchronisation only on the last backward of an accumulation (DDP's ``no_sync``)."""
        if sync or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for network in {id(m.network): m.network for m in self.modules.values()}.values():
            stack.enter_context(self.accelerator.no_sync(network))
        return stack

    def step(self, m: TrainedModule, epoch: int) -> float:
        """Clip ``m``'s gradients, step its optimizer and scheduler, update its EMA when due; returns the
        gradient norm before clipping."""
        clip = m.grad_clip if m.grad_clip is not None and m.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(m.trainable(), clip)
        grad_norm = full_tensor(torch.as_tensor(grad_norm))  # FSDP2 returns a replicated DTensor
        what = "gradient norm" if len(self.modules) == 1 else f"gradient norm of {m.name!r}"
        check_finite(torch.as_tensor(float(grad_norm)), what, epoch)
        m.optimizer.step()
        if m.scheduler is not None and not getattr(m.optimizer, "step_was_skipped", False):  # fp16 overflow
            m.scheduler.step()
        m.steps += 1
        if m.ema is not None and m.steps % m.ema_every == 0:
            m.ema.update()
        return float(grad_norm)

    def train_mode(self, training: bool) -> None:
        """Put every registered module in train (dropout, gradient checkpointing) or eval mode."""
        for module in {id(m.module): m.module for m in self.modules.values()}.values():
            module.train(training)

    def learning_rates(self) -> dict[str, float]:
        """``lr`` (``lr/<name>`` with several modules): each module's current learning rate."""
        rates = {}
        for m in self.modules.values():
            lr = m.scheduler.get_last_lr()[0] if m.scheduler is not None else m.optimizer.param_groups[0]["lr"]
            rates["lr" if len(self.modules) == 1 else f"lr/{m.name}"] = lr
        return rates

    # -------------------------------------------------------------------------------- trained-state (de)serialise
    def module_state(self, m: TrainedModule) -> dict[str, Tensor]:
        """``m``'s trained parameters as whole CPU tensors keyed by parameter name; a collective under FSDP
        (every process calls it)."""
        reshard(m.module)
        return full_parameters(m.module, m.parameters)

    def load_module_state(self, m: TrainedModule, state: dict[str, Tensor]) -> None:
        reshard(m.module)
        try:
            load_full_parameters_(m.module, state, m.parameters)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not fit this run's module {m.name!r}: {e}") from e

    def optimizer_state(self, m: TrainedModule) -> dict[str, Any]:
        """``m``'s optimizer state with whole tensors keyed by parameter name (torch's distributed-checkpoint
        format, the same with or without sharding); a collective under FSDP, complete on the main process."""
        reshard(m.network)
        return get_optimizer_state_dict(m.network, _unwrap(m.optimizer, "optimizer"),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # fmt: skip

    def load_optimizer_state(self, m: TrainedModule, state: dict[str, Any]) -> None:
        reshard(m.network)
        set_optimizer_state_dict(m.network, _unwrap(m.optimizer, "optimizer"), state,
                                 options=StateDictOptions(full_state_dict=True))  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the loop
def run_training(
    cfg: Any, trainer: Callable[[TrainContext], Trainer], accelerator: Accelerator | None = None
) -> dict[str, Any]:
    """Train under ``cfg`` (a job dataclass with ``seed`` and ``output_dir``; without ``accelerator``, also
    ``train.mixed_precision``) with the trainer that ``trainer(ctx)`` builds (a ``Trainer`` class, or any
    factory); resumes from the newest checkpoint in ``cfg.output_dir`` if there is one. Returns the trainer's
    summary (``Trainer.finish``)."""
    ctx = TrainContext(cfg, accelerator)
    acc = ctx.accelerator
    algorithm = trainer(ctx)
    if not ctx.prepared:
        raise RuntimeError(f"{type(algorithm).__name__} did not call ctx.prepare() after registering its modules")
    cadence = algorithm.cadence
    os.makedirs(cfg.output_dir, exist_ok=True)
    config_path = os.path.join(cfg.output_dir, "config.yaml")
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    history_path = os.path.join(cfg.output_dir, "history.jsonl")
    start = 0
    if list_checkpoints(ckpt_dir):
        check_resumable(cfg, config_path)
        start = _resume_newest_good(ctx, ckpt_dir)
        _truncate_history(ctx, history_path, start)
    if acc.is_main_process:
        save_config(cfg, config_path)
        # a resumed run drops the event records its previous life wrote after the checkpoint
        _start_trackers(acc, algorithm.name, cfg, start)
    log.info("%s: %d thread(s); results are reproducible for a fixed seed, thread count and library versions",
             algorithm.name, torch.get_num_threads())  # fmt: skip
    if start == 0:
        if acc.is_main_process and os.path.exists(history_path):
            os.remove(history_path)
        if cadence.evaluate_before:
            summary = algorithm.evaluate(0, "before")
            _append_history(ctx, history_path, {"epoch": 0, **{f"eval/{k}": v for k, v in summary.items()}})

    last = cadence.epochs
    bar = tqdm(range(start, last), initial=start, total=last, desc=algorithm.name,
               disable=not (acc.is_main_process and cadence.progress_bar))  # fmt: skip
    started = time.time()
    for epoch in bar:
        ctx.train_mode(False)
        batch = algorithm.collect(epoch)
        ctx.train_mode(True)
        metrics = {**batch.metrics, **algorithm.update(batch, epoch)}
        ctx.train_mode(False)
        done = epoch + 1
        metrics.update(ctx.learning_rates())
        metrics["epoch_seconds"] = (time.time() - started) / (done - start)
        record = {"epoch": done, **metrics}
        if _due(cadence.eval_every, done, last, cadence.evaluate_at_end):
            tag = "after" if done == last else f"epoch-{done:05d}"
            record.update({f"eval/{k}": v for k, v in algorithm.evaluate(done, tag).items()})
        if _due(cadence.log_every, done, last, True):
            acc.log(record, step=done)
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in cadence.progress if k in metrics})
        _append_history(ctx, history_path, record)
        if _due(cadence.checkpoint_every, done, last, cadence.checkpoint_at_end):
            _checkpoint(ctx, ckpt_dir, done, cadence.keep_checkpoints)

    for path in _export(ctx):
        log.info("exported %s", path)
    summary = algorithm.finish()
    acc.end_training()
    return summary


#: Config keys that may change when a run resumes (how long it runs and what it reports); any other change makes
#: the checkpoint a different run's, and resuming it is refused.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "output_dir", "train.epochs", "train.eval_every", "train.checkpoint_every", "train.log_every",
    "train.keep_checkpoints", "train.eval_images_per_prompt", "train.max_eval_prompts", "train.report_to",
    "eval_sets", "monitors",
)  # fmt: skip


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def check_resumable(cfg: Any, config_path: str) -> None:
    """Refuse to resume the checkpoints of ``config_path`` (the run's saved config) under a config that changes
    anything but :data:`RESUMABLE_CHANGES`, naming the changed keys; the saved config is left as it is."""
    if not os.path.isfile(config_path):
        return
    import yaml

    with open(config_path) as f:
        saved = _flatten(yaml.safe_load(f) or {})
    now = _flatten(yaml.safe_load(to_yaml(cfg)))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    refused = [k for k in changed if not any(k == r or k.startswith(f"{r}.") for r in RESUMABLE_CHANGES)]
    if refused:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused[:6])
        raise CheckpointError(
            f"{os.path.dirname(config_path)} holds checkpoints of a run with another config ({shown}); resume it "
            f"with its own config (only {', '.join(RESUMABLE_CHANGES)} may change) or choose a new output_dir"
        )
    for k in changed:
        log.info("resuming with %s changed: %r -> %r", k, saved.get(k), now.get(k))


def _resume_newest_good(ctx: TrainContext, directory: str) -> int:
    """Resume from the newest checkpoint that loads; a corrupt one is reported and the one before it tried."""
    checkpoints = list_checkpoints(directory)
    errors = []
    for path in reversed(checkpoints):
        try:
            start = _resume(ctx, path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            errors.append(str(e))
            continue
        if errors:
            log.warning("resumed from %s, the newest checkpoint that loads (%d newer one(s) skipped)", path,
                        len(errors))  # fmt: skip
        log.info("resumed from %s (epoch %d)", path, start)
        return start
    raise CheckpointError(f"no checkpoint in {directory} loads ({len(errors)} tried; newest: {errors[0]}); remove "
                          f"the folder to start the run over")  # fmt: skip


def _start_trackers(acc: Accelerator, name: str, cfg: Any, start: int) -> None:
    """Start the run's trackers with the resolved config: tensorboard gets it as text and drops the event records
    a previous life of the run wrote after the resumed checkpoint; wandb gets it as the run config (a resumed run
    continues the same wandb run, named by the output folder)."""
    if getattr(getattr(cfg, "train", None), "report_to", None) == "wandb":
        run_id = hashlib.sha1(os.path.abspath(cfg.output_dir).encode()).hexdigest()[:16]
        acc.init_trackers(name, config=yaml.safe_load(to_yaml(cfg)),
                          init_kwargs={"wandb": {"dir": cfg.output_dir, "id": run_id, "resume": "allow"}})  # fmt: skip
        return
    acc.init_trackers(name, init_kwargs={"tensorboard": {"purge_step": start + 1}})
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_text("config", f"```\n{to_yaml(cfg)}\n```", 0)


def _due(every: int, done: int, last: int, at_end: bool) -> bool:
    if done == last:
        return at_end
    return every > 0 and done % every == 0


def _append_history(ctx: TrainContext, path: str, record: dict[str, Any]) -> None:
    if ctx.accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_history(ctx: TrainContext, path: str, epoch: int) -> None:
    """Drop the records after ``epoch`` (written by a run that went on past its last checkpoint)."""
    if not ctx.accelerator.is_main_process or not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epoch]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)


def _checkpoint(ctx: TrainContext, directory: str, epoch: int, keep: int | None) -> None:
    ctx.accelerator.wait_for_everyone()
    # gathering whole tensors is a collective under FSDP: every process takes part, the main one writes
    modules: dict[str, dict[str, Tensor]] = {}
    optimizers: dict[str, dict[str, Any]] = {}
    for m in ctx.modules.values():
        modules[m.name] = ctx.module_state(m)
        if m.ema is not None:
            modules[f"{m.name}.ema"] = m.ema.state_dict()
        optimizers[m.name] = ctx.optimizer_state(m)
    if ctx.states:
        modules[TRAINER_STATE] = {k: v.detach().cpu() for k, v in ctx.states.items()}
    if ctx.accelerator.is_main_process:
        schedulers = {m.name: m.scheduler for m in ctx.modules.values() if m.scheduler is not None}
        extra = {"optimizer_steps": {m.name: m.steps for m in ctx.modules.values()}}
        save_checkpoint(directory, epoch, modules, optimizers, schedulers, generators=ctx.generators, extra=extra,
                        keep=keep)  # fmt: skip
    ctx.accelerator.wait_for_everyone()


def _unwrap(obj: Any, attr: str) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(obj, attr, obj)


def _resume(ctx: TrainContext, path: str) -> int:
    modules = list(ctx.modules.values())
    try:
        states = {m.name: load_file(os.path.join(path, "modules", f"{m.name}.safetensors")) for m in modules}
        emas = {m.name: load_file(os.path.join(path, "modules", f"{m.name}.ema.safetensors"))
                for m in modules if m.ema is not None}  # fmt: skip
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    for m in modules:
        ctx.load_module_state(m, states[m.name])
    if ctx.states:
        try:
            saved = load_file(os.path.join(path, "modules", f"{TRAINER_STATE}.safetensors"))
            for key, tensor in ctx.states.items():
                tensor.copy_(saved[key])
        except Exception as e:
            raise CheckpointError(f"cannot load the trainer state of {path!r}: {type(e).__name__}: {e}") from e
    schedulers = {m.name: m.scheduler for m in modules if m.scheduler is not None}
    state = load_checkpoint(path, {}, None, schedulers, generators=ctx.generators)
    try:
        for m in modules:
            optimizer = torch.load(os.path.join(path, "optimizers", f"{m.name}.pt"), weights_only=True)
            ctx.load_optimizer_state(m, optimizer)
        for m in modules:
            if m.ema is not None:
                m.ema.load_state_dict(emas[m.name])
    except (OSError, EOFError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    steps = state["extra"].get("optimizer_steps", {})
    for m in modules:
        m.steps = int(steps.get(m.name, 0))
    return int(state["step"])


def _export(ctx: TrainContext) -> list[str]:
    """Write every exportable module (with its EMA weights, if it has an EMA) into ``output_dir/export_dir``,
    parents before the folders nested in them; returns their paths."""
    ctx.accelerator.wait_for_everyone()
    paths = []
    exported = [m for m in ctx.modules.values() if m.export is not None]
    for m in sorted(exported, key=lambda m: os.path.normpath(m.export_dir).count(os.sep)):
        if m.ema is not None:
            m.ema.copy_to()
        # whole tensors (a collective under FSDP): the trained parameters, or the module's full state
        reshard(m.network)
        state = ctx.accelerator.get_state_dict(m.network) if m.export_whole else ctx.module_state(m)
        target = os.path.join(ctx.output_dir, m.export_dir)
        if ctx.accelerator.is_main_process:
            tmp = f"{target}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            m.export(tmp, state)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        ctx.accelerator.wait_for_everyone()
        paths.append(target)
    return paths
