"""Tests of the embedded world (diffalign.world): prompts, renderer, evaluator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diffalign import world
from diffalign.world import prompts as wp
from diffalign.world.evaluator import label_components
from diffalign.world.render import render as render_scene
from diffalign.world.render import sample_scene

ALL_SPECS = world.train_prompts() + world.test_prompts()


# ------------------------------------------------------------------------------------------------- helpers
def _balanced_specs(rng: np.random.Generator, n: int) -> list[world.PromptSpec]:
    """``n`` random prompts of both splits, cycling through the categories."""
    groups = world.prompts_by_category(ALL_SPECS)
    cats = list(groups)
    return [groups[cats[i % len(cats)]][int(rng.integers(len(groups[cats[i % len(cats)]])))] for i in range(n)]


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling with the background colour."""
    _, h, w = img.shape
    p = max(abs(dy), abs(dx), 1)
    pad = np.empty((3, h + 2 * p, w + 2 * p), dtype=np.float32)
    pad[:] = np.asarray(world.BACKGROUND, dtype=np.float32)[:, None, None]
    pad[:, p : p + h, p : p + w] = img
    return pad[:, p - dy : p - dy + h, p - dx : p - dx + w].copy()


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge replicate), numpy only."""
    k = int(np.ceil(3 * sigma))
    g = np.exp(-(np.arange(-k, k + 1) ** 2) / (2 * sigma**2))
    g /= g.sum()
    out = np.pad(img, ((0, 0), (k, k), (k, k)), mode="edge")
    out = sum(g[i] * out[:, :, i : i + img.shape[2]] for i in range(2 * k + 1))
    out = sum(g[i] * out[:, i : i + img.shape[1], :] for i in range(2 * k + 1))
    return out.astype(np.float32)


def _accuracy_run(seed: int, n: int, perturb=None) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(seed)
    specs = _balanced_specs(rng, n)
    verdicts, failures = [], []
    for spec in specs:
        scene = sample_scene(spec, rng)
        if perturb is not None:
            img = perturb(scene, rng)
        else:
            img = render_scene(scene)
        v = world.evaluate(img, spec)
        verdicts.append(v)
        if not v.correct:
            failures.append(f"{spec.text}: {v.details['checks']}")
    return world.summarize(specs, verdicts), failures


def _per_cat(summary: dict) -> str:
    return ", ".join(f"{c}={d['accuracy']:.3f}" for c, d in summary["per_category"].items())


# ------------------------------------------------------------------------------------- 1. evaluator accuracy
def test_evaluator_accuracy_on_clean_renders():
    summary, failures = _accuracy_run(seed=0, n=600)
    assert summary["image_accuracy"] >= 0.99, f"{_per_cat(summary)}; failures: {failures[:5]}"
    for cat, d in summary["per_category"].items():
        assert d["accuracy"] >= 0.97, f"{cat}: {_per_cat(summary)}"
    assert set(summary["per_category"]) == set(world.CATEGORIES)
    assert summary["mean_score"] >= 0.99


def test_evaluator_accuracy_with_noise_shift_and_colour_jitter():
    def perturb(scene: world.Scene, rng: np.random.Generator) -> np.ndarray:
        objs = tuple(
            dataclasses.replace(
                o, rgb=tuple(np.clip(np.array(world.COLORS[o.color]) + rng.uniform(-0.08, 0.08, 3), 0.0, 1.0))
            )
            for o in scene.objects
        )
        img = render_scene(dataclasses.replace(scene, objects=objs))
        dy, dx = rng.integers(-1, 2, size=2)
        img = _shift(img, int(dy), int(dx))
        return np.clip(img + rng.normal(0.0, 0.03, img.shape), 0.0, 1.0).astype(np.float32)

    summary, failures = _accuracy_run(seed=1, n=600, perturb=perturb)
    assert summary["image_accuracy"] >= 0.99, f"{_per_cat(summary)}; failures: {failures[:5]}"


def test_evaluator_robust_to_soft_edges():
    def perturb(scene: world.Scene, rng: np.random.Generator) -> np.ndarray:
        img = _blur(render_scene(scene), 0.8)
        return np.clip(img + rng.normal(0.0, 0.02, img.shape), 0.0, 1.0).astype(np.float32)

    summary, failures = _accuracy_run(seed=2, n=240, perturb=perturb)
    assert summary["image_accuracy"] >= 0.97, f"{_per_cat(summary)}; failures: {failures[:5]}"


@pytest.mark.parametrize("size", [32, 128])
def test_evaluator_other_sizes(size):
    rng = np.random.default_rng(size)
    specs = _balanced_specs(rng, 60)
    verdicts = [world.evaluate(render_scene(sample_scene(s, rng, size)), s) for s in specs]
    summary = world.summarize(specs, verdicts)
    assert summary["image_accuracy"] >= 0.97, _per_cat(summary)


# ------------------------------------------------------------------------------------ 2. rejects wrong images
def _img(spec: world.PromptSpec | str, seed: int) -> np.ndarray:
    return render_scene(sample_scene(spec, np.random.default_rng(seed)))


@pytest.mark.parametrize("seed", range(6))
def test_evaluator_rejects_wrong_counts(seed):
    spec = world.PromptSpec.counting(3, "circle")
    assert world.evaluate(_img(spec, seed), spec).correct
    for n in (2, 4):
        v = world.evaluate(_img(world.PromptSpec.counting(n, "circle"), seed), spec)
        assert not v.correct and 0.0 < v.score < 1.0, (n, v.details["checks"])
    v = world.evaluate(_img(world.PromptSpec.counting(3, "square"), seed), spec)
    assert not v.correct and v.score < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_evaluator_rejects_swapped_colours(seed):
    spec = world.PromptSpec.color_attr("red", "circle", "blue", "triangle")
    swapped = world.PromptSpec.color_attr("blue", "circle", "red", "triangle")
    assert world.evaluate(_img(spec, seed), spec).correct
    v = world.evaluate(_img(swapped, seed), spec)
    assert not v.correct
    assert 0.5 <= v.score < 1.0  # shapes and colours present, binding wrong
    assert not v.details["passed"]["obj0.binding"] and not v.details["passed"]["obj1.binding"]
    wrong_colour = world.evaluate(_img(world.PromptSpec.colors("red", "square"), seed), "a photo of a blue square")
    assert not wrong_colour.correct and 0.0 < wrong_colour.score < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_evaluator_rejects_swapped_positions(seed):
    spec = world.PromptSpec.position("circle", "left of", "square")
    assert world.evaluate(_img(spec, seed), spec).correct
    for other in (
        world.PromptSpec.position("circle", "right of", "square"),
        world.PromptSpec.position("square", "left of", "circle"),
    ):
        v = world.evaluate(_img(other, seed), spec)
        assert not v.correct, other.text
        assert v.details["checks"]["relation"] == 0.0 and v.score == pytest.approx(0.75)
    above = world.PromptSpec.position("triangle", "above", "cross")
    v = world.evaluate(_img(world.PromptSpec.position("triangle", "below", "cross"), seed), above)
    assert not v.correct


def test_blank_and_junk_images_score_zero():
    blank = np.empty((3, 64, 64), dtype=np.float32)
    blank[:] = np.asarray(world.BACKGROUND, dtype=np.float32)[:, None, None]
    for spec in ALL_SPECS[::7]:
        v = world.evaluate(blank, spec)
        assert not v.correct and v.score == 0.0, spec.text
    for img in (np.ones((3, 64, 64), np.float32), np.full((3, 64, 64), 0.5, np.float32)):
        v = world.evaluate(img, "a photo of a red circle and a blue triangle")
        assert not v.correct and v.score == 0.0
    assert world.detect_objects(blank) == []


@pytest.mark.parametrize("seed", range(4))
def test_partial_credit_is_graded(seed):
    spec = world.PromptSpec.two_object("square", "triangle")
    full = world.evaluate(_img(spec, seed), spec)
    half = world.evaluate(_img(world.PromptSpec.single_object("square"), seed), spec)
    assert full.correct and full.score == 1.0
    assert not half.correct and 0.0 < half.score < 1.0
    single = world.PromptSpec.single_object("circle")
    wrong_shape = world.evaluate(_img(world.PromptSpec.single_object("cross"), seed), single)
    assert not wrong_shape.correct and 0.0 < wrong_shape.score < 1.0
    # counting: closer counts score higher
    four = world.PromptSpec.counting(4, "triangle")
    scores = [world.evaluate(_img(world.PromptSpec.counting(n, "triangle"), seed), four).score for n in (1, 2, 3)]
    assert scores[0] < scores[1] < scores[2] < 1.0


def test_verdict_details_and_correct_iff_full_score():
    rng = np.random.default_rng(5)
    for spec in _balanced_specs(rng, 60):
        other = ALL_SPECS[int(rng.integers(len(ALL_SPECS)))]
        v = world.evaluate(render_scene(sample_scene(other, rng)), spec)
        assert v.correct == (v.score == 1.0)
        assert 0.0 <= v.score <= 1.0
        assert v.details["prompt"] == spec.text and v.details["category"] == spec.category
        assert set(v.details["checks"]) == set(v.details["passed"])
        assert v.correct == all(v.details["passed"].values())


# --------------------------------------------------------------------------------------------- 3. prompts
def test_prompt_round_trip_and_tolerant_parsing():
    for spec in ALL_SPECS:
        assert world.parse_prompt(spec.text) == spec, spec.text
        assert hash(spec) == hash(world.parse_prompt(spec.text))
    assert world.parse_prompt("  A photo of a Red circle and a BLUE  triangle. ") == world.PromptSpec.color_attr(
        "red", "circle", "blue", "triangle"
    )
    extra = [
        world.PromptSpec.counting(1, "cross"),
        world.PromptSpec.counting(2, "square", "purple"),
        world.PromptSpec.position("circle", "below", "cross", "red", None),
    ]
    for spec in extra:
        assert world.parse_prompt(spec.text) == spec


def test_prompt_texts():
    assert world.PromptSpec.single_object("circle").text == "a photo of a circle"
    assert world.PromptSpec.two_object("square", "triangle").text == "a photo of a square and a triangle"
    assert world.PromptSpec.counting(3, "circle").text == "a photo of three circles"
    assert world.PromptSpec.counting(2, "cross").text == "a photo of two crosses"
    assert world.PromptSpec.colors("blue", "square").text == "a photo of a blue square"
    assert world.PromptSpec.position("circle", "left of", "square").text == "a photo of a circle left of a square"
    spec = world.PromptSpec.color_attr("red", "circle", "blue", "triangle")
    assert spec.text == "a photo of a red circle and a blue triangle"
    assert all(s.text.startswith("a photo of ") for s in ALL_SPECS)


def test_prompt_sets_split():
    train, test = world.train_prompts(), world.test_prompts()
    assert train == world.train_prompts() and test == world.test_prompts()  # deterministic
    train_texts, test_texts = {s.text for s in train}, {s.text for s in test}
    assert len(train_texts) == len(train) and len(test_texts) == len(test)
    assert not train_texts & test_texts
    assert set(world.category_counts(train)) == set(world.CATEGORIES)
    assert set(world.category_counts(test)) == set(world.CATEGORIES)
    assert 80 <= len(test) <= 200


def test_seen_split_is_held_out_but_built_from_training_parts():
    train, test, seen = (world.split_prompts(s) for s in ("train", "test", "test_seen"))
    assert seen == world.split_prompts("test_seen") and len(seen) == 48
    texts = [{p.text for p in split} for split in (train, test, seen)]
    assert not texts[0] & texts[2] and not texts[1] & texts[2]
    pairs = {(o.color, o.shape) for p in train for o in p.objects if o.color}
    shape_pairs = {frozenset(p.shapes) for p in train if p.category in ("two_object", "position")}
    relations = {p.relation.relation for p in train if p.relation is not None}
    for p in seen:
        assert all((o.color, o.shape) in pairs for o in p.objects if o.color), p.text
        if p.category in ("two_object", "position"):
            assert frozenset(p.shapes) in shape_pairs, p.text
        if p.relation is not None:
            assert p.relation.relation in relations
    # the novel-binding split keeps what makes it novel: a colour phrase it uses is never a training pair
    assert all(any((o.color, o.shape) not in pairs for o in p.objects) for p in test if p.category == "color_attr")


def test_balanced_prompt_source_weights_categories_equally():
    from diffalign.config import ConfigError
    from diffalign.training.finetuning import load_prompts

    plain = load_prompts("world:train", "prompts")
    balanced = load_prompts("world:train:balanced", "prompts")
    assert set(balanced) == set(plain)  # the same prompts, only repeated
    counts = world.category_counts(balanced)
    assert world.category_counts(plain)["color_attr"] > 50 * world.category_counts(plain)["single_object"]
    assert max(counts.values()) / min(counts.values()) < 1.1
    with pytest.raises(ConfigError, match="'prompts'.*'x'"):
        load_prompts("world:train:x", "prompts")
    with pytest.raises(ConfigError, match="unknown world split"):
        load_prompts("world:val", "prompts")


def _held_out_parts(spec: world.PromptSpec) -> list:
    """The held-out combinations a prompt uses."""
    o = spec.objects
    if spec.category == "single_object":
        return [o[0].shape] if o[0].shape in wp.TEST_SINGLE_SHAPES else []
    if spec.category == "two_object":
        pair = frozenset((o[0].shape, o[1].shape))
        return [pair] if pair in world.HELD_OUT_SHAPE_PAIRS else []
    if spec.category == "counting":
        key = (o[0].count, o[0].shape)
        return [key] if key in world.HELD_OUT_COUNTS else []
    if spec.category == "position":
        key = (o[0].shape, spec.relation.relation, o[1].shape)
        return [key] if key in world.HELD_OUT_POSITIONS else []
    return [(r.color, r.shape) for r in o if (r.color, r.shape) in world.HELD_OUT_COLOR_SHAPES]


def test_held_out_combinations_only_in_test():
    for spec in world.train_prompts():
        assert _held_out_parts(spec) == [], spec.text
    for spec in world.test_prompts():
        assert _held_out_parts(spec), spec.text
    # held-out colour phrases never appear in any training text
    train_text = " | ".join(s.text for s in world.train_prompts())
    for c, s in world.HELD_OUT_COLOR_SHAPES:
        assert f" {c} {s}" not in train_text


# --------------------------------------------------------------------------------------------- 4. rendering
def test_render_deterministic_and_valid():
    spec = world.PromptSpec.color_attr("green", "cross", "yellow", "square")
    s1 = sample_scene(spec, np.random.default_rng(7))
    s2 = sample_scene(spec, np.random.default_rng(7))
    s3 = sample_scene(spec, np.random.default_rng(8))
    assert s1 == s2 and s1 != s3
    a, b, c = render_scene(s1), render_scene(s2), render_scene(s3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for size in (32, 64, 96, 128):
        img = render_scene(sample_scene(spec, np.random.default_rng(0), size))
        assert img.shape == (3, size, size) and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
    big = render_scene(s1, size=128)  # re-render the 64-px scene at 128 px
    assert big.shape == (3, 128, 128)
    assert world.evaluate(big, spec).correct


def test_sampled_scenes_satisfy_spec():
    rng = np.random.default_rng(3)
    for spec in _balanced_specs(rng, 120):
        scene = sample_scene(spec, rng, distractors=int(rng.integers(0, 2)))
        boxes = [o.box for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 and 0 <= y0 and x1 <= scene.size and y1 <= scene.size
            assert 12 <= x1 - x0 <= 22
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[i], boxes[j]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0  # bounding squares disjoint
        for req in spec.objects:
            found = [o for o in scene.objects if o.shape == req.shape and req.color in (None, o.color)]
            assert len(found) >= req.count
        if spec.relation is not None:
            assert spec.relation.relation in scene.relations(0, 1)
        v = world.evaluate(render_scene(scene), spec)
        assert v.correct, (spec.text, v.details["checks"])


def test_grid_layout_scenes_satisfy_spec_and_only_their_relation():
    from diffalign.world.render import GRID_CELLS

    rng = np.random.default_rng(4)
    cell = 64 / GRID_CELLS
    for spec in _balanced_specs(rng, 120):
        scene = sample_scene(spec, rng, layout="grid")
        cells = {(int(o.x // cell), int(o.y // cell)) for o in scene.objects}
        assert len(cells) == len(scene.objects) == sum(r.count for r in spec.objects)
        assert len({o.radius for o in scene.objects}) == 1
        if spec.relation is not None:
            assert scene.relations(0, 1) == {spec.relation.relation}
        v = world.evaluate(render_scene(scene), spec)
        assert v.correct and v.graded == 1.0, (spec.text, v.details["checks"])
    with pytest.raises(ValueError, match="layout"):
        sample_scene(ALL_SPECS[0], rng, layout="spiral")


def test_dataset_examples_and_image_helpers():
    texts, images = world.dataset_examples(24, np.random.default_rng(0), split="test", size=48)
    assert len(texts) == 24 and images.shape == (24, 3, 48, 48) and images.dtype == np.float32
    test_texts = {s.text for s in world.test_prompts()}
    assert all(t in test_texts for t in texts)
    again, images2 = world.dataset_examples(24, np.random.default_rng(0), split="test", size=48)
    assert again == texts and np.array_equal(images, images2)
    verdicts = world.evaluate_batch(images, texts)
    assert all(v.correct for v in verdicts)
    # torch and PIL inputs give the same verdicts
    torch = pytest.importorskip("torch")
    tv = world.evaluate_batch(torch.from_numpy(images), texts)
    assert [v.correct for v in tv] == [v.correct for v in verdicts]
    pil = world.to_pil(images[0])
    assert pil.size == (48, 48)
    assert np.abs(world.from_pil(pil) - images[0]).max() <= 0.5 / 255 + 1e-6
    assert world.evaluate(pil, texts[0]).correct
    assert world.to_tensor(images[0]).shape == (3, 48, 48)


def test_summarize():
    specs = [world.PromptSpec.single_object("circle")] * 3 + [world.PromptSpec.counting(2, "square")]
    verdicts = [world.Verdict(True, 1.0), world.Verdict(False, 0.5), world.Verdict(True, 1.0)]
    verdicts.append(world.Verdict(False, 0.0))
    s = world.summarize(specs, verdicts)
    assert s["per_category"]["single_object"]["accuracy"] == pytest.approx(2 / 3)
    assert s["per_category"]["counting"]["accuracy"] == 0.0
    assert s["overall"] == pytest.approx(1 / 3)  # mean over categories
    assert s["image_accuracy"] == pytest.approx(0.5)
    assert s["mean_score"] == pytest.approx(0.625)
    lo, hi = s["mean_score_ci95"]  # clustered by prompt: sums 2.5 (3 images) and 0 (1) around 0.625 -> se 0.3125
    assert hi - 0.625 == pytest.approx(0.625 - lo) == pytest.approx(1.96 * 0.3125)
    assert s["n"] == 4
    lo, hi = s["image_accuracy_ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0
    lo, hi = s["overall_ci95"]
    assert lo < s["overall"] < hi
    assert s["per_category"]["counting"]["ci95"][0] == 0.0 < s["per_category"]["counting"]["ci95"][1]


def test_accuracy_interval_covers_at_the_nominal_rate():
    from diffalign.world.evaluator import accuracy_interval

    rng = np.random.default_rng(0)
    for p, n in ((0.05, 64), (0.3, 128), (0.8, 256)):
        draws = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (accuracy_interval(int(k), n) for k in draws)])
        assert 0.93 <= covered <= 0.98, (p, n, covered)
    lo, hi = accuracy_interval(50, 100)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.05, rel=0.05)
    with pytest.raises(ValueError):
        accuracy_interval(0, 0)


def test_label_components_matches_reference():
    rng = np.random.default_rng(0)
    ndimage = pytest.importorskip("scipy.ndimage")
    for _ in range(20):
        labels = rng.integers(-1, 3, size=(24, 31))
        labels[rng.random(labels.shape) < 0.3] = -1
        comps, n = label_components(labels)
        ref_n = 0
        for value in range(3):
            _, k = ndimage.label(labels == value, structure=np.ones((3, 3)))
            ref_n += k
        assert n == ref_n
        # same partition: pixels share a component iff they are 8-connected with the same label
        for value in range(3):
            ref, _ = ndimage.label(labels == value, structure=np.ones((3, 3)))
            sel = labels == value
            pairs = set(zip(ref[sel].tolist(), comps[sel].tolist(), strict=True))
            assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


# --------------------------------------------------------------------------------------------- 5. bad input
@pytest.mark.parametrize(
    "text",
    [
        "a photo of a hexagon",
        "a photo of a pink circle",
        "a picture of a circle",
        "a photo of five circles",
        "a photo of three circle",
        "a photo of a circles",
        "a photo of a red circle and a triangle",
        "a photo of a circle left of a circle",
        "a photo of a circle near a square",
        "",
    ],
)
def test_parse_prompt_rejects_bad_text(text):
    with pytest.raises(ValueError):
        world.parse_prompt(text)
    assert not world.is_world_prompt(text)


def test_is_world_prompt_accepts_every_split_prompt():
    assert all(world.is_world_prompt(s.text) for s in world.train_prompts() + world.test_prompts())


def test_bad_specs_and_scenes():
    with pytest.raises(ValueError, match="colour"):
        world.PromptSpec.colors("pink", "circle")
    with pytest.raises(ValueError, match="shape"):
        world.PromptSpec.single_object("hexagon")
    with pytest.raises(ValueError):
        world.PromptSpec.counting(5, "circle")
    with pytest.raises(ValueError):
        world.PromptSpec.position("circle", "behind", "square")
    with pytest.raises(ValueError):
        world.SceneObject("circle", "pink", 10.0, 10.0, 5.0)
    with pytest.raises(ValueError):
        sample_scene("a photo of a circle", np.random.default_rng(0), size=7)
    with pytest.raises(ValueError):
        world.split_prompts("val")


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((3, 64), np.float32),
        np.zeros((4, 64, 64), np.float32),
        np.zeros((64, 64, 3), np.float32),
        np.full((3, 64, 64), 1.5, np.float32),
        np.full((3, 64, 64), -0.2, np.float32),
        np.full((3, 64, 64), np.nan, np.float32),
        np.zeros((3, 64, 64), np.int64),
    ],
)
def test_evaluate_rejects_bad_images(image):
    with pytest.raises(ValueError):
        world.evaluate(image, "a photo of a circle")


def test_evaluate_batch_rejects_mismatch():
    with pytest.raises(ValueError):
        world.evaluate_batch(np.zeros((2, 3, 64, 64), np.float32), ["a photo of a circle"])
    with pytest.raises(ValueError):
        world.evaluate_batch(np.zeros((2, 64, 64), np.float32), ["a photo of a circle"] * 2)


# ------------------------------------------------------------------------------------------- graded credit
def _scene(*objects: tuple[str, str, float, float]) -> np.ndarray:
    """Render objects ``(shape, colour, x, y)`` of radius 7 on a 64 px canvas."""
    return render_scene(world.Scene(tuple(world.SceneObject(s, c, x, y, 7.0) for s, c, x, y in objects)))


def test_graded_credit_is_one_on_clean_correct_renders_and_one_only_when_correct():
    rng = np.random.default_rng(11)
    for spec in _balanced_specs(rng, 120):
        v = world.evaluate(render_scene(sample_scene(spec, rng)), spec)
        assert v.correct and v.graded == 1.0, (spec.text, v.details["checks"])
    for spec in _balanced_specs(rng, 120):
        other = ALL_SPECS[int(rng.integers(len(ALL_SPECS)))]
        v = world.evaluate(render_scene(sample_scene(other, rng)), spec)
        assert 0.0 <= v.graded <= 1.0
        assert (v.graded == 1.0) <= v.correct


@pytest.mark.parametrize("seed", range(6))
def test_graded_credit_never_rises_with_an_extra_object(seed):
    """Adding any object to a scene that already shows every requirement never raises the graded credit, while
    partial credit can be raised by drawing objects."""
    rng = np.random.default_rng(seed)
    for spec in _balanced_specs(rng, 24):
        scene = sample_scene(spec, rng)
        before = world.evaluate(render_scene(scene), spec)
        for shape in world.SHAPES:
            extra = sample_scene(world.PromptSpec.colors(world.COLOR_NAMES[int(rng.integers(6))], shape), rng)
            obj = extra.objects[0]
            if any(abs(obj.x - o.x) < obj.radius + o.radius + 3 and abs(obj.y - o.y) < obj.radius + o.radius + 3
                   for o in scene.objects):  # fmt: skip
                continue  # overlapping objects merge into one blob: not an added object
            after = world.evaluate(render_scene(world.Scene((*scene.objects, obj))), spec)
            assert after.graded <= before.graded + 1e-12, (spec.text, obj)


def test_ways_of_gaming_partial_credit_do_not_pay_under_graded_credit():
    # 1. blobs for the object count: one triangle of two, plus a circle
    two = "a photo of two triangles"
    one = world.evaluate(_scene(("triangle", "red", 16, 16)), two)
    padded = world.evaluate(_scene(("triangle", "red", 16, 16), ("circle", "blue", 46, 46)), two)
    assert padded.score > one.score and padded.graded < one.graded
    # 2. the asked colours on the wrong shapes (and bindings swapped)
    attr = "a photo of a red circle and a blue triangle"
    right = world.evaluate(_scene(("circle", "red", 16, 32), ("triangle", "blue", 46, 32)), attr)
    swapped = world.evaluate(_scene(("triangle", "red", 16, 32), ("circle", "blue", 46, 32)), attr)
    half = world.evaluate(_scene(("circle", "red", 16, 32)), attr)
    assert right.graded == 1.0 and swapped.score > 0.3
    assert swapped.graded < half.graded < right.graded
    # 3. scattering every colour and shape to collect colour and shape credits
    scatter = world.evaluate(
        _scene(("square", "red", 12, 12), ("cross", "blue", 52, 12), ("circle", "green", 12, 52),
               ("triangle", "yellow", 52, 52), ("circle", "blue", 32, 32)), attr)  # fmt: skip
    assert scatter.score > half.score and scatter.graded < half.graded
    # 4. position: objects present but not in the asked relation earn no relation credit
    pos = "a photo of a circle left of a square"
    left = world.evaluate(_scene(("circle", "red", 14, 32), ("square", "blue", 50, 32)), pos)
    mirrored = world.evaluate(_scene(("circle", "red", 50, 32), ("square", "blue", 14, 32)), pos)
    assert left.graded == 1.0 and mirrored.graded < 0.25


def test_graded_world_reward_and_its_errors():
    import torch

    from diffalign.rewards import RewardError, RewardSet
    from diffalign.rewards.world import WorldReward

    images = torch.from_numpy(np.stack([_scene(("circle", "red", 32, 32)), _scene(("square", "red", 32, 32))]))
    prompts = ["a photo of a red circle"] * 2
    values = WorldReward(mode="graded")(images, prompts)
    assert values.tolist()[0] == 1.0 and 0.0 < values.tolist()[1] < 0.3
    with pytest.raises(ValueError, match="mode"):
        WorldReward(mode="strict")
    with pytest.raises(RewardError, match="a photo of"):
        RewardSet({"world": WorldReward(mode="graded")})(images, ["a red circle on a table"] * 2)


def test_world_specialist_scores_its_categories_and_abstains_elsewhere():
    import torch

    from diffalign.rewards import build_reward

    images = torch.from_numpy(np.stack([_scene(("circle", "red", 32, 32)), _scene(("circle", "red", 32, 32))]))
    prompts = ["a photo of a red circle", "a photo of a circle"]  # colors / single_object
    values = build_reward("world_specialist", categories=["colors"])(images, prompts)
    assert values[0] == 1.0 and torch.isnan(values[1])
    with pytest.raises(ValueError, match="categories"):
        build_reward("world_specialist", categories=["colours"])
