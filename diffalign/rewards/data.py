"""Reward-model training data: pairwise preferences and per-image labels, from files or synthesised in the world.

Two containers:

* :class:`PairData`: ``N`` prompts with a ``chosen`` and a ``rejected`` image each (Bradley-Terry training, pair
  accuracy);
* :class:`LabeledData`: ``N`` images (with prompts) and named float targets, NaN where a target is unknown
  (ratings, artifact labels, multi-aspect targets).

Images are stored as uint8 ``(N, 3, S, S)`` tensors (all resized to one square size ``S`` when read from files).

**Files** (paths inside a JSONL file are relative to the file's folder):

* pairs: ``{"prompt": str, "chosen": path, "rejected": path}`` per line (optional ``"kind"``);
* ratings: ``{"prompt": str, "image": path, "rating": float}``;
* artifact labels: ``{"image": path, "artifact": bool}`` (or a folder with ``clean/`` and ``artifact/``
  subfolders of images);
* multi-aspect: ``{"prompt": str, "image": path, "<aspect>": float in [0, 1], ...}`` (missing aspects allowed).

**The embedded world** (:func:`world_pairs`, :func:`world_labeled`): prompts from the world's train or test split
(a category drawn uniformly, then a prompt of it), scenes from its sampler and renderer. A prompt is *violated*
by rendering a scene sampled for a minimally perturbed prompt (another shape, colour or count, the opposite
relation, swapped colours, a missing object); the world evaluator decides which image is preferred (pairs with
equal scores are redrawn), so preference follows the evaluator. Quality preferences pair a clean render with the
same render corrupted by a reward-hacking artifact (:mod:`diffalign.rewards.artifacts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.rewards.artifacts import ARTIFACT_KINDS, add_random_artifacts, mild_variation
from diffalign.world.evaluator import evaluate
from diffalign.world.prompts import PromptSpec, prompts_by_category, split_prompts
from diffalign.world.render import render, sample_scene
from diffalign.world.scene import COLOR_NAMES, MAX_COUNT, SHAPES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A data file or folder that cannot be used (unreadable, malformed, empty, too small); the message names it."""


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class PairData:
    """Pairwise preferences: ``chosen[i]`` is preferred over ``rejected[i]`` for ``prompts[i]``.

    Attributes:
        prompts: ``N`` prompts.
        chosen, rejected: uint8 ``(N, 3, S, S)``.
        kinds: ``N`` pair types (e.g. ``"alignment:color"``, ``"quality:blur"``; ``"pair"`` from files).
    """

    prompts: list[str]
    chosen: Tensor
    rejected: Tensor
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.chosen.shape != self.rejected.shape or self.chosen.shape[0] != n:
            raise ValueError(f"PairData: {n} prompts, chosen {tuple(self.chosen.shape)}, "
                             f"rejected {tuple(self.rejected.shape)}")  # fmt: skip
        if not self.kinds:
            self.kinds = ["pair"] * n

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class LabeledData:
    """Images with named float targets (NaN = unknown).

    Attributes:
        prompts: ``N`` prompts (``""`` where none applies).
        images: uint8 ``(N, 3, S, S)``.
        targets: name -> ``(N,)`` float32.
        kinds: ``N`` example types (e.g. ``"clean"``, ``"blur"``).
    """

    prompts: list[str]
    images: Tensor
    targets: dict[str, Tensor]
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.images.shape[0] != n or any(t.shape != (n,) for t in self.targets.values()):
            raise ValueError(f"LabeledData: {n} prompts, images {tuple(self.images.shape)}, targets "
                             f"{ {k: tuple(v.shape) for k, v in self.targets.items()} }")  # fmt: skip
        if not self.kinds:
            self.kinds = ["example"] * n

    def __len__(self) -> int:
        return len(self.prompts)


def to_uint8(images: Tensor | np.ndarray) -> Tensor:
    """Float ``(N, 3, H, W)`` in [0, 1] -> uint8."""
    x = torch.as_tensor(images).float()
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 in [0, 1]."""
    return images.float() / 255.0


# ------------------------------------------------------------------------------------------------ the world
def perturb_prompt(spec: PromptSpec, rng: np.random.Generator) -> tuple[PromptSpec, str]:
    """A prompt that differs from ``spec`` in one requirement, and the name of the change.

    Changes: ``shape`` (one object's shape), ``color`` (a named colour), ``count`` (counting prompts),
    ``relation`` (the opposite relation), ``binding`` (colours swapped between two objects), ``missing`` (one of
    two objects dropped).
    """
    cat, objs = spec.category, spec.objects
    options = ["shape"]
    if any(o.color for o in objs):
        options.append("color")
    if cat == "counting":
        options.append("count")
    if cat == "position":
        options.append("relation")
    if cat == "color_attr" and objs[0].color != objs[1].color:
        options.append("binding")
    if len(objs) == 2:
        options.append("missing")
    change = options[int(rng.integers(len(options)))]

    def other(values: Sequence, current: object) -> object:
        rest = [v for v in values if v != current]
        return rest[int(rng.integers(len(rest)))]

    if change == "count":
        count = int(other(range(1, MAX_COUNT + 1), objs[0].count))
        return PromptSpec.counting(count, objs[0].shape, objs[0].color), change
    if change == "relation":
        a, b = objs
        return PromptSpec.position(a.shape, _OPPOSITE[spec.relation.relation], b.shape, a.color, b.color), change
    if change == "binding":
        a, b = objs
        return PromptSpec.color_attr(b.color, a.shape, a.color, b.shape), change
    if change == "missing":
        keep = objs[int(rng.integers(2))]
        new = PromptSpec.colors(keep.color, keep.shape) if keep.color else PromptSpec.single_object(keep.shape)
        return new, change
    i = int(rng.integers(len(objs)))
    groups = list(objs)
    if change == "color":
        i = next(j for j in ([i, 1 - i] if len(objs) == 2 else [i]) if objs[j].color)
        groups[i] = type(objs[i])(objs[i].shape, str(other(COLOR_NAMES, objs[i].color)), objs[i].count)
    else:
        taken = {o.shape for k, o in enumerate(objs) if k != i}
        shape = str(other([s for s in SHAPES if s not in taken], objs[i].shape))
        groups[i] = type(objs[i])(shape, objs[i].color, objs[i].count)
    if len(groups) == 2 and groups[0] == groups[1]:  # colour change made two colour_attr objects equal
        return perturb_prompt(spec, rng)
    return PromptSpec(cat, tuple(groups), spec.relation), change


def _prompt_sampler(split: str, rng: np.random.Generator):
    """Draw a category uniformly, then a prompt of it (as the world's pretraining stream does)."""
    groups = list(prompts_by_category(split_prompts(split)).values())

    def draw() -> PromptSpec:
        group = groups[int(rng.integers(len(groups)))]
        return group[int(rng.integers(len(group)))]

    return draw


def _render_prompt(spec: PromptSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    return render(sample_scene(spec, rng, size))


def _violating_pair(
    spec: PromptSpec, rng: np.random.Generator, size: int, tries: int = 20
) -> tuple[np.ndarray, np.ndarray, str, float, float]:
    """A render satisfying ``spec`` and one of a perturbed prompt that the evaluator scores strictly lower."""
    for _ in range(tries):
        good = _render_prompt(spec, rng, size)
        good_score = evaluate(good, spec).score
        perturbed, change = perturb_prompt(spec, rng)
        bad = _render_prompt(perturbed, rng, size)
        bad_score = evaluate(bad, spec).score
        if good_score > bad_score:
            return good, bad, change, good_score, bad_score
    raise RuntimeError(f"could not build a violating pair for {spec.text!r} in {tries} tries")


def world_pairs(
    n: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    *,
    quality_fraction: float = 0.3,
    artifact_kinds: Sequence[str] = ARTIFACT_KINDS,
    min_severity: float = 0.25,
) -> PairData:
    """``n`` preference pairs on the world's ``split`` prompts (see the module docstring).

    A fraction ``1 - quality_fraction`` are alignment pairs (a render satisfying the prompt vs a render violating
    it, ``kind = "alignment:<change>"``), the rest quality pairs (a clean render vs the same render with an
    artifact, ``kind = "quality:<artifact>"``). Deterministic in ``seed``.
    """
    if not 0.0 <= quality_fraction <= 1.0:
        raise ValueError(f"quality_fraction must be in [0, 1], got {quality_fraction}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    draw = _prompt_sampler(split, rng)
    prompts, chosen, rejected, kinds = [], [], [], []
    n_quality = int(round(n * quality_fraction))
    quality_rows = []
    for i in range(n):
        spec = draw()
        prompts.append(spec.text)
        if i < n_quality:
            img = _render_prompt(spec, rng, size)
            chosen.append(img)
            rejected.append(img)
            quality_rows.append(i)
            kinds.append("quality")
        else:
            good, bad, change, _, _ = _violating_pair(spec, rng, size)
            chosen.append(good)
            rejected.append(bad)
            kinds.append(f"alignment:{change}")
    chosen_t = torch.from_numpy(np.stack(chosen)) if n else torch.zeros(0, 3, size, size)
    rejected_t = torch.from_numpy(np.stack(rejected)) if n else torch.zeros(0, 3, size, size)
    if quality_rows:
        rows = torch.tensor(quality_rows)
        corrupted, ids, _ = add_random_artifacts(rejected_t[rows], gen, artifact_kinds, min_severity)
        rejected_t[rows] = corrupted
        chosen_t[rows] = mild_variation(chosen_t[rows], gen)
        for row, k in zip(quality_rows, ids.tolist(), strict=True):
            kinds[row] = f"quality:{ARTIFACT_KINDS[k]}"
    order = np.random.default_rng(seed + 1).permutation(n)
    return PairData(
        prompts=[prompts[i] for i in order], chosen=to_uint8(chosen_t[order]), rejected=to_uint8(rejected_t[order]),
        kinds=[kinds[i] for i in order],
    )  # fmt: skip


def world_labeled(
    n: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    *,
    violation_fraction: float = 0.5,
    artifact_fraction: float = 0.5,
    artifact_kinds: Sequence[str] = ARTIFACT_KINDS,
    min_severity: float = 0.25,
) -> LabeledData:
    """``n`` labelled world images.

    Each image renders its prompt (or, with probability ``violation_fraction``, a perturbed prompt that the
    evaluator scores lower); with probability ``artifact_fraction`` it is then corrupted by a random artifact of
    severity ``s`` in ``[min_severity, 1]``, otherwise given mild clean variation. Targets (all in [0, 1], higher
    is better):

    * ``alignment``: the world evaluator's partial-credit score of the render against the prompt, before
      corruption;
    * ``artifacts``: 1 for a clean image, 0 for a corrupted one;
    * ``aesthetics``: ``1 - s`` (1 for clean images): a graded quality;
    * ``rating``: ``(alignment + aesthetics) / 2``, one overall rating for regression.

    ``kinds`` holds ``"clean"`` or the artifact name.
    """
    for name, value in (("violation_fraction", violation_fraction), ("artifact_fraction", artifact_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    draw = _prompt_sampler(split, rng)
    prompts, images, alignment = [], [], []
    for _ in range(n):
        spec = draw()
        prompts.append(spec.text)
        if rng.random() < violation_fraction:
            _, bad, _, _, bad_score = _violating_pair(spec, rng, size)
            images.append(bad)
            alignment.append(bad_score)
        else:
            img = _render_prompt(spec, rng, size)
            images.append(img)
            alignment.append(evaluate(img, spec).score)
    x = torch.from_numpy(np.stack(images)) if n else torch.zeros(0, 3, size, size)
    corrupt = torch.from_numpy(rng.random(n) < artifact_fraction)
    severity = torch.zeros(n)
    kinds = ["clean"] * n
    rows = corrupt.nonzero().flatten()
    clean_rows = (~corrupt).nonzero().flatten()
    if len(rows):
        x[rows], ids, severity[rows] = add_random_artifacts(x[rows], gen, artifact_kinds, min_severity)
        for row, k in zip(rows.tolist(), ids.tolist(), strict=True):
            kinds[row] = ARTIFACT_KINDS[k]
    if len(clean_rows):
        x[clean_rows] = mild_variation(x[clean_rows], gen)
    align = torch.tensor(alignment, dtype=torch.float32)
    aesthetics = 1.0 - severity
    targets = {"alignment": align, "artifacts": (~corrupt).float(), "aesthetics": aesthetics,
               "rating": (align + aesthetics) / 2}  # fmt: skip
    return LabeledData(prompts=prompts, images=to_uint8(x), targets=targets, kinds=kinds)


# ------------------------------------------------------------------------------------------------------ files
def _load_image(path: str, size: int) -> Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            array = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path!r}: {e}") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path!r} is empty")
    return rows


def load_data(path: str, size: int, aspects: Sequence[str] = ()) -> PairData | LabeledData:
    """Read a JSONL file (format detected from the first row's keys) or an artifact folder (``clean/`` +
    ``artifact/``), images resized to ``size x size`` (PIL bicubic)."""
    if os.path.isdir(path):
        return _load_artifact_folder(path, size)
    rows = _read_jsonl(path)
    root = os.path.dirname(os.path.abspath(path))

    def image(row: dict, key: str, lineno: int) -> Tensor:
        if key not in row:
            raise DataError(f"{path}: row {lineno} has no {key!r}")
        return _load_image(os.path.join(root, str(row[key])), size)

    first = rows[0]
    if "chosen" in first or "rejected" in first:
        chosen = torch.stack([image(r, "chosen", i + 1) for i, r in enumerate(rows)])
        rejected = torch.stack([image(r, "rejected", i + 1) for i, r in enumerate(rows)])
        return PairData([str(r.get("prompt", "")) for r in rows], chosen, rejected,
                        [str(r.get("kind", "pair")) for r in rows])  # fmt: skip
    names = [k for k in ("rating", "artifact", *aspects) if any(k in r for r in rows)]
    if not names:
        raise DataError(f"{path}: rows need 'chosen'/'rejected', 'rating', 'artifact' or aspect keys {list(aspects)}")
    images = torch.stack([image(r, "image", i + 1) for i, r in enumerate(rows)])
    targets = {}
    for name in names:
        values = [r.get(name, float("nan")) for r in rows]
        targets[name] = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    kinds = [str(r.get("kind", "example")) for r in rows]
    return LabeledData([str(r.get("prompt", "")) for r in rows], images, targets, kinds)


def _load_artifact_folder(path: str, size: int) -> LabeledData:
    images, labels = [], []
    for sub, label in (("clean", 0.0), ("artifact", 1.0)):
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"artifact data folder {path!r} needs subfolders clean/ and artifact/")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        images += [_load_image(os.path.join(folder, f), size) for f in files]
        labels += [label] * len(files)
    if not images:
        raise DataError(f"artifact data folder {path!r} holds no images")
    kinds = ["artifact" if v else "clean" for v in labels]
    return LabeledData([""] * len(images), torch.stack(images), {"artifact": torch.tensor(labels)}, kinds)


def save_data(data: PairData | LabeledData, directory: str) -> str:
    """Write a dataset as PNGs plus ``data.jsonl`` in the file formats above; returns the JSONL path."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    lines = []

    def write(image: Tensor, name: str) -> str:
        rel = os.path.join("images", name)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(directory, rel))
        return rel

    for i in range(len(data)):
        row: dict = {"prompt": data.prompts[i], "kind": data.kinds[i]}
        if isinstance(data, PairData):
            row["chosen"] = write(data.chosen[i], f"{i:06d}_chosen.png")
            row["rejected"] = write(data.rejected[i], f"{i:06d}_rejected.png")
        else:
            row["image"] = write(data.images[i], f"{i:06d}.png")
            for name, values in data.targets.items():
                if not torch.isnan(values[i]):
                    row[name] = float(values[i])
        lines.append(json.dumps(row))
    path = os.path.join(directory, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def split_data(data: PairData | LabeledData, fraction: float, seed: int) -> tuple:
    """Random ``(train, held_out)`` split with ``fraction`` held out."""
    n = len(data)
    k = int(round(n * fraction))
    if not 0 < k < n:
        raise DataError(f"cannot hold out {fraction} of {n} examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return subset(data, order[k:]), subset(data, order[:k])


def subset(data: PairData | LabeledData, rows: Tensor) -> PairData | LabeledData:
    """The examples at ``rows`` (a 1-d index tensor)."""
    idx = rows.tolist()
    if isinstance(data, PairData):
        return PairData([data.prompts[i] for i in idx], data.chosen[rows], data.rejected[rows],
                        [data.kinds[i] for i in idx])  # fmt: skip
    return LabeledData([data.prompts[i] for i in idx], data.images[rows],
                       {k: v[rows] for k, v in data.targets.items()}, [data.kinds[i] for i in idx])  # fmt: skip
