"""Periodic evaluation for the training loop, and the run's curve plot.

A run evaluates one or more named prompt sets (``eval_sets``: e.g. its training prompts and the world's two
held-out splits). Each set is sampled with the EMA weights (ODE, ``cfg.sampling``) and reported under its name:
the mean of every optimised reward component and every monitor (rewards logged but never optimised: the
reward-hacking watch), each with a 95% interval over prompts (``prompt_mean_interval``), the within-prompt
diversity (mean pairwise RMS distance between the images of one prompt, in [0, 1] pixel units: a collapse toward
one image per prompt drives it to 0; reported with two or more images per prompt), and for world prompts (a
``world:`` split, or a prompt file in the world's grammar) the evaluator's
strict accuracy overall (the mean over categories) and per category, image-level accuracy, the graded and partial
credit, with 95% intervals (``diffalign.world.evaluator.summarize``). It writes ``grids/<tag>_<set>.png`` (world
images marked OK/NO in green/red), ``eval_<tag>.json`` with every set's numbers, and the grids to the trackers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.images import make_grid, save_grid
from diffalign.sampling.generate import generate
from diffalign.world.evaluator import prompt_mean_interval
from diffalign.world.prompts import as_spec, is_world_prompt

OK_COLOR, NO_COLOR = (0, 120, 0), (180, 0, 0)


def diversity(images: Tensor, prompts: list[str]) -> float:
    """Mean over prompts with >= 2 images of the mean pairwise RMS distance between their images."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    values = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        flat = images[rows].flatten(1).float()
        d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
        k = len(rows)
        values.append(float(d.sum() / (k * (k - 1))))
    return sum(values) / len(values) if values else float("nan")


def select_prompts(prompts: Sequence[str], limit: int | None) -> list[str]:
    """At most ``limit`` distinct prompts of ``prompts``: for world prompts taken round-robin over the categories
    (so a cap keeps every category), else evenly spaced; all of them when ``limit`` is None."""
    unique = list(dict.fromkeys(prompts))
    if limit is None or limit >= len(unique):
        return unique
    if all(is_world_prompt(p) for p in unique):
        by_category: dict[str, list[str]] = {}
        for p in unique:
            by_category.setdefault(as_spec(p).category, []).append(p)
        queues = list(by_category.values())
        picked: list[str] = []
        while len(picked) < limit:
            for queue in queues:
                if queue and len(picked) < limit:
                    picked.append(queue.pop(0))
        return [p for p in unique if p in set(picked)]
    return [unique[int(i)] for i in np.linspace(0, len(unique) - 1, limit).round()]


class EvalPrompts:
    """One named evaluation set: its prompts, each repeated ``images_per_prompt`` times (``prompts``)."""

    def __init__(self, name: str, prompts: Sequence[str], images_per_prompt: int) -> None:
        self.name = name
        self.distinct = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.prompts = [p for p in self.distinct for _ in range(images_per_prompt)]
        # a world split, or a prompt file whose every line is a world prompt: judged by the world evaluator
        self.is_world = all(is_world_prompt(p) for p in self.distinct)


class Evaluator:
    """Every process generates the same evaluation images (a sharded model needs all of them in each forward
    pass, and under DDP the others would only wait); the main process scores them and writes the results.

    ``ctx`` provides ``cfg``, ``accelerator``, ``flow``, ``ema``, ``rewards``, ``monitors``, ``seed`` and
    ``eval_sets`` (name -> ``EvalPrompts``)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def run(self, epoch: int, tag: str) -> dict[str, Any]:
        """Evaluate every set at ``epoch``; ``tag`` names the files (``after`` is also written as the epoch's)."""
        ctx = self.ctx
        acc = ctx.accelerator
        summary: dict[str, Any] = {}
        for index, evalset in enumerate(ctx.eval_sets.values()):
            images = self._generate(evalset, index)
            if acc.is_main_process:
                values, correct = self._score(evalset, images)
                summary.update({f"{evalset.name}/{k}": v for k, v in values.items()})
                self._grid(evalset, images, correct, epoch, tag)
        if acc.is_main_process:
            for name in {tag, f"epoch-{epoch:05d}"}:
                with open(os.path.join(ctx.cfg.output_dir, f"eval_{name}.json"), "w") as f:
                    json.dump({"epoch": epoch, **summary}, f, indent=1)
        acc.wait_for_everyone()
        return summary

    def _generate(self, evalset: EvalPrompts, index: int) -> Tensor:
        ctx = self.ctx
        flow = ctx.flow
        swap = ctx.ema.swapped_in() if ctx.ema is not None else contextlib.nullcontext()
        network = flow.network
        flow.use_network(None)
        batch = 32
        bar = tqdm(total=len(evalset.prompts), desc=f"eval {evalset.name}", leave=False, unit="img",
                   disable=not ctx.accelerator.is_main_process)  # fmt: skip
        chunks = []
        try:
            with swap, torch.no_grad():
                for start in range(0, len(evalset.prompts), batch):
                    chunk = evalset.prompts[start : start + batch]
                    chunks.append(generate(flow, chunk, ctx.cfg.sampling, seed=ctx.seed + 12345 + 1000 * index,
                                           batch_size=batch, progress=False, first_index=start))  # fmt: skip
                    bar.update(len(chunk))
        finally:
            flow.use_network(network)
            bar.close()
        return torch.cat(chunks)

    def _score(self, evalset: EvalPrompts, images: Tensor) -> tuple[dict[str, Any], list[bool] | None]:
        ctx = self.ctx
        device = ctx.flow.device
        summary: dict[str, Any] = {}
        batches = [images[i : i + 64].to(device) for i in range(0, len(images), 64)]
        prompt_batches = [evalset.prompts[i : i + 64] for i in range(0, len(images), 64)]
        for label, rewards in (("reward", ctx.rewards), ("monitor", ctx.monitors)):
            if rewards is None:
                continue
            outs = [rewards(b, p) for b, p in zip(batches, prompt_batches, strict=True)]
            for name in rewards.rewards:
                values = torch.cat([o.components[name] for o in outs])
                summary[f"{label}/{name}"] = float(values.nanmean())
                lo, hi = prompt_mean_interval(values, evalset.prompts)
                summary[f"{label}/{name}_ci_lo"], summary[f"{label}/{name}_ci_hi"] = lo, hi
            if label == "reward":
                summary["reward/total"] = float(torch.cat([o.total for o in outs]).nanmean())
        if evalset.images_per_prompt >= 2:  # undefined with one image per prompt
            summary["diversity"] = diversity(images, evalset.prompts)
        if not evalset.is_world:
            return summary, None
        from diffalign.world.evaluator import evaluate_batch, summarize

        verdicts = evaluate_batch(images.numpy(), evalset.prompts)
        world = summarize(evalset.prompts, verdicts)
        summary["world/overall"] = world["overall"]
        summary["world/overall_ci_lo"], summary["world/overall_ci_hi"] = world["overall_ci95"]
        summary["world/image_accuracy"] = world["image_accuracy"]
        summary["world/image_accuracy_ci_lo"], summary["world/image_accuracy_ci_hi"] = world["image_accuracy_ci95"]
        summary["world/graded"] = world["mean_graded"]
        summary["world/partial"] = world["mean_score"]
        summary["world/partial_ci_lo"], summary["world/partial_ci_hi"] = world["mean_score_ci95"]
        for cat, row in world["per_category"].items():
            summary[f"world/{cat}"] = row["accuracy"]
        return summary, [v.correct for v in verdicts]

    def _grid(self, evalset: EvalPrompts, images: Tensor, correct: list[bool] | None, epoch: int, tag: str) -> None:
        ctx = self.ctx
        captions = [p.removeprefix("a photo of ") for p in evalset.prompts]
        colors = None
        if correct is not None:
            captions = [("OK " if ok else "NO ") + c for ok, c in zip(correct, captions, strict=True)]
            colors = [OK_COLOR if ok else NO_COLOR for ok in correct]
        kwargs = {"captions": captions, "caption_colors": colors, "min_tile": 96,
                  "ncols": max(4, min(16, 4 * evalset.images_per_prompt))}  # fmt: skip
        folder = os.path.join(ctx.cfg.output_dir, "grids")
        os.makedirs(folder, exist_ok=True)
        for name in {tag, f"epoch-{epoch:05d}"}:
            save_grid(images, os.path.join(folder, f"{name}_{evalset.name}.png"), **kwargs)
        trackers = getattr(ctx.accelerator, "trackers", [])
        if trackers:
            grid = np.asarray(make_grid(images, **kwargs))
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"eval/{evalset.name}", grid, epoch, dataformats="HWC")
            else:
                tracker.log_images({f"eval/{evalset.name}": [grid]}, step=epoch)


def plot_history(history_path: str, out_path: str) -> None:
    """Plot the training reward and every evaluation set's numbers of ``history.jsonl`` into one PNG: the rollout
    reward, then per set its strict accuracy (with the 95% interval as error bars) and its reward and monitors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    sets = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("eval/") and k.count("/") >= 2})
    fig, axes = plt.subplots(1, 1 + max(1, len(sets)), figsize=(5.5 * (1 + max(1, len(sets))), 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["epoch"] for r in train], [r["reward_mean"] for r in train], label="rollout reward (mean)")
    ax.set_xlabel("epoch")
    ax.set_title("training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    for ax, name in zip(axes[0, 1:], sets, strict=False):
        prefix = f"eval/{name}/"
        strict = [(r["epoch"], r[prefix + "world/overall"], r[prefix + "world/overall_ci_lo"],
                   r[prefix + "world/overall_ci_hi"]) for r in evals if prefix + "world/overall" in r]  # fmt: skip
        if strict:
            x, y, lo, hi = (np.array(v) for v in zip(*strict, strict=True))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label="strict accuracy (95% CI)")
        keys = sorted({k for r in evals for k in r if k.startswith(prefix) and "/world/" not in k and "_ci_" not in k})
        for key in keys:
            points = [(r["epoch"], r[key]) for r in evals if key in r and r[key] == r[key]]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=key.removeprefix(prefix))
        ax.set_xlabel("epoch")
        ax.set_title(f"evaluation: {name} (EMA weights)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
