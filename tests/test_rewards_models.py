"""Trainable reward models: artifact synthesis, world data, save/load, training on the embedded world."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffalign.algorithms.reward_model import TrainRewardJob, build_model, train_reward
from diffalign.config import load_config
from diffalign.rewards import REWARDS, build_reward
from diffalign.rewards.artifacts import ARTIFACT_KINDS, add_random_artifacts, apply_artifact, mild_variation
from diffalign.rewards.data import load_data, perturb_prompt, save_data, to_float, world_labeled, world_pairs
from diffalign.rewards.hub import CheckpointError
from diffalign.rewards.models import (
    ArtifactModel,
    ArtifactReward,
    MultiAspectModel,
    MultiAspectReward,
    PreferenceModel,
    PreferenceModelReward,
    load_reward_model,
)
from diffalign.world import evaluate, render, sample_scene, train_prompts

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "rewards")

#: Tiny sizes for fast tests (the recipes in configs/rewards/ are larger).
TINY_ARCH = {"vision_width": 8, "text_width": 32, "text_layers": 1, "heads": 2, "embed_dim": 32, "head_hidden": 32,
             "patch_size": 16, "channels": [8, 16]}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _renders(n: int = 4, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    specs = train_prompts()
    return torch.from_numpy(np.stack([render(sample_scene(specs[7 * i], rng)) for i in range(n)]))


def _job(tmp_path, model: str, **overrides) -> TrainRewardJob:
    cfg = {"model": model, "output_dir": str(tmp_path / model), "device": "cpu", "progress": False,
           "arch": dict(TINY_ARCH), "data": {"num_train": 24, "num_eval": 8, "num_train_pairs": 8},
           "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1}}  # fmt: skip
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[key] = value
    return load_config(TrainRewardJob, cfg)


# ------------------------------------------------------------------------------------------------ artifacts
@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_each_artifact_changes_the_image_and_stays_in_range(kind):
    images = _renders()
    for severity in (0.0, 1.0):
        out = apply_artifact(images, kind, severity, torch.Generator().manual_seed(0))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        assert (out - images).abs().mean() > 2e-3, (kind, severity)
    weak = apply_artifact(images, kind, 0.0, torch.Generator().manual_seed(0))
    strong = apply_artifact(images, kind, 1.0, torch.Generator().manual_seed(0))
    assert (strong - images).abs().mean() > (weak - images).abs().mean()


def test_artifact_synthesis_is_reproducible_and_labelled():
    images = _renders(8)
    a, ids_a, sev_a = add_random_artifacts(images, torch.Generator().manual_seed(3), min_severity=0.25)
    b, ids_b, sev_b = add_random_artifacts(images, torch.Generator().manual_seed(3), min_severity=0.25)
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b) and torch.equal(sev_a, sev_b)
    assert ((sev_a >= 0.25) & (sev_a <= 1)).all() and set(ids_a.tolist()) <= set(range(len(ARTIFACT_KINDS)))
    clean = mild_variation(images, torch.Generator().manual_seed(0))
    assert (clean - images).abs().max() < 0.05
    with pytest.raises(ValueError, match="unknown artifact"):
        apply_artifact(images, "jpeg", 0.5)


# ---------------------------------------------------------------------------------------------- world data
def test_perturbed_prompts_differ_and_pairs_follow_the_evaluator():
    rng = np.random.default_rng(0)
    for spec in train_prompts()[::7]:
        perturbed, change = perturb_prompt(spec, rng)
        assert perturbed != spec and change in {"shape", "color", "count", "relation", "binding", "missing"}
    pairs = world_pairs(24, seed=0, quality_fraction=0.25)
    assert len(pairs) == 24 and pairs.chosen.dtype == torch.uint8
    assert sum(k.startswith("quality:") for k in pairs.kinds) == 6
    for i, kind in enumerate(pairs.kinds):
        if kind.startswith("alignment:"):
            good = evaluate(to_float(pairs.chosen[i]), pairs.prompts[i]).score
            bad = evaluate(to_float(pairs.rejected[i]), pairs.prompts[i]).score
            assert good > bad, (pairs.prompts[i], kind)
    again = world_pairs(24, seed=0, quality_fraction=0.25)
    assert torch.equal(again.chosen, pairs.chosen) and again.kinds == pairs.kinds


def test_world_labels():
    data = world_labeled(30, seed=1, split="test", violation_fraction=0.5, artifact_fraction=0.5)
    t = data.targets
    clean = torch.tensor([k == "clean" for k in data.kinds])
    assert torch.equal(t["artifacts"], clean.float())
    assert torch.allclose(t["aesthetics"][clean], torch.ones(int(clean.sum())))
    assert (t["aesthetics"][~clean] <= 0.75 + 1e-6).all()
    assert ((t["alignment"] >= 0) & (t["alignment"] <= 1)).all() and (t["alignment"] < 1).any()


def test_jsonl_round_trip(tmp_path):
    pairs = world_pairs(6, seed=2)
    loaded = load_data(save_data(pairs, str(tmp_path / "pairs")), 64)
    assert torch.equal(loaded.chosen, pairs.chosen) and loaded.prompts == pairs.prompts
    labeled = world_labeled(6, seed=2)
    loaded = load_data(save_data(labeled, str(tmp_path / "labeled")), 64, aspects=["alignment"])
    assert torch.equal(loaded.images, labeled.images)
    torch.testing.assert_close(loaded.targets["alignment"], labeled.targets["alignment"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"), 64)


# ------------------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize(
    "model, arch",
    [("preference", {}), ("preference", {"backbone": "transformers", "vision": "vit", "vision_width": 32,
                                         "vision_layers": 1, "head": "cosine"}),
     ("artifact", {}), ("multi_aspect", {"vision": "vit", "vision_width": 32, "vision_layers": 1})],
)  # fmt: skip
def test_save_load_gives_identical_scores(tmp_path, model, arch):
    job = _job(tmp_path, model, **{f"arch.{k}": v for k, v in arch.items()})
    net = build_model(job).eval()
    net.save_pretrained(tmp_path / "saved")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "saved"))
    loaded = load_reward_model(str(tmp_path / "saved"))
    assert type(loaded) is type(net)
    images, prompts = _renders(3), ["a photo of a circle", "a photo of two squares", "a photo of a red cross"]
    with torch.no_grad():
        if model == "artifact":
            assert torch.equal(net(images), loaded(images))
        elif model == "multi_aspect":
            a, b = net(images, prompts), loaded(images, prompts)
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(net(images, prompts), loaded(images, prompts))
    reward = build_reward({"preference": "preference_model", "artifact": "artifact"}.get(model, model),
                          path=str(tmp_path / "saved"))  # fmt: skip
    images.requires_grad_()
    scores = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


def test_multi_aspect_reward_returns_every_aspect(tmp_path):
    build_model(_job(tmp_path, "multi_aspect")).save_pretrained(tmp_path / "m")
    reward = MultiAspectReward(str(tmp_path / "m"), aspect="artifacts")
    images, prompts = _renders(2), ["a photo of a circle", "a photo of a square"]
    aspects = reward.all_aspects(images, prompts)
    assert list(aspects) == ["alignment", "aesthetics", "artifacts"]
    assert all(v.shape == (2,) and ((v >= 0) & (v <= 1)).all() for v in aspects.values())
    torch.testing.assert_close(reward(images, prompts), aspects["artifacts"])
    with pytest.raises(ValueError, match="unknown aspect 'style'"):
        MultiAspectReward(str(tmp_path / "m"), aspect="style")


def test_bad_model_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ArtifactReward(str(tmp_path / "does-not-exist"))
    ArtifactModel(channels=[4, 8]).save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="'artifact' model, not a 'preference'"):
        PreferenceModelReward(str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        ArtifactReward(str(tmp_path / "a"))
    ArtifactModel(channels=[4, 8]).save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg | {"channels": [4, 16]}))
    with pytest.raises(CheckpointError, match="do not fit"):
        ArtifactReward(str(tmp_path / "b"))
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg | {"model_type": "nonsense"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'nonsense'"):
        load_reward_model(str(tmp_path / "b"))


def test_registry_has_the_trainable_rewards():
    assert REWARDS["preference_model"] is PreferenceModelReward and REWARDS["artifact"] is ArtifactReward
    assert REWARDS["multi_aspect"] is MultiAspectReward
    assert issubclass(MultiAspectModel, torch.nn.Module) and issubclass(PreferenceModel, torch.nn.Module)


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("model", ["preference", "artifact", "multi_aspect"])
def test_train_reward_writes_model_metrics_and_config(tmp_path, model):
    job = _job(tmp_path, model)
    metrics = train_reward(job)
    out = tmp_path / model
    assert {"model", "metrics.json", "config.yaml"} <= set(os.listdir(out))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 3 and set(saved["held_out"]) == {"seen_prompts", "novel_prompts"}
    assert saved["held_out"] == json.loads(json.dumps(metrics["held_out"]))
    assert load_config(TrainRewardJob, str(out / "config.yaml")) == job
    load_reward_model(str(out / "model"))


def test_regression_objective_and_jsonl_training(tmp_path):
    metrics = train_reward(_job(tmp_path, "preference", **{"train.objective": "regression"}))
    assert "rating" in metrics["held_out"]["seen_prompts"] and "pairs_eval" in metrics["held_out"]["seen_prompts"]
    export = tmp_path / "export"
    train_reward(_job(tmp_path, "artifact", **{"data.export_dir": str(export)}))
    job = _job(tmp_path, "artifact", output_dir=str(tmp_path / "from_jsonl"),
               **{"data.source": "jsonl", "data.train_path": str(export / "train" / "data.jsonl"),
                  "data.eval_path": str(export / "seen_prompts" / "data.jsonl")})  # fmt: skip
    metrics = train_reward(job)
    assert set(metrics["held_out"]) == {"held_out"} and metrics["held_out"]["held_out"]["examples"] == 8
    train_path = str(export / "train" / "data.jsonl")
    bad = _job(tmp_path, "preference", **{"data.source": "jsonl", "data.train_path": train_path})
    with pytest.raises(ValueError, match="needs pair data"):
        train_reward(bad)


def test_artifact_model_detects_artifacts_on_held_out_world_images(tmp_path):
    """The recipe, shortened: >= 95% held-out accuracy on fresh renders of seen and unseen prompts."""
    job = load_config(TrainRewardJob, os.path.join(CONFIGS, "train_artifact_world.yaml"),
                      [f"output_dir={tmp_path}", "device=cpu", "progress=false", "data.num_train=1200",
                       "data.num_eval=250", "train.steps=250"])  # fmt: skip
    metrics = train_reward(job)
    for split in ("seen_prompts", "novel_prompts"):
        assert metrics["held_out"][split]["accuracy"] >= 0.95, metrics["held_out"][split]


@pytest.mark.slow
def test_preference_model_beats_chance_on_held_out_pairs(tmp_path):
    job = load_config(TrainRewardJob, os.path.join(CONFIGS, "train_preference_world.yaml"),
                      [f"output_dir={tmp_path}", "device=cpu", "progress=false", "data.num_eval=400"])  # fmt: skip
    metrics = train_reward(job)
    seen = metrics["held_out"]["seen_prompts"]
    assert seen["pair_accuracy"] >= 0.8, seen  # measured 0.87-0.90 (benchmarks/rewards_train.py)
    assert seen["by_kind"]["quality"] >= 0.95 and seen["by_kind"]["alignment"] >= 0.7, seen
    reward = PreferenceModelReward(os.path.join(tmp_path, "model"))
    pairs = world_pairs(50, seed=123, quality_fraction=0.0)
    wins = reward(to_float(pairs.chosen), pairs.prompts) > reward(to_float(pairs.rejected), pairs.prompts)
    assert wins.float().mean() > 0.55


@pytest.mark.slow
def test_multi_aspect_model_learns_each_head(tmp_path):
    job = load_config(TrainRewardJob, os.path.join(CONFIGS, "train_multi_aspect_world.yaml"),
                      [f"output_dir={tmp_path}", "device=cpu", "progress=false", "data.num_eval=400"])  # fmt: skip
    seen = train_reward(job)["held_out"]["seen_prompts"]
    assert seen["artifacts"]["accuracy"] >= 0.95, seen
    assert seen["aesthetics"]["pearson"] >= 0.8, seen
    assert seen["alignment_pairs"]["pair_accuracy"] >= 0.7, seen  # measured 0.78


def test_save_pretrained_replaces_the_folder_whole(tmp_path):
    """A save goes to a temporary sibling and is renamed into place: an older (here corrupt) folder is replaced
    entirely, the saved model loads exactly, and no temporary folder is left behind."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="holds other files"):
        ArtifactModel(channels=[4, 8]).save_pretrained(other)
    assert (other / "keep.txt").read_text() == "not a model"
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\x00garbage" * 20)
    (target / "stale.txt").write_text("from an older save")
    model = ArtifactModel(channels=[4, 8])
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "notes"]
    assert not (target / "stale.txt").exists()
    loaded = load_reward_model(str(target))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
