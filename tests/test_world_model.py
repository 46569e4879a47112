"""The shipped world base model: loads with plain diffusers, draws world images, and its documented held-out
evaluation reproduces exactly."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffalign.config import load_config
from diffalign.pipelines import resolve_model_path
from diffalign.recipes.world_eval import EvalJob, run_eval
from diffalign.world import classify_pixels, test_prompts

MODEL = resolve_model_path("builtin:world-sd3")


def test_plain_diffusers_loads_and_generates_world_images():
    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a photo of a red circle", "a photo of three squares"], height=64, width=64,
                  num_inference_steps=20, guidance_scale=3.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 64, 64, 3)
    # images of the world: mostly the light background, plus objects in the world's palette colours
    assert np.median(images) > 0.8
    for img in images:
        palette_pixels = (classify_pixels(img.transpose(2, 0, 1)) >= 0).sum()
        assert palette_pixels >= 20, palette_pixels


def test_documented_evaluation_reproduces(tmp_path):
    """``diffalign eval`` on the shipped model gives exactly the numbers stored beside it (and in the README)."""
    with open(os.path.join(MODEL, "eval.json")) as f:
        documented = json.load(f)
    job = load_config(EvalJob, {"out_dir": str(tmp_path / "a")})
    assert len(test_prompts()) * job.images_per_prompt == documented["n"]
    summary = run_eval(job)
    assert summary["overall"] == pytest.approx(documented["overall"], abs=1e-9)
    for category, row in documented["per_category"].items():
        assert summary["per_category"][category]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-9), category
        assert summary["per_category"][category]["n"] == row["n"]
    assert (tmp_path / "a" / "grid.png").exists() and (tmp_path / "a" / "eval.json").exists()


@pytest.mark.slow
def test_evaluation_is_stable_across_runs(tmp_path):
    first = run_eval(load_config(EvalJob, {"out_dir": str(tmp_path / "a")}))
    second = run_eval(load_config(EvalJob, {"out_dir": str(tmp_path / "b"), "batch_size": 7}))
    assert first == second


def test_shipped_artifact_model_separates_clean_and_corrupted_renders():
    from diffalign.rewards import ArtifactReward
    from diffalign.rewards.artifacts import ARTIFACT_KINDS, apply_artifact
    from diffalign.world import parse_prompt, render, sample_scene

    rng = np.random.default_rng(123)
    prompts = [p.text for p in test_prompts()[:40]]
    clean = torch.from_numpy(np.stack([render(sample_scene(parse_prompt(p), rng)) for p in prompts]))
    reward = ArtifactReward()  # builtin:world-artifact
    p_clean = reward(clean, prompts)
    assert (p_clean > 0.5).float().mean() >= 0.95
    g = torch.Generator().manual_seed(0)
    for kind in ARTIFACT_KINDS:
        corrupted = apply_artifact(clean, kind, 0.6, g).clamp(0, 1)
        assert (reward(corrupted, prompts) < 0.5).float().mean() >= 0.9, kind
