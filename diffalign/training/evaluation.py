"""Periodic evaluation for the training loop, and the run's curve plot.

Evaluation samples the held-out prompts with the EMA weights (ODE, ``cfg.sampling``), and reports: the mean of
every optimised reward component, every monitor (rewards logged but never optimised: the reward-hacking watch),
the within-prompt diversity (mean pairwise RMS distance between the images of one prompt, in [0, 1] pixel
units: a collapse toward one image per prompt drives it to 0; reported with two or more images per prompt), and
for world prompts (a ``world:`` split, or a prompt file in the world's grammar) the evaluator's per-category
accuracy. It writes ``grids/<tag>.png`` and ``eval_<tag>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from torch import Tensor

from diffalign.images import save_grid
from diffalign.sampling.generate import generate
from diffalign.world.prompts import is_world_prompt


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


class Evaluator:
    """Every process generates the same evaluation images (a sharded model needs all of them in each forward
    pass, and under DDP the others would only wait); the main process scores them and writes the results."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        prompts = ctx.eval_prompts
        if cfg.train.max_eval_prompts is not None:
            prompts = prompts[: cfg.train.max_eval_prompts]
        self.prompts = [p for p in prompts for _ in range(cfg.train.eval_images_per_prompt)]
        # a world split, or a prompt file whose every line is a world prompt: judged by the world evaluator
        self.is_world = all(is_world_prompt(p) for p in prompts)

    def run(self, epoch: int, tag: str) -> dict[str, Any]:
        ctx = self.ctx
        acc = ctx.accelerator
        summary: dict[str, Any] = {}
        flow = ctx.flow
        swap = ctx.ema.swapped_in() if ctx.ema is not None else contextlib.nullcontext()
        network = flow.network
        flow.use_network(None)
        try:
            with swap, torch.no_grad():
                images = generate(flow, self.prompts, ctx.cfg.sampling, seed=ctx.seed + 12345, progress=False)
        finally:
            flow.use_network(network)
        if acc.is_main_process:
            summary = self._score(images, epoch)
            os.makedirs(os.path.join(ctx.cfg.output_dir, "grids"), exist_ok=True)
            captions = [p.removeprefix("a photo of ") for p in self.prompts]
            if self.is_world:
                captions = [("OK " if ok else "NO ") + c for ok, c in zip(self._correct, captions, strict=True)]
            save_grid(images, os.path.join(ctx.cfg.output_dir, "grids", f"{tag}.png"), captions=captions,
                      ncols=4 * ctx.cfg.train.eval_images_per_prompt, min_tile=96)  # fmt: skip
            with open(os.path.join(ctx.cfg.output_dir, f"eval_{tag}.json"), "w") as f:
                json.dump({"epoch": epoch, **summary}, f, indent=1)
        acc.wait_for_everyone()
        return summary

    def _score(self, images: Tensor, epoch: int) -> dict[str, Any]:
        ctx = self.ctx
        device = ctx.flow.device
        summary: dict[str, Any] = {}
        batches = [images[i : i + 64].to(device) for i in range(0, len(images), 64)]
        prompt_batches = [self.prompts[i : i + 64] for i in range(0, len(images), 64)]
        for label, rewards in (("reward", ctx.rewards), ("monitor", ctx.monitors)):
            if rewards is None:
                continue
            outs = [rewards(b, p) for b, p in zip(batches, prompt_batches, strict=True)]
            for name in rewards.rewards:
                values = torch.cat([o.components[name] for o in outs])
                summary[f"{label}/{name}"] = float(values.nanmean())
            if label == "reward":
                summary["reward/total"] = float(torch.cat([o.total for o in outs]).nanmean())
        if self.ctx.cfg.train.eval_images_per_prompt >= 2:  # undefined with one image per prompt
            summary["diversity"] = diversity(images, self.prompts)
        self._correct = []
        if self.is_world:
            from diffalign.world.evaluator import evaluate_batch, summarize

            verdicts = evaluate_batch(images.numpy(), self.prompts)
            self._correct = [v.correct for v in verdicts]
            world = summarize(self.prompts, verdicts)
            summary["world/overall"] = world["overall"]
            summary["world/image_accuracy"] = world["image_accuracy"]
            for cat, row in world["per_category"].items():
                summary[f"world/{cat}"] = row["accuracy"]
        return summary


def plot_history(history_path: str, out_path: str) -> None:
    """Plot the training reward and the evaluation numbers of ``history.jsonl`` into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        ax.plot([r["epoch"] for r in train], [r["reward_mean"] for r in train], label="rollout reward (mean)")
    ax.set_xlabel("epoch")
    ax.set_title("training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and not k.startswith("eval/world/")}
                  | {"eval/world/overall"} & {k for r in evals for k in r})  # fmt: skip
    for key in keys:
        points = [(r["epoch"], r[key]) for r in evals if key in r and r[key] == r[key]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("eval/"))
    ax.set_xlabel("epoch")
    ax.set_title("held-out evaluation (EMA weights)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
