"""Prompt specifications, prompt text, the prompt parser and the fixed train/test prompt sets.

Prompts follow GenEval's templates, always starting with "a photo of":

=================  ============================================
category           example
=================  ============================================
``single_object``  "a photo of a circle"
``two_object``     "a photo of a square and a triangle"
``counting``       "a photo of three circles"
``colors``         "a photo of a blue square"
``position``       "a photo of a circle left of a square"
``color_attr``     "a photo of a red circle and a blue triangle"
=================  ============================================

Splits (deterministic, no RNG). Two held-out splits, both disjoint from ``train``:

* ``test``: *novel bindings*, combinations that never occur in any training prompt (below), so that an aligned
  model has something to generalise to; harder than GenEval's test set.
* ``test_seen``: *GenEval-comparable*, held-out prompts every part of which occurs in training (every
  colour-shape pair, shape pair and relation triple of them is in some training prompt; GenEval's test prompts
  likewise reuse training objects and attributes): 32 colour-attribution, 4 colour, 8 position, 2 two-object
  and 2 counting prompts taken out of the training combinations by a stable hash of their text.

The ``test`` split:

* ``single_object``: 4 prompts in all; test = {square, cross}, train = {circle, triangle}.
* ``two_object``: ordered pairs of distinct shapes (12); the unordered pairs {circle, triangle} and
  {square, cross} are held out in both orders (test 4, train 8).
* ``counting``: counts 2..4 x 4 shapes (12); held out (shape index j, count 2 + j mod 3), i.e. two circles,
  three squares, four triangles, two crosses (test 4, train 8).
* ``colors``: colour x shape (24); held out are the 8 pairs (colour index i, shape index j) with
  ``(i + j) % 3 == 0`` (:data:`HELD_OUT_COLOR_SHAPES`), e.g. "red circle", "blue square" (test 8, train 16).
  Every colour and every shape keeps at least two training partners.
* ``color_attr``: ordered pairs of (colour, shape) with distinct colours and distinct shapes. Train = all
  pairs in which *neither* (colour, shape) is held out; test = 64 of those in which *at least one* is held
  out, picked by a stable hash of the prompt text (the rest are used nowhere).
* ``position``: (shape a, relation, shape b) with a != b (48); held out when
  ``(index(a) + index(b) + index(relation)) % 3 == 0`` (16 triples: every relation 4 times, every ordered
  shape pair at least once) (test 16, train 32).

Counting prompts use counts 2..4 like GenEval; the grammar also knows "one" and optional colours in
counting/position phrases ("a photo of two red circles"), which the fixed sets do not use. Colours of objects
whose colour the prompt does not name are random in the rendered scenes, so e.g. red circles do appear in
training images even though "red circle" is a held-out prompt phrase.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from diffalign.world.scene import (
    COLOR_NAMES,
    COLORS,
    MAX_COUNT,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    check_color,
    check_relation,
    check_shape,
)

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PREFIX = "a photo of "
SPLITS: tuple[str, ...] = ("train", "test", "test_seen")


@dataclass(frozen=True)
class ObjectReq:
    """One required object group: ``count`` objects of ``shape`` (all of colour ``color`` if given)."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        check_shape(self.shape)
        if self.color is not None:
            check_color(self.color)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be an int in [1, {MAX_COUNT}], got {self.count!r}")

    def phrase(self, use_number: bool = False) -> str:
        """Noun phrase, e.g. "a red circle" or (``use_number``) "three red circles"."""
        adj = f"{self.color} " if self.color else ""
        if use_number:
            noun = self.shape if self.count == 1 else PLURALS[self.shape]
            return f"{NUMBER_WORDS[self.count]} {adj}{noun}"
        if self.count != 1:
            raise ValueError("a phrase with an article needs count 1")
        words = f"{adj}{self.shape}"
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words}"


@dataclass(frozen=True)
class Relation:
    """Spatial requirement "objects[subject] <relation> objects[object]"."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        check_relation(self.relation)


@dataclass(frozen=True)
class PromptSpec:
    """A structured, hashable prompt.

    Attributes:
        category: one of :data:`CATEGORIES`.
        objects: required object groups (1 for single_object/counting/colors, 2 otherwise).
        relation: for ``position`` only: ``Relation(0, rel, 1)``.

    Use the constructors :meth:`single_object`, :meth:`two_object`, :meth:`counting`, :meth:`colors`,
    :meth:`position`, :meth:`color_attr`; ``spec.text`` is the natural-language prompt and
    ``parse_prompt(spec.text) == spec``.
    """

    category: str
    objects: tuple[ObjectReq, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        cat, objs, rel = self.category, self.objects, self.relation
        if cat not in CATEGORIES:
            raise ValueError(f"unknown category {cat!r}; expected one of {', '.join(CATEGORIES)}")
        if not all(isinstance(o, ObjectReq) for o in objs):
            raise ValueError("objects must be ObjectReq instances")
        n_expected = 1 if cat in ("single_object", "counting", "colors") else 2
        if len(objs) != n_expected:
            raise ValueError(f"{cat} needs {n_expected} object group(s), got {len(objs)}")
        if (rel is not None) != (cat == "position"):
            raise ValueError(f"a relation is required for position prompts and forbidden otherwise ({cat})")
        if rel is not None and (rel.subject, rel.object) != (0, 1):
            raise ValueError("position relation must be Relation(0, rel, 1)")
        if cat != "counting" and any(o.count != 1 for o in objs):
            raise ValueError(f"{cat} objects must have count 1")
        if cat in ("single_object", "two_object") and any(o.color is not None for o in objs):
            raise ValueError(f"{cat} prompts do not name colours")
        if cat in ("colors", "color_attr") and any(o.color is None for o in objs):
            raise ValueError(f"{cat} prompts must name a colour for every object")
        if cat in ("two_object", "position") and objs[0].shape == objs[1].shape:
            raise ValueError(f"{cat} prompts need two different shapes")
        if cat == "color_attr" and objs[0] == objs[1]:
            raise ValueError("color_attr prompts need two different (colour, shape) objects")

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def single_object(cls, shape: str) -> PromptSpec:
        """Spec for ``a photo of a <shape>``."""
        return cls("single_object", (ObjectReq(shape),))

    @classmethod
    def two_object(cls, shape_a: str, shape_b: str) -> PromptSpec:
        """Spec for ``a photo of a <shape_a> and a <shape_b>``."""
        return cls("two_object", (ObjectReq(shape_a), ObjectReq(shape_b)))

    @classmethod
    def counting(cls, count: int, shape: str, color: str | None = None) -> PromptSpec:
        """Spec for ``a photo of <count> [<color>] <shapes>``."""
        return cls("counting", (ObjectReq(shape, color, count),))

    @classmethod
    def colors(cls, color: str, shape: str) -> PromptSpec:
        """Spec for ``a photo of a <color> <shape>``."""
        return cls("colors", (ObjectReq(shape, color),))

    @classmethod
    def position(
        cls, shape_a: str, relation: str, shape_b: str, color_a: str | None = None, color_b: str | None = None
    ) -> PromptSpec:
        """Spec for ``a photo of a <shape_a> <relation> a <shape_b>``."""
        return cls("position", (ObjectReq(shape_a, color_a), ObjectReq(shape_b, color_b)), Relation(0, relation, 1))

    @classmethod
    def color_attr(cls, color_a: str, shape_a: str, color_b: str, shape_b: str) -> PromptSpec:
        """Spec for ``a photo of a <color_a> <shape_a> and a <color_b> <shape_b>``."""
        return cls("color_attr", (ObjectReq(shape_a, color_a), ObjectReq(shape_b, color_b)))

    # ------------------------------------------------------------------------------------------------- text
    @property
    def text(self) -> str:
        """The natural-language prompt."""
        if self.category == "counting":
            return PREFIX + self.objects[0].phrase(use_number=True)
        if self.category in ("single_object", "colors"):
            return PREFIX + self.objects[0].phrase()
        a, b = (o.phrase() for o in self.objects)
        if self.category == "position":
            assert self.relation is not None
            return f"{PREFIX}{a} {self.relation.relation} {b}"
        return f"{PREFIX}{a} and {b}"

    @property
    def shapes(self) -> tuple[str, ...]:
        """Shapes named in the prompt, in order."""
        return tuple(o.shape for o in self.objects)

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------------- parser
_NUMBERS_BY_WORD = {w: n for n, w in NUMBER_WORDS.items()}
_SINGULAR_BY_PLURAL = {p: s for s, p in PLURALS.items()}
_REL_RE = re.compile(r"\s(" + "|".join(re.escape(r) for r in RELATIONS) + r")\s")


def _parse_phrase(phrase: str, text: str) -> tuple[ObjectReq, bool]:
    """Parse "a [colour] shape" / "<number> [colour] shapes"; returns (requirement, used a number word)."""
    words = phrase.split()
    if len(words) not in (2, 3):
        raise ValueError(f"cannot parse object phrase {phrase!r} in prompt {text!r}")
    det, noun = words[0], words[-1]
    color = words[1] if len(words) == 3 else None
    if color is not None and color not in COLORS:
        raise ValueError(f"unknown colour word {color!r} in prompt {text!r}; known: {', '.join(COLOR_NAMES)}")
    if det in ("a", "an"):
        count, used_number = 1, False
    elif det in _NUMBERS_BY_WORD:
        count, used_number = _NUMBERS_BY_WORD[det], True
    else:
        raise ValueError(
            f"expected 'a', 'an' or a number word ({', '.join(NUMBER_WORDS.values())}) before {noun!r} "
            f"in prompt {text!r}, got {det!r}"
        )
    if count == 1:
        if noun not in SHAPES:
            hint = " (plural after a singular determiner)" if noun in _SINGULAR_BY_PLURAL else ""
            raise ValueError(f"unknown shape word {noun!r}{hint} in prompt {text!r}; known: {', '.join(SHAPES)}")
        shape = noun
    else:
        if noun not in _SINGULAR_BY_PLURAL:
            raise ValueError(
                f"expected a plural shape word after {det!r} in prompt {text!r}, got {noun!r}; "
                f"known: {', '.join(PLURALS.values())}"
            )
        shape = _SINGULAR_BY_PLURAL[noun]
    if not used_number:
        expected_article = "an" if (color or shape)[0] in "aeiou" else "a"
        if det != expected_article:
            raise ValueError(f"wrong article {det!r} before {(color or shape)!r} in prompt {text!r}")
    return ObjectReq(shape, color, count), used_number


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt produced by :attr:`PromptSpec.text` back into its :class:`PromptSpec`.

    Case, surrounding whitespace, repeated spaces and a trailing full stop are tolerated.

    Raises:
        ValueError: if the text does not follow the grammar or uses an unknown word.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}")
    norm = " ".join(text.strip().lower().rstrip(".").split())
    if not norm.startswith(PREFIX):
        raise ValueError(f"prompt must start with {PREFIX.strip()!r}: {text!r}")
    body = norm[len(PREFIX) :]
    rel_matches = list(_REL_RE.finditer(f" {body} "))
    if len(rel_matches) > 1:
        raise ValueError(f"more than one relation in prompt {text!r}")
    if rel_matches:
        m = rel_matches[0]
        padded = f" {body} "
        left, right = padded[: m.start()].strip(), padded[m.end() :].strip()
        (a, a_num), (b, b_num) = _parse_phrase(left, text), _parse_phrase(right, text)
        if a_num or b_num:
            raise ValueError(f"position prompts name single objects with 'a'/'an': {text!r}")
        return PromptSpec("position", (a, b), Relation(0, m.group(1), 1))
    parts = body.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"at most two objects may be joined with 'and': {text!r}")
    if len(parts) == 2:
        (a, a_num), (b, b_num) = (_parse_phrase(p.strip(), text) for p in parts)
        if a_num or b_num:
            raise ValueError(f"two-object prompts name single objects with 'a'/'an': {text!r}")
        if a.color is None and b.color is None:
            return PromptSpec("two_object", (a, b))
        if a.color is not None and b.color is not None:
            return PromptSpec("color_attr", (a, b))
        raise ValueError(f"either both or neither of the two objects must have a colour: {text!r}")
    obj, used_number = _parse_phrase(body, text)
    if used_number:
        return PromptSpec("counting", (obj,))
    if obj.color is not None:
        return PromptSpec("colors", (obj,))
    return PromptSpec("single_object", (obj,))


def is_world_prompt(text: str) -> bool:
    """Whether ``text`` follows the world's prompt grammar (so the world evaluator can judge images of it)."""
    try:
        parse_prompt(text)
    except ValueError:
        return False
    return True


def as_spec(prompt: str | PromptSpec) -> PromptSpec:
    """Return ``prompt`` as a :class:`PromptSpec` (parsing text)."""
    if isinstance(prompt, PromptSpec):
        return prompt
    return parse_prompt(prompt)


# ---------------------------------------------------------------------------------------------- prompt sets
#: (colour, shape) pairs never used as a colour phrase in training prompts.
HELD_OUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset(
    (c, s) for i, c in enumerate(COLOR_NAMES) for j, s in enumerate(SHAPES) if (i + j) % 3 == 0
)
#: Unordered shape pairs held out of two_object training prompts.
HELD_OUT_SHAPE_PAIRS: frozenset[frozenset[str]] = frozenset(
    {frozenset(("circle", "triangle")), frozenset(("square", "cross"))}
)
#: (count, shape) pairs held out of counting training prompts.
HELD_OUT_COUNTS: frozenset[tuple[int, str]] = frozenset((2 + j % 3, s) for j, s in enumerate(SHAPES))
#: (shape a, relation, shape b) triples held out of position training prompts.
HELD_OUT_POSITIONS: frozenset[tuple[str, str, str]] = frozenset(
    (a, r, b)
    for i, a in enumerate(SHAPES)
    for j, b in enumerate(SHAPES)
    for k, r in enumerate(RELATIONS)
    if i != j and (i + j + k) % 3 == 0
)
#: single_object shapes in the test split.
TEST_SINGLE_SHAPES: tuple[str, ...] = ("square", "cross")
#: Number of color_attr prompts in the test split.
N_TEST_COLOR_ATTR = 64
#: Prompts per category moved from the training combinations to the ``test_seen`` split.
N_TEST_SEEN: dict[str, int] = {"color_attr": 32, "colors": 4, "position": 8, "two_object": 2, "counting": 2}
COUNTING_COUNTS: tuple[int, ...] = (2, 3, 4)


def _stable_key(spec: PromptSpec) -> str:
    return hashlib.sha256(spec.text.encode()).hexdigest()


@functools.cache
def _build_splits() -> dict[str, tuple[PromptSpec, ...]]:
    train: list[PromptSpec] = []
    test: list[PromptSpec] = []
    for s in SHAPES:
        (test if s in TEST_SINGLE_SHAPES else train).append(PromptSpec.single_object(s))
    for a, b in itertools.permutations(SHAPES, 2):
        (test if frozenset((a, b)) in HELD_OUT_SHAPE_PAIRS else train).append(PromptSpec.two_object(a, b))
    for s in SHAPES:
        for n in COUNTING_COUNTS:
            (test if (n, s) in HELD_OUT_COUNTS else train).append(PromptSpec.counting(n, s))
    for c in COLOR_NAMES:
        for s in SHAPES:
            (test if (c, s) in HELD_OUT_COLOR_SHAPES else train).append(PromptSpec.colors(c, s))
    for a, b in itertools.permutations(SHAPES, 2):
        for r in RELATIONS:
            (test if (a, r, b) in HELD_OUT_POSITIONS else train).append(PromptSpec.position(a, r, b))
    attr_test: list[PromptSpec] = []
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLOR_NAMES, SHAPES), 2):
        if c1 == c2 or s1 == s2:
            continue
        spec = PromptSpec.color_attr(c1, s1, c2, s2)
        if (c1, s1) in HELD_OUT_COLOR_SHAPES or (c2, s2) in HELD_OUT_COLOR_SHAPES:
            attr_test.append(spec)
        else:
            train.append(spec)
    chosen = set(sorted(attr_test, key=_stable_key)[:N_TEST_COLOR_ATTR])
    test.extend(s for s in attr_test if s in chosen)
    seen = _seen_split(train)
    return {"train": tuple(p for p in train if p not in seen), "test": tuple(test), "test_seen": tuple(seen)}


def _seen_split(train: list[PromptSpec]) -> list[PromptSpec]:
    """The ``test_seen`` prompts: per category, the first training combinations by stable hash whose removal keeps
    every part of them in training (a two-object pair keeps its other order; a colour phrase keeps its pair in
    colour-attribution prompts), in training order."""
    picked: set[PromptSpec] = set()
    for category, n in N_TEST_SEEN.items():
        pool = sorted((p for p in train if p.category == category), key=_stable_key)
        taken: list[PromptSpec] = []
        for spec in pool:
            if len(taken) == n:
                break
            if category == "two_object" and any(set(t.shapes) == set(spec.shapes) for t in taken):
                continue
            taken.append(spec)
        picked.update(taken)
    return [p for p in train if p in picked]


def train_prompts() -> list[PromptSpec]:
    """The fixed training prompt set (deterministic order; see the module docstring for the split)."""
    return list(_build_splits()["train"])


def test_prompts() -> list[PromptSpec]:
    """The fixed held-out test prompt set of novel bindings (deterministic order; see the module docstring)."""
    return list(_build_splits()["test"])


def test_seen_prompts() -> list[PromptSpec]:
    """The GenEval-comparable held-out prompt set (deterministic order; see the module docstring)."""
    return list(_build_splits()["test_seen"])


test_prompts.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into tests
test_seen_prompts.__test__ = False  # type: ignore[attr-defined]


def split_prompts(split: str) -> list[PromptSpec]:
    """``train_prompts()``, ``test_prompts()`` or ``test_seen_prompts()`` by name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return list(_build_splits()[split])


def prompts_by_category(prompts: Iterable[str | PromptSpec]) -> dict[str, list[PromptSpec]]:
    """Group prompts by category (keys in :data:`CATEGORIES` order, only non-empty categories)."""
    groups: dict[str, list[PromptSpec]] = {c: [] for c in CATEGORIES}
    for p in prompts:
        spec = as_spec(p)
        groups[spec.category].append(spec)
    return {c: v for c, v in groups.items() if v}


def category_counts(prompts: Sequence[str | PromptSpec]) -> dict[str, int]:
    """Number of prompts per category."""
    return {c: len(v) for c, v in prompts_by_category(prompts).items()}


def world_words() -> list[str]:
    """Every word of the world's prompts (train and test), sorted: the vocabulary of the world's tokenizers, in
    which each of them is one token."""
    return sorted({w for spec in train_prompts() + test_prompts() for w in spec.text.split()})
