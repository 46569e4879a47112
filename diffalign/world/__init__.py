"""The embedded world: a procedural compositional text-to-image world, our offline stand-in for GenEval.

Flat-coloured shapes on a plain canvas, GenEval-style prompts ("a photo of a red circle and a blue
triangle"), a deterministic renderer, fixed train/test prompt sets with held-out combinations, and a
rule-based evaluator used both as RL reward and as benchmark metric.

Example::

    import numpy as np
    from diffalign import world

    spec = world.parse_prompt("a photo of a circle left of a square")
    scene = world.sample_scene(spec, np.random.default_rng(0))
    image = world.render(scene)  # float32 (3, 64, 64) in [0, 1]
    verdict = world.evaluate(image, spec)  # verdict.correct, verdict.score
"""

from diffalign.world.evaluator import (
    DetectedObject,
    Verdict,
    classify_pixels,
    detect_objects,
    evaluate,
    evaluate_batch,
    judge,
    label_components,
    summarize,
)
from diffalign.world.prompts import (
    CATEGORIES,
    HELD_OUT_COLOR_SHAPES,
    HELD_OUT_COUNTS,
    HELD_OUT_POSITIONS,
    HELD_OUT_SHAPE_PAIRS,
    ObjectReq,
    PromptSpec,
    Relation,
    as_spec,
    category_counts,
    is_world_prompt,
    parse_prompt,
    prompts_by_category,
    split_prompts,
    test_prompts,
    train_prompts,
)
from diffalign.world.render import (
    dataset_examples,
    from_pil,
    image_to_array,
    iter_examples,
    render,
    sample_scene,
    to_pil,
    to_tensor,
)
from diffalign.world.scene import (
    BACKGROUND,
    COLOR_NAMES,
    COLORS,
    DEFAULT_SIZE,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    relations_between,
    shape_mask,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "COLOR_NAMES",
    "DEFAULT_SIZE",
    "HELD_OUT_COLOR_SHAPES",
    "HELD_OUT_COUNTS",
    "HELD_OUT_POSITIONS",
    "HELD_OUT_SHAPE_PAIRS",
    "NUMBER_WORDS",
    "PLURALS",
    "RELATIONS",
    "SHAPES",
    "DetectedObject",
    "ObjectReq",
    "PromptSpec",
    "Relation",
    "Scene",
    "SceneObject",
    "Verdict",
    "as_spec",
    "is_world_prompt",
    "category_counts",
    "classify_pixels",
    "dataset_examples",
    "detect_objects",
    "evaluate",
    "evaluate_batch",
    "from_pil",
    "image_to_array",
    "iter_examples",
    "judge",
    "label_components",
    "parse_prompt",
    "prompts_by_category",
    "relations_between",
    "render",
    "sample_scene",
    "shape_mask",
    "split_prompts",
    "summarize",
    "test_prompts",
    "to_pil",
    "to_tensor",
    "train_prompts",
]
