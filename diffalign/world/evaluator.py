"""Rule-based evaluator of the embedded world: the reward and the benchmark metric (our offline GenEval).

Detection (:func:`detect_objects`), for a ``(3, H, W)`` image in [0, 1]:

1. **Pixel colours.** Each pixel ``p`` is compared with every palette colour ``c`` along the line from the
   background ``b`` to ``c``: ``alpha = <p - b, c - b> / |c - b|^2`` is the estimated coverage and ``perp`` the
   RGB distance of ``p`` from that line. A pixel belongs to colour ``c`` if ``MIN_ALPHA <= alpha <= MAX_ALPHA``
   and ``perp < MAX_PERP`` (the closest line wins). So anti-aliased or blurred edges are cut at half coverage
   (the true outline), and muddy/off-palette pixels and the background are ignored.
2. **Objects.** 8-connected components per colour (a small vectorised union-find, no scipy); components
   below ``MIN_AREA`` pixels (scaled with the image area, 20 px at 64x64) are noise, components above
   ``MAX_AREA_FRACTION`` of the image are colour washes; both are dropped.
3. **Shape.** The object's soft coverage (``alpha`` of its colour divided by its median interior level,
   clipped to [0, 1], within 2 px of the component) gives a sub-pixel area ``A`` and centroid. For every shape
   the anti-aliased template (:func:`~diffalign.world.scene.shape_mask`, which the renderer also uses) of the
   same area and centroid is laid over it, and the residual ``sum |coverage - template| / A`` picks the shape
   (area and centroid are invariant to blur, so soft edges and 1-px jitter barely matter). A component with a
   bounding-box aspect ratio outside ``ASPECT_RANGE`` or a best residual above ``MAX_SHAPE_DISTANCE`` has
   shape None (it still counts as "an object").

Requirements (:func:`evaluate`), mirroring GenEval:

* every named object group must be present: ``count`` objects of its shape (of its colour, if named);
  counting prompts need the *exact* number of objects of that shape, other prompts at least one;
* position: for every detected subject and every detected object instance, GenEval's rule holds: the
  box-centre offset is reduced per axis by 0.1 x (sum of the two box sizes), normalised by the raw offset
  length, and e.g. "left of" requires its x component < -0.5 (see :func:`~diffalign.world.scene.relations_between`).

Score (partial credit, for RL). The verdict's checks each give a credit in [0, 1]; ``score`` is their mean and
``correct`` holds iff every credit is 1, so ``correct == (score == 1)``:

* ``objects``: ``min(#detected, K) / K`` with ``K`` the total required object count (any shape/colour);
* ``obj{i}.shape``: ``min(n, k) / k`` with ``n`` detected objects of the group's shape (counting:
  ``max(0, 1 - |n - k| / k)``);
* ``obj{i}.color`` (colour named): ``min(n_c, k) / k`` with ``n_c`` objects of that colour, any shape;
* ``obj{i}.binding`` (colour named): ``min(n_sc, k) / k`` with ``n_sc`` objects of that shape *and* colour;
* ``relation`` (position): 1 if both groups are found and the relation holds for all pairs, else 0.

Unrequested extra objects are not penalised (as in GenEval) except through exact counts.

Graded credit (the RL reward that cannot be gamed; :func:`graded_credit`). Partial credit pays for drawing any
object, any colour and any shape the prompt names, so a policy learns to scatter blobs; the graded credit pays
only for what the prompt asks, as a product of factors in [0, 1]:

* per object group, with its *members* the detected objects of the group's shape (and colour, if named):
  a count credit (``min(n, k) / k``; counting ``max(0, 1 - |n - k| / k)``) times the shape quality of its worst
  member, ``clip((MAX_SHAPE_DISTANCE - d) / (MAX_SHAPE_DISTANCE - GRADED_SHAPE_FULL), 0, 1)`` of its template
  residual ``d`` (a crisp shape scores 1, a shape the classifier barely accepts scores near 0);
* position: the relation's margin for the worst (subject, object) pair, the normalised offset component along
  the relation mapped from ``[GRADED_RELATION_ZERO, RELATION_MIN_COMPONENT]`` to [0, 1];
* each of these credits ``c`` enters as ``GRADED_FLOOR + (1 - GRADED_FLOOR) c``, so that an image that gets part
  of the prompt right scores above one that gets nothing right;
* every detected object that belongs to no group (a wrong shape, a wrong colour, an unrecognised blob)
  multiplies the credit by ``GRADED_EXTRA_FACTOR``.

Once every requirement is present, adding any object can only lower it (a new member can only lower a worst-member
quality or a worst-pair margin, or overshoot a count; a non-member costs the extra factor), and it is below 1
unless the image is strictly correct, so ``graded == 1`` implies ``correct``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffalign.world.prompts import CATEGORIES, PromptSpec, as_spec
from diffalign.world.render import image_to_array
from diffalign.world.scene import (
    BACKGROUND,
    COLOR_NAMES,
    COLORS,
    CROSS_ARM,
    RELATION_MIN_COMPONENT,
    SHAPES,
    relations_between,
    relative_offset,
    shape_mask,
)

#: Pixel-colour rule (see module docstring).
MIN_ALPHA = 0.5
MAX_ALPHA = 1.6
MAX_PERP = 0.25
#: Minimum object area in pixels at 64x64 (scaled by H*W / 4096, at least 4 px).
MIN_AREA = 20.0
#: Components covering more than this fraction of the image are background-like washes, not objects.
MAX_AREA_FRACTION = 0.5
#: Accepted bounding-box aspect ratio (width / height) for a shape.
ASPECT_RANGE: tuple[float, float] = (0.6, 1.0 / 0.6)
#: Largest template residual (see module docstring) for a shape to be recognised.
MAX_SHAPE_DISTANCE = 0.35
#: Graded credit: template residual at and below which a shape has full quality (clean renders: ~0.05).
GRADED_SHAPE_FULL = 0.15
#: Graded credit: normalised offset component at and below which a relation has no credit (it holds at 0.5).
GRADED_RELATION_ZERO = 0.2
#: Graded credit: factor for every detected object that no requirement asks for.
GRADED_EXTRA_FACTOR = 0.5
#: Graded credit: the factor of a requirement that is not met at all.
GRADED_FLOOR = 0.2

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_DIRS = np.asarray([COLORS[c] for c in COLOR_NAMES], dtype=np.float32) - _BG  # (K, 3)
_DIRS_SQ = np.sum(_DIRS**2, axis=1)  # (K,)


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image.

    Attributes:
        shape: recognised shape name, or None if the blob matches no shape.
        color: palette colour name.
        area: number of pixels.
        box: bounding box ``(x0, y0, x1, y1)`` in pixels (pixel edges, ``x1``/``y1`` exclusive).
        centroid: ``(x, y)`` mean pixel-centre position.
        shape_distance: normalised residual to the best-fitting shape template (0 = perfect; clean renders
            ~0.05, other shapes >= ~0.17).
    """

    shape: str | None
    color: str
    area: int
    box: tuple[float, float, float, float]
    centroid: tuple[float, float]
    shape_distance: float

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON friendly)."""
        return {
            "shape": self.shape,
            "color": self.color,
            "area": self.area,
            "box": list(self.box),
            "centroid": list(self.centroid),
            "shape_distance": self.shape_distance,
        }


@dataclass
class Verdict:
    """Evaluation result of one (image, prompt) pair.

    Attributes:
        correct: strict GenEval-style correctness (all requirements hold).
        score: partial credit in [0, 1] (mean of the check credits; 1 iff ``correct``).
        details: ``prompt`` (text), ``category``, ``objects`` (detected objects as dicts), ``checks``
            (check name -> credit in [0, 1]) and ``passed`` (check name -> bool).
        graded: the graded credit in [0, 1] (:func:`graded_credit`; below 1 unless ``correct``).
    """

    correct: bool
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    graded: float | None = None


# ------------------------------------------------------------------------------------------------ detection
def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette classification.

    Args:
        image: float ``(3, H, W)`` array in [0, 1].

    Returns:
        int8 ``(H, W)`` array: index into ``COLOR_NAMES``, or -1 for background / unassigned pixels.
    """
    _, h, w = image.shape
    x = image.reshape(3, -1).T - _BG  # (N, 3)
    dots = x @ _DIRS.T  # (N, K)
    alpha = dots / _DIRS_SQ
    perp_sq = np.sum(x * x, axis=1, keepdims=True) - alpha * dots
    valid = (alpha >= MIN_ALPHA) & (alpha <= MAX_ALPHA) & (perp_sq < MAX_PERP**2)
    perp_sq = np.where(valid, perp_sq, np.inf)
    best = np.argmin(perp_sq, axis=1)
    labels = np.where(valid.any(axis=1), best, -1).astype(np.int8)
    return labels.reshape(h, w)


def label_components(labels: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of equal non-negative labels.

    Args:
        labels: int ``(H, W)`` array; pixels < 0 are background.
        connectivity: 4 or 8.

    Returns:
        ``(components, n)``: int32 ``(H, W)`` array with component ids 0..n-1 (-1 for background) and ``n``.
        Ids are ordered by each component's first pixel in raster order.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    h, w = labels.shape
    out = np.full((h, w), -1, dtype=np.int32)
    fg_idx = np.flatnonzero(labels.ravel() >= 0)
    if fg_idx.size == 0:
        return out, 0
    pos = np.arange(h * w).reshape(h, w)
    shifts = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    src, dst = [], []
    for dy, dx in shifts:
        ya, yb = slice(0, h - dy), slice(dy, h)
        xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        la, lb = labels[ya, xa], labels[yb, xb]
        same = (la >= 0) & (la == lb)
        src.append(pos[ya, xa][same])
        dst.append(pos[yb, xb][same])
    a, b = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(h * w)
    while a.size:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            break
        a, b, pa, pb = a[diff], b[diff], pa[diff], pb[diff]
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))  # hook larger root under smaller root
        while True:  # full path compression: every entry points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    _, inv = np.unique(parent[fg_idx], return_inverse=True)
    out.ravel()[fg_idx] = inv
    return out, int(inv.max()) + 1


#: Per shape: area as a fraction of the bounding square, and vertical centroid position within it (0 = top).
_SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 2 * CROSS_ARM - CROSS_ARM**2}
_SHAPE_CY = {"circle": 0.5, "square": 0.5, "triangle": 2.0 / 3.0, "cross": 0.5}
_FIT_SS = 4
_SOFT_FLOOR = 0.15


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (separable max filter)."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for d in range(1, r + 1):
            if d >= n:
                break
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _soft_shape_distances(
    arr: np.ndarray, comps: np.ndarray, k: int, colour: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Moment-fitted template residuals of component ``k``: float ``(len(SHAPES),)``, 0 = perfect.

    The object's soft coverage (alpha of its colour, normalised by its interior level) is compared with each
    shape's anti-aliased template of the same area and centroid: ``sum |coverage - template| / area``.
    """
    _, h, w = arr.shape
    y0, y1, x0, x1 = box
    wy0, wy1, wx0, wx1 = max(0, y0 - 2), min(h, y1 + 2), max(0, x0 - 2), min(w, x1 + 2)
    cid = comps[wy0:wy1, wx0:wx1]
    own = cid == k
    x = arr[:, wy0:wy1, wx0:wx1] - _BG[:, None, None]
    d = _DIRS[colour]
    dots = np.tensordot(d, x, axes=(0, 0))
    alpha = dots / _DIRS_SQ[colour]
    perp_sq = np.sum(x * x, axis=0) - alpha * dots
    level = float(np.clip(np.median(alpha[own]), MIN_ALPHA, MAX_ALPHA))
    soft = np.clip(alpha / level, 0.0, 1.0)
    keep = _dilate(own, 2) & (perp_sq < MAX_PERP**2) & ((cid < 0) | own) & (soft >= _SOFT_FLOOR)
    soft = np.where(keep, soft, 0.0)
    area = float(soft.sum())
    yy = np.arange(wy0, wy1) + 0.5
    xx = np.arange(wx0, wx1) + 0.5
    cy = float((soft.sum(axis=1) * yy).sum() / area)
    cx = float((soft.sum(axis=0) * xx).sum() / area)
    sub = (np.arange(_FIT_SS) + 0.5) / _FIT_SS
    xs = (np.arange(wx0, wx1)[:, None] + sub[None, :]).ravel()
    ys = (np.arange(wy0, wy1)[:, None] + sub[None, :]).ravel()
    hh, ww = wy1 - wy0, wx1 - wx0
    dists = np.empty(len(SHAPES))
    for i, shape in enumerate(SHAPES):
        side = float(np.sqrt(area / _SHAPE_FILL[shape]))
        u = (xs - (cx - 0.5 * side)) / side
        v = (ys - (cy - _SHAPE_CY[shape] * side)) / side
        cov = shape_mask(shape, u[None, :], v[:, None]).reshape(hh, _FIT_SS, ww, _FIT_SS).mean(axis=(1, 3))
        dists[i] = np.abs(soft - cov).sum() / area
    return dists


def _min_area(h: int, w: int) -> float:
    return max(4.0, MIN_AREA * h * w / 4096.0)


def detect_objects(image: Any, *, min_area: float | None = None) -> list[DetectedObject]:
    """Find the objects in an image (see module docstring).

    Args:
        image: ``(3, H, W)`` float array/tensor in [0, 1], PIL image or uint8 array (see ``image_to_array``).
        min_area: minimum component area in pixels (default: ``MIN_AREA`` scaled to the image area).

    Returns:
        Detected objects in raster order of their first pixel.
    """
    arr = image_to_array(image)
    _, h, w = arr.shape
    pix_labels = classify_pixels(arr)
    comps, n = label_components(pix_labels)
    if n == 0:
        return []
    thr = _min_area(h, w) if min_area is None else float(min_area)
    flat = comps.ravel()
    fg = np.flatnonzero(flat >= 0)
    ids = flat[fg]
    areas = np.bincount(ids, minlength=n)
    # all pixels of a component share one colour: read it at the component's first pixel
    first_pixel = fg[np.unique(ids, return_index=True)[1]]
    colour_of = pix_labels.ravel()[first_pixel].astype(np.int64)
    ys_all, xs_all = np.divmod(fg, w)
    objects: list[DetectedObject] = []
    for k in np.flatnonzero((areas >= thr) & (areas <= MAX_AREA_FRACTION * h * w)):
        sel = ids == k
        ys, xs = ys_all[sel], xs_all[sel]
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        bh, bw = y1 - y0, x1 - x0
        dists = _soft_shape_distances(arr, comps, int(k), int(colour_of[k]), (y0, y1, x0, x1))
        best = int(np.argmin(dists))
        aspect = bw / bh
        ok = ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1] and dists[best] <= MAX_SHAPE_DISTANCE
        objects.append(
            DetectedObject(
                shape=SHAPES[best] if ok else None,
                color=COLOR_NAMES[int(colour_of[k])],
                area=int(areas[k]),
                box=(float(x0), float(y0), float(x1), float(y1)),
                centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                shape_distance=float(dists[best]),
            )
        )
    return objects


# ----------------------------------------------------------------------------------------------- evaluation
def judge(spec: PromptSpec | str, objects: Sequence[DetectedObject]) -> Verdict:
    """Check a prompt's requirements against already detected objects (see module docstring)."""
    spec = as_spec(spec)
    exact = spec.category == "counting"
    checks: dict[str, float] = {}
    total = sum(r.count for r in spec.objects)
    checks["objects"] = min(len(objects), total) / total
    groups: list[list[DetectedObject]] = []
    for i, req in enumerate(spec.objects):
        k = req.count
        of_shape = [o for o in objects if o.shape == req.shape]
        n = len(of_shape)
        checks[f"obj{i}.shape"] = max(0.0, 1.0 - abs(n - k) / k) if exact else min(n, k) / k
        if req.color is not None:
            n_c = sum(o.color == req.color for o in objects)
            bound = [o for o in of_shape if o.color == req.color]
            checks[f"obj{i}.color"] = min(n_c, k) / k
            checks[f"obj{i}.binding"] = min(len(bound), k) / k
            groups.append(bound)
        else:
            groups.append(of_shape)
    if spec.relation is not None:
        subj, obj = groups[spec.relation.subject], groups[spec.relation.object]
        holds = bool(subj) and bool(obj)
        holds = holds and all(
            spec.relation.relation in relations_between(a.box, b.box) for a in subj for b in obj if a is not b
        )
        checks["relation"] = 1.0 if holds else 0.0
    passed = {name: credit >= 1.0 for name, credit in checks.items()}
    correct = all(passed.values())
    score = 1.0 if correct else float(min(np.mean(list(checks.values())), 1.0 - 1e-6))
    graded = graded_credit(spec, objects)
    graded = graded if correct else min(graded, 1.0 - 1e-6)
    details = {
        "prompt": spec.text,
        "category": spec.category,
        "objects": [o.as_dict() for o in objects],
        "checks": checks,
        "passed": passed,
    }
    return Verdict(correct=correct, score=score, details=details, graded=graded)


def _shape_quality(distance: float) -> float:
    return float(np.clip((MAX_SHAPE_DISTANCE - distance) / (MAX_SHAPE_DISTANCE - GRADED_SHAPE_FULL), 0.0, 1.0))


def _relation_margin(relation: str, box_a: tuple[float, ...], box_b: tuple[float, ...]) -> float:
    dx, dy = relative_offset(box_a, box_b)
    component = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    span = RELATION_MIN_COMPONENT - GRADED_RELATION_ZERO
    return float(np.clip((component - GRADED_RELATION_ZERO) / span, 0.0, 1.0))


def graded_credit(spec: PromptSpec | str, objects: Sequence[DetectedObject]) -> float:
    """The graded credit in [0, 1] of detected ``objects`` for a prompt (module docstring): a product of count,
    shape-quality and relation-margin factors over what the prompt asks, times ``GRADED_EXTRA_FACTOR`` for every
    object no requirement asks for."""
    spec = as_spec(spec)

    def factor(c: float) -> float:
        return GRADED_FLOOR + (1.0 - GRADED_FLOOR) * c

    credit = 1.0
    members: list[list[DetectedObject]] = []
    for req in spec.objects:
        group = [o for o in objects if o.shape == req.shape and (req.color is None or o.color == req.color)]
        members.append(group)
        n, k = len(group), req.count
        count = max(0.0, 1.0 - abs(n - k) / k) if spec.category == "counting" else min(n, k) / k
        quality = min((_shape_quality(o.shape_distance) for o in group), default=0.0)
        credit *= factor(count * quality)
    if spec.relation is not None:
        subj, obj = members[spec.relation.subject], members[spec.relation.object]
        pairs = [(a, b) for a in subj for b in obj if a is not b]
        credit *= factor(min((_relation_margin(spec.relation.relation, a.box, b.box) for a, b in pairs), default=0.0))
    used = {id(o) for group in members for o in group}
    credit *= GRADED_EXTRA_FACTOR ** sum(id(o) not in used for o in objects)
    return float(credit)


def evaluate(image: Any, prompt: PromptSpec | str) -> Verdict:
    """Judge whether an image shows what the prompt asks for.

    Args:
        image: ``(3, H, W)`` float numpy array or torch tensor in [0, 1] (or a PIL image / uint8 array, see
            :func:`~diffalign.world.render.image_to_array`).
        prompt: prompt text or :class:`PromptSpec`.

    Returns:
        The :class:`Verdict`.

    Raises:
        ValueError: on a malformed image or an unparsable prompt.
    """
    spec = as_spec(prompt)
    return judge(spec, _detections(image_to_array(image)))


#: Detections of recently judged images by content digest: an evaluation scores each image with several world
#: rewards and monitors and then summarises it, which would otherwise detect its objects three times.
_DETECTED: OrderedDict[bytes, list[DetectedObject]] = OrderedDict()
_DETECTED_MAX = 4096


def _detections(arr: np.ndarray) -> list[DetectedObject]:
    """``detect_objects(arr)`` (default ``min_area``), remembered for the last ``_DETECTED_MAX`` images."""
    key = hashlib.blake2b(f"{arr.dtype}{arr.shape}".encode(), digest_size=16)
    key.update(np.ascontiguousarray(arr).tobytes())
    digest = key.digest()
    if digest in _DETECTED:
        _DETECTED.move_to_end(digest)
    else:
        _DETECTED[digest] = detect_objects(arr)
        if len(_DETECTED) > _DETECTED_MAX:
            _DETECTED.popitem(last=False)
    return list(_DETECTED[digest])  # a copy: the objects are frozen, the list is the caller's


def evaluate_batch(images: Any, prompts: Sequence[PromptSpec | str]) -> list[Verdict]:
    """Evaluate a batch.

    Args:
        images: ``(B, 3, H, W)`` float array/tensor in [0, 1], or a sequence of ``B`` images.
        prompts: ``B`` prompts (text or :class:`PromptSpec`).

    Returns:
        ``B`` verdicts, in order.
    """
    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {images.shape}")
    n = len(images)
    if n != len(prompts):
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    return [evaluate(img, p) for img, p in zip(images, prompts, strict=True)]


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for ``z = 1.96``) of a binomial proportion ``correct / n``."""
    if n <= 0:
        raise ValueError("an interval needs at least one image")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def prompt_mean_interval(values: Sequence[float] | np.ndarray | Any, prompts: Sequence[str]) -> tuple[float, float]:
    """A normal 95% interval of the mean of ``values`` ``(N,)`` (a sequence, array or CPU tensor; NaN = the reward
    abstains, left out), clustered by prompt: the images of one prompt are correlated, so the standard error is that
    of the ``P`` per-prompt means around the image mean, ``sqrt(sum_p n_p^2 (m_p - m)^2 / (P (P - 1))) / mean(n_p)``
    (the ratio-estimator form). NaN when fewer than two prompts have a value."""
    groups: dict[str, list[float]] = {}
    for value, prompt in zip(np.asarray(values, dtype=np.float64).tolist(), prompts, strict=True):
        if value == value:
            groups.setdefault(prompt, []).append(value)
    if len(groups) < 2:
        return float("nan"), float("nan")
    counts = np.array([len(v) for v in groups.values()], dtype=np.float64)
    sums = np.array([sum(v) for v in groups.values()], dtype=np.float64)
    mean, P = sums.sum() / counts.sum(), len(groups)
    se = np.sqrt(((sums - counts * mean) ** 2).sum() / (P * (P - 1))) / counts.mean()
    return float(mean - 1.96 * se), float(mean + 1.96 * se)


def _overall_interval(per: dict[str, dict[str, float]], z: float = 1.96) -> tuple[float, float]:
    """Normal interval of the mean of the category accuracies, each category's variance from the Agresti-Coull
    estimate ``p~ (1 - p~) / (n + 4)`` with ``p~ = (k + 2) / (n + 4)``."""
    var = 0.0
    for row in per.values():
        n, k = row["n"], row["accuracy"] * row["n"]
        p = (k + 2) / (n + 4)
        var += p * (1 - p) / (n + 4)
    mean = float(np.mean([row["accuracy"] for row in per.values()]))
    half = z * float(np.sqrt(var)) / len(per)
    return max(0.0, mean - half), min(1.0, mean + half)


def summarize(prompts: Sequence[PromptSpec | str], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Aggregate verdicts GenEval-style, with 95% intervals.

    The intervals treat the prompts as fixed (the benchmark is defined on its prompt set) and the images of a
    category as binomial draws; since the images of one prompt share its success rate, the pooled binomial
    variance is an upper bound of the variance given the prompts, so the intervals are conservative.

    Returns:
        Dict with ``overall`` (mean of the per-category accuracies, GenEval's headline number) and its
        ``overall_ci95``, ``image_accuracy`` (fraction of correct images) and its ``image_accuracy_ci95`` (Wilson),
        ``mean_score`` (partial credit) and its ``mean_score_ci95`` (normal, clustered by prompt),
        ``mean_graded`` (graded credit, when the verdicts carry it), ``n``
        (number of images) and
        ``per_category``: category -> ``{"accuracy", "ci95", "mean_score", "n"}`` (categories that occur, in
        :data:`~diffalign.world.prompts.CATEGORIES` order).
    """
    if len(prompts) != len(verdicts):
        raise ValueError(f"got {len(prompts)} prompts but {len(verdicts)} verdicts")
    if not verdicts:
        raise ValueError("nothing to summarize")
    cats = [as_spec(p).category for p in prompts]
    per: dict[str, dict[str, float]] = {}
    for c in CATEGORIES:
        vs = [v for v, cc in zip(verdicts, cats, strict=True) if cc == c]
        if vs:
            k = sum(v.correct for v in vs)
            per[c] = {
                "accuracy": k / len(vs),
                "ci95": list(accuracy_interval(k, len(vs))),
                "mean_score": float(np.mean([v.score for v in vs])),
                "n": len(vs),
            }
    correct = sum(v.correct for v in verdicts)
    graded = [v.graded for v in verdicts]
    scores = np.array([v.score for v in verdicts], dtype=float)
    return {
        "overall": float(np.mean([d["accuracy"] for d in per.values()])),
        "overall_ci95": list(_overall_interval(per)),
        "image_accuracy": correct / len(verdicts),
        "image_accuracy_ci95": list(accuracy_interval(correct, len(verdicts))),
        "mean_score": float(scores.mean()),
        "mean_score_ci95": list(prompt_mean_interval(scores, [as_spec(p).text for p in prompts])),
        "n": len(verdicts),
        "per_category": per,
        **({"mean_graded": float(np.mean(graded))} if None not in graded else {}),
    }
