"""Vocabulary, geometry and scene descriptions of the embedded world.

The world is a plain near-white canvas with a few flat-coloured, axis-aligned shapes on it.

* Colours (:data:`COLORS`): six palette colours chosen to be far apart both from each other and from the
  background in RGB, so that a per-pixel nearest-colour rule is robust to noise and colour drift.
* Shapes (:data:`SHAPES`): ``circle``, ``square``, ``triangle`` (isosceles, apex up, base down) and ``cross``
  (a plus sign). Every shape exactly fills its bounding square of side ``2 * radius``, so the unit-square
  templates from :func:`shape_mask` describe both the renderer and the evaluator's shape classifier.
* Counts 1..4 (:data:`NUMBER_WORDS`) and the relations ``left of``, ``right of``, ``above``, ``below``.

Coordinates are continuous pixel coordinates of a ``size x size`` canvas: pixel ``(row i, col j)`` covers
``[j, j + 1) x [i, i + 1)``, ``x`` grows to the right and ``y`` grows downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RGB = tuple[float, float, float]

#: Palette colour name -> RGB in [0, 1].
COLORS: dict[str, RGB] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.10),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.05),
    "purple": (0.70, 0.10, 0.80),
    "black": (0.15, 0.15, 0.15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: Shape names (singular) and their plural forms.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

#: Count -> number word.
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

#: Spatial relations, phrased "<subject> <relation> <object>".
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Uniform background colour (light grey, almost white).
BACKGROUND: RGB = (0.95, 0.95, 0.95)

#: Default canvas size in pixels; sizes are relative to it.
DEFAULT_SIZE = 64
MIN_SIZE = 16
MAX_SIZE = 512

#: Arm thickness of the cross as a fraction of its bounding square side.
CROSS_ARM = 1.0 / 3.0

#: GenEval's relative-position margin: each box's size shrinks the centre offset by this fraction.
POSITION_THRESHOLD = 0.1
#: A relation holds when the margin-reduced, normalised offset has a component beyond this value (GenEval: 0.5).
RELATION_MIN_COMPONENT = 0.5

Box = tuple[float, float, float, float]


def check_color(color: str) -> str:
    """Return ``color`` if it is a palette colour name, else raise ``ValueError``."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLOR_NAMES)}")
    return color


def check_shape(shape: str) -> str:
    """Return ``shape`` if it is a known shape name, else raise ``ValueError``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return shape


def check_relation(relation: str) -> str:
    """Return ``relation`` if it is a known relation, else raise ``ValueError``."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")
    return relation


def check_size(size: int) -> int:
    """Validate a canvas size in pixels."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, got {size!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    return int(size)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape inscribed in the unit square.

    Args:
        shape: shape name from :data:`SHAPES`.
        u: horizontal coordinate(s) in the shape's bounding square, 0 = left edge, 1 = right edge.
        v: vertical coordinate(s), 0 = top edge, 1 = bottom edge. Broadcast against ``u``.

    Returns:
        Boolean array (broadcast shape of ``u`` and ``v``), True inside the shape.
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    inside_box = (u >= 0.0) & (u <= 1.0) & (v >= 0.0) & (v <= 1.0)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return inside_box
    if shape == "triangle":
        return inside_box & (np.abs(u - 0.5) <= 0.5 * v)
    if shape == "cross":
        half = 0.5 * CROSS_ARM
        return inside_box & ((np.abs(u - 0.5) <= half) | (np.abs(v - 0.5) <= half))
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def relative_offset(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> tuple[float, float]:
    """GenEval-style normalised offset of box A relative to box B.

    The centre offset ``A - B`` is shrunk towards zero per axis by ``threshold * (dim_a + dim_b)`` and divided
    by the length of the raw offset, so each component lies in [-1, 1]; (0, 0) when the boxes are (nearly)
    concentric. Boxes are ``(x0, y0, x1, y1)`` in pixels.
    """
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    off = np.array([(ax0 + ax1 - bx0 - bx1) / 2.0, (ay0 + ay1 - by0 - by1) / 2.0])
    dims = np.array([(ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0)])
    revised = np.maximum(np.abs(off) - threshold * dims, 0.0) * np.sign(off)
    norm = float(np.linalg.norm(off))
    if norm < 1e-9 or np.all(np.abs(revised) < 1e-3):
        return 0.0, 0.0
    return float(revised[0] / norm), float(revised[1] / norm)


def relations_between(box_a: Box, box_b: Box, min_component: float = RELATION_MIN_COMPONENT) -> frozenset[str]:
    """All relations ``r`` such that "A r B" holds (GenEval rule).

    "A left of B" holds when the normalised, margin-reduced horizontal offset of A's box centre from B's is
    below ``-min_component``; "right of" when above ``+min_component``; "above"/"below" likewise vertically
    (image ``y`` grows downwards). A diagonal layout can satisfy one horizontal and one vertical relation.
    """
    dx, dy = relative_offset(box_a, box_b)
    rels = set()
    if dx < -min_component:
        rels.add("left of")
    if dx > min_component:
        rels.add("right of")
    if dy < -min_component:
        rels.add("above")
    if dy > min_component:
        rels.add("below")
    return frozenset(rels)


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape.

    Attributes:
        shape: shape name.
        color: palette colour name (what the object *is*, for evaluation).
        x, y: centre of the bounding square, pixels of the scene's canvas.
        radius: half the side of the bounding square, pixels (the object is ``2 * radius`` px across).
        rgb: optional fill colour override in [0, 1] (e.g. a slightly perturbed palette colour); None uses
            ``COLORS[color]``.
    """

    shape: str
    color: str
    x: float
    y: float
    radius: float
    rgb: RGB | None = None

    def __post_init__(self) -> None:
        check_shape(self.shape)
        check_color(self.color)
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError(f"object centre must be finite, got ({self.x}, {self.y})")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"object radius must be positive, got {self.radius}")
        if self.rgb is not None:
            rgb = tuple(float(c) for c in self.rgb)
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"rgb override must be 3 values in [0, 1], got {self.rgb!r}")
            object.__setattr__(self, "rgb", rgb)

    @property
    def fill(self) -> RGB:
        """Fill colour actually rendered, RGB in [0, 1]."""
        return self.rgb if self.rgb is not None else COLORS[self.color]

    @property
    def box(self) -> Box:
        """Bounding box ``(x0, y0, x1, y1)`` in pixels."""
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)


@dataclass(frozen=True)
class Scene:
    """A canvas description: objects on a uniform background.

    Attributes:
        objects: the objects, in drawing order (they never overlap when produced by ``sample_scene``).
        size: canvas side in pixels that the object coordinates refer to.
        background: background RGB in [0, 1].
    """

    objects: tuple[SceneObject, ...]
    size: int = DEFAULT_SIZE
    background: RGB = field(default=BACKGROUND)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        for obj in self.objects:
            if not isinstance(obj, SceneObject):
                raise ValueError(f"scene objects must be SceneObject, got {type(obj).__name__}")
        check_size(self.size)
        bg = tuple(float(c) for c in self.background)
        if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
            raise ValueError(f"background must be 3 values in [0, 1], got {self.background!r}")
        object.__setattr__(self, "background", bg)

    def relations(self, i: int, j: int) -> frozenset[str]:
        """Relations that hold for "object i <rel> object j" (see :func:`relations_between`)."""
        return relations_between(self.objects[i].box, self.objects[j].box)
