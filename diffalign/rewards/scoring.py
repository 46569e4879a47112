"""``diffalign score``: score a folder of images with one or more rewards.

Prompts come from a text file (one per image, in sorted filename order) or from an ``index.jsonl`` as written by
``diffalign sample`` (rows ``{"file": ..., "prompt": ...}``; used automatically when the folder has one). The
command prints a table (per reward: count, mean, std, min, max over the images it applies to) and writes
``scores.csv`` and ``scores.json`` (one row per image: file, prompt, every reward's raw score and the weighted
total) plus the resolved ``config.yaml``. An image that cannot be read is skipped with a warning naming it; the
skipped files are listed at the end and in ``scores.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from diffalign.config import ConfigError, check_device, resolve_device, save_config
from diffalign.images import from_pil
from diffalign.rewards import RewardConfig, build_reward_set
from diffalign.rewards.data import IMAGE_EXTENSIONS, DataError, _read_jsonl

log = logging.getLogger("diffalign.score")


@dataclass(kw_only=True)
class ScoreJob:
    """``diffalign score``: the rewards to compute and how.

    Attributes:
        rewards: the rewards (registry ``name``, ``weight`` for the total, constructor ``args``, optional ``label``).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per reward call.
    """

    kind: Literal["score"] = "score"
    rewards: list[RewardConfig] = field(default_factory=list)
    device: str = "auto"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ConfigError("config key 'rewards': list at least one reward (e.g. - name: jpeg_compressibility)")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'batch_size': must be >= 1, got {self.batch_size}")
        check_device(self.device, "device")


def list_images(directory: str) -> list[str]:
    """Image file names in ``directory`` (not recursive), sorted."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image folder {directory!r} does not exist")
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"image folder {directory!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_index(path: str) -> list[tuple[str, str]]:
    """``(file, prompt)`` rows of an ``index.jsonl``."""
    rows = []
    for lineno, row in enumerate(_read_jsonl(path), 1):
        if "file" not in row or "prompt" not in row:
            raise DataError(f"{path}: row {lineno} needs 'file' and 'prompt'")
        rows.append((str(row["file"]), str(row["prompt"])))
    if not rows:
        raise DataError(f"prompt index {path!r} is empty")
    return rows


def pair_images_with_prompts(images_dir: str, prompts: str | None) -> list[tuple[str, str]]:
    """``(image path, prompt)`` for every image to score (see the module docstring)."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir!r} does not exist")
    if prompts is None:
        index = os.path.join(images_dir, "index.jsonl")
        if not os.path.isfile(index):
            raise FileNotFoundError(
                f"no prompts for {images_dir!r}: pass --prompts FILE (one prompt per image, in sorted filename "
                "order) or an index.jsonl, or put an index.jsonl in the folder"
            )
        prompts = index
    if prompts.endswith(".jsonl"):
        out = []
        for file, prompt in read_index(prompts):
            path = os.path.join(images_dir, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{prompts} lists {file!r}, which is not in {images_dir!r}")
            out.append((path, prompt))
        return out
    files = list_images(images_dir)
    if not os.path.isfile(prompts):
        raise FileNotFoundError(f"prompt file {prompts!r} does not exist")
    with open(prompts) as f:
        lines = [line.strip() for line in f if line.strip()]
    if len(lines) != len(files):
        raise DataError(f"{prompts} has {len(lines)} prompts but {images_dir!r} holds {len(files)} images; "
                         "give one prompt per image, in sorted filename order")  # fmt: skip
    return [(os.path.join(images_dir, f), p) for f, p in zip(files, lines, strict=True)]


def _load(path: str) -> torch.Tensor:
    """``(1, 3, H, W)`` in [0, 1]; ``OSError`` (PIL's errors for unreadable, truncated or broken files included)."""
    try:
        with Image.open(path) as im:
            return from_pil([im.convert("RGB")])
    except (SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's "broken PNG file" and friends
        raise OSError(str(e)) from e


def _stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    t = torch.tensor(finite, dtype=torch.float64)
    std = float(t.std(unbiased=False))
    return {"n": len(finite), "mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max())}


def _nan_to_none(value: Any) -> Any:
    """NaN (an abstaining reward) -> None, so that the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """The per-reward summary as an aligned text table."""
    width = max(len("reward"), *(len(k) for k in summary))
    lines = [f"{'reward':<{width}} {'n':>6} {'mean':>12} {'std':>12} {'min':>12} {'max':>12}"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}} {s['n']:>6d} {s['mean']:>12.5g} {s['std']:>12.5g} {s['min']:>12.5g} "
                     f"{s['max']:>12.5g}")  # fmt: skip
    return "\n".join(lines)


def run_score(job: ScoreJob, images_dir: str, prompts: str | None, out_dir: str) -> dict[str, Any]:
    """Score every image in ``images_dir``; print the table, write ``scores.csv``/``scores.json``/``config.yaml``
    in ``out_dir``. Returns ``{"rows": [...], "summary": {reward: stats}, "skipped": [{"file", "error"}, ...]}``."""
    items = pair_images_with_prompts(images_dir, prompts)
    device = resolve_device(job.device, "device")
    reward_set = build_reward_set(job.rewards).to(device)
    labels = list(reward_set.rewards)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    batch: list[tuple[str, str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        images = torch.cat([b[2] for b in batch]).to(device)
        out = reward_set(images, [b[1] for b in batch])
        for i, (path, prompt, _) in enumerate(batch):
            row = {"file": os.path.basename(path), "prompt": prompt}
            row.update({name: float(out.components[name][i]) for name in labels})
            row["total"] = float(out.total[i])
            rows.append(row)
        batch.clear()

    for path, prompt in items:
        try:
            image = _load(path)
        except OSError as e:
            log.warning("skipping %s: cannot read the image (%s)", path, e)
            skipped.append({"file": os.path.basename(path), "error": str(e)})
            continue
        if batch and (image.shape != batch[0][2].shape or len(batch) >= job.batch_size):
            flush()
        batch.append((path, prompt, image))
    flush()
    if not rows:
        raise DataError(f"none of the {len(items)} images in {images_dir!r} could be read")
    summary = {name: _stats([r[name] for r in rows]) for name in [*labels, "total"]}
    os.makedirs(out_dir, exist_ok=True)
    save_config(job, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "prompt", *labels, "total"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        payload = {"images_dir": images_dir, "weights": reward_set.weights, "summary": summary, "rows": rows,
                   "skipped": skipped}  # fmt: skip
        json.dump(_nan_to_none(payload), f, indent=1)
    sys.stdout.write(format_table(summary) + "\n")
    log.info("scored %d images with %s; wrote scores.csv and scores.json to %s", len(rows), labels, out_dir)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(s["file"] for s in skipped))
    return {"rows": rows, "summary": summary, "skipped": skipped}
