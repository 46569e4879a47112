"""Rule-based rewards, the ``score`` and ``train-reward`` jobs and their command-line wiring."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.algorithms.reward_model import TrainRewardJob
from diffalign.cli import job_schema, main
from diffalign.config import ConfigError, load_config, read_kind
from diffalign.images import save_images
from diffalign.rewards import REWARDS, RewardConfig, build_reward
from diffalign.rewards.data import DataError
from diffalign.rewards.jpeg import JpegCompressibilityReward, JpegIncompressibilityReward, jpeg_sizes_kb
from diffalign.rewards.scoring import ScoreJob, run_score
from diffalign.world import render, sample_scene, train_prompts

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "rewards")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def world_folder(tmp_path) -> tuple[str, list[str]]:
    """Four world renders saved as PNGs, and their prompts."""
    rng = np.random.default_rng(0)
    specs = [train_prompts()[i] for i in (0, 9, 30, 61)]
    images = torch.from_numpy(np.stack([render(sample_scene(s, rng)) for s in specs]))
    folder = tmp_path / "images"
    save_images(images, folder)
    return str(folder), [s.text for s in specs]


# ------------------------------------------------------------------------------------------------------ jpeg
def test_jpeg_rewards_follow_ddpo():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    size = JpegIncompressibilityReward()(images, ["", ""])
    assert size[1] > 3 * size[0]
    buffer = io.BytesIO()
    Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=95
    )
    assert float(size[1]) == pytest.approx(buffer.tell() / 1000)  # kB, as ddpo-pytorch
    torch.testing.assert_close(JpegCompressibilityReward()(images, ["", ""]), -size)
    assert not JpegCompressibilityReward.differentiable
    assert float(jpeg_sizes_kb(noisy, quality=50)[0]) < float(size[1])
    assert REWARDS["jpeg_compressibility"] is JpegCompressibilityReward
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_incompressibility", quality=0)


# ------------------------------------------------------------------------------------------------------ score
def _score_job(**kw) -> ScoreJob:
    rewards = [{"name": "world"}, {"name": "jpeg_compressibility", "weight": 0.0},
               {"name": "jpeg_incompressibility", "label": "jpeg_kb", "weight": 0.0}]  # fmt: skip
    return load_config(ScoreJob, {"rewards": rewards, "device": "cpu", "batch_size": 3, **kw})


def test_run_score_with_a_prompt_file(tmp_path, world_folder, capsys):
    folder, prompts = world_folder
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = run_score(_score_job(), folder, str(tmp_path / "prompts.txt"), str(tmp_path / "out"))
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["reward", "n", "mean", "std", "min", "max"]
    assert {line.split()[0] for line in table.splitlines()[1:]} == {"world", "jpeg_compressibility", "jpeg_kb",
                                                                    "total"}  # fmt: skip
    rows = result["rows"]
    assert [r["file"] for r in rows] == sorted(os.listdir(folder)) and [r["prompt"] for r in rows] == prompts
    assert all(r["world"] == 1.0 and r["total"] == 1.0 for r in rows)  # clean renders satisfy their prompts
    assert all(r["jpeg_compressibility"] == pytest.approx(-r["jpeg_kb"]) for r in rows)
    with open(tmp_path / "out" / "scores.csv") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == 4 and float(table_rows[0]["jpeg_kb"]) == pytest.approx(rows[0]["jpeg_kb"])
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["summary"]["world"]["n"] == 4 and saved["summary"]["world"]["mean"] == 1.0
    assert read_kind(tmp_path / "out" / "config.yaml") == "score"


def test_run_score_with_an_index(tmp_path, world_folder):
    folder, prompts = world_folder
    files = sorted(os.listdir(folder))
    with open(os.path.join(folder, "index.jsonl"), "w") as f:  # as written by `diffalign sample`, a wrong prompt
        for i, (file, prompt) in enumerate(zip(files, prompts[::-1], strict=True)):
            f.write(json.dumps({"file": file, "prompt": prompt, "seed": 0, "index": i}) + "\n")
    rows = run_score(_score_job(), folder, None, str(tmp_path / "out"))["rows"]
    assert [r["prompt"] for r in rows] == prompts[::-1]
    assert any(r["world"] < 1 for r in rows)


def test_run_score_errors(tmp_path, world_folder):
    folder, prompts = world_folder
    (tmp_path / "short.txt").write_text("\n".join(prompts[:3]))
    with pytest.raises(DataError, match="3 prompts but .* 4 images"):
        run_score(_score_job(), folder, str(tmp_path / "short.txt"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no prompts"):
        run_score(_score_job(), folder, None, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="image folder"):
        run_score(_score_job(), str(tmp_path / "nothing"), str(tmp_path / "short.txt"), str(tmp_path / "out"))
    (tmp_path / "index.jsonl").write_text(json.dumps({"file": "missing.png", "prompt": "a photo of a circle"}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run_score(_score_job(), folder, str(tmp_path / "index.jsonl"), str(tmp_path / "out"))
    job = load_config(ScoreJob, {"rewards": [{"name": "nonexistent_reward"}]})
    (tmp_path / "all.txt").write_text("\n".join(prompts))
    with pytest.raises(ValueError, match="unknown reward 'nonexistent_reward'"):
        run_score(job, folder, str(tmp_path / "all.txt"), str(tmp_path / "out"))


def test_score_job_config_errors():
    with pytest.raises(ConfigError, match="rewards"):
        load_config(ScoreJob, {"device": "cpu"})
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(ScoreJob, {"rewards": [{"name": "world"}], "batch_size": 0})
    with pytest.raises(ConfigError, match="colour"):
        load_config(ScoreJob, {"rewards": [{"name": "world"}], "colour": 1})
    job = load_config(ScoreJob, {"rewards": [{"name": "world", "args": {"mode": "correct"}}]})
    assert job.rewards == [RewardConfig(name="world", args={"mode": "correct"})]
    with pytest.raises(ConfigError, match="'device'"):
        load_config(ScoreJob, {"rewards": [{"name": "world"}], "device": "tpu"})


def test_score_overrides_address_list_entries():
    """``rewards.1.args.path=...`` changes one entry of the list (it used to fail with "Cannot merge incompatible
    container types"); an index past the end or a word instead of an index fails naming the key."""
    path = os.path.join(CONFIGS, "score_world.yaml")
    job = load_config(ScoreJob, path, ["rewards.1.args.path=runs/x/model", "rewards[2].weight=0.25"])
    assert [r.name for r in job.rewards] == ["world", "artifact", "jpeg_compressibility"]
    assert job.rewards[1].args == {"path": "runs/x/model"} and job.rewards[1].weight == 0.5
    assert job.rewards[2].weight == 0.25
    job = load_config(ScoreJob, path, ["rewards=[{name: world}, {name: jpeg_compressibility, weight: 0}]"])
    assert [(r.name, r.weight) for r in job.rewards] == [("world", 1.0), ("jpeg_compressibility", 0.0)]
    for override, message in [("rewards.3.weight=1", r"'rewards\.3'.* 3 entries"),
                              ("rewards.first.weight=1", r"'rewards\.first'.*index"),
                              ("rewards.1.weight=heavy", r"rewards\[1\]\.weight"),
                              ("rewards.1.wieght=1", r"rewards\[1\]\.wieght")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(ScoreJob, path, [override])


def test_score_world_config_runs_out_of_the_box(tmp_path, world_folder, capsys):
    """The shipped score config needs nothing trained first (the artifact classifier ships as builtin:)."""
    folder, prompts = world_folder
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    argv = ["score", os.path.join(CONFIGS, "score_world.yaml"), "--images", folder, "--prompts",
            str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "out"), "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]
    assert len(rows) == 4 and all(0 <= r["artifact"] <= 1 and r["world"] == 1.0 for r in rows)


def test_score_skips_unreadable_images_and_reports_them(tmp_path, world_folder, caplog):
    folder, prompts = world_folder
    files = sorted(os.listdir(folder))
    with open(os.path.join(folder, files[1]), "r+b") as f:  # a truncated PNG
        f.truncate(60)
    with open(os.path.join(folder, files[2]), "wb") as f:  # not an image at all
        f.write(b"not a png")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    with caplog.at_level("WARNING", logger="diffalign.score"):
        result = run_score(_score_job(), folder, str(tmp_path / "prompts.txt"), str(tmp_path / "out"))
    assert [r["file"] for r in result["rows"]] == [files[0], files[3]]
    assert [s["file"] for s in result["skipped"]] == [files[1], files[2]]
    assert files[1] in caplog.text and files[2] in caplog.text
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert [s["file"] for s in saved["skipped"]] == [files[1], files[2]]
    for file in files[0], files[3]:
        with open(os.path.join(folder, file), "wb") as f:
            f.write(b"")
    with pytest.raises(DataError, match="none of the 4 images"):
        run_score(_score_job(), folder, str(tmp_path / "prompts.txt"), str(tmp_path / "out"))


# --------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_every_reward_config_loads(name):
    path = os.path.join(CONFIGS, name)
    job = load_config(job_schema(read_kind(path)), path)
    assert job.kind in ("score", "train-reward")


def test_train_reward_job_validation():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(TrainRewardJob, {"train": {"steps": 0}})
    with pytest.raises(ConfigError, match="data.train_path"):
        load_config(TrainRewardJob, {"data": {"source": "jsonl"}})
    with pytest.raises(ConfigError, match="data.artifacts"):
        load_config(TrainRewardJob, {"data": {"artifacts": ["jpeg"]}})
    with pytest.raises(ConfigError, match="model"):
        load_config(TrainRewardJob, {"model": "dpo"})


# ----------------------------------------------------------------------------------------------------- the CLI
def test_cli_score_and_train_reward(tmp_path, world_folder, capsys):
    folder, prompts = world_folder
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    cfg = tmp_path / "score.yaml"
    cfg.write_text("kind: score\nrewards:\n  - name: world\n  - name: jpeg_compressibility\n")
    assert main(["score", str(cfg), "--images", folder, "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "scores"), "device=cpu", "batch_size=2"]) == 0  # fmt: skip
    assert "jpeg_compressibility" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "scores" / "scores.csv")

    train_cfg = os.path.join(CONFIGS, "train_artifact_world.yaml")
    assert main(["train-reward", train_cfg, f"output_dir={tmp_path / 'art'}", "device=cpu", "progress=false",
                 "train.steps=2", "data.num_train=16", "data.num_eval=8", "arch.channels=[4,8]"]) == 0  # fmt: skip
    weights = tmp_path / "art" / "model" / "model.safetensors"
    assert os.path.isfile(weights)
    assert os.stat(weights).st_mode & 0o777 == os.stat(tmp_path / "art" / "model" / "config.json").st_mode & 0o777

    assert main(["score", train_cfg, "--images", folder, "--out", str(tmp_path / "x")]) == 2
    assert "is a 'train-reward' config" in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    assert main(["score", str(cfg), "--images", folder, "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "artifact": 1}\nnot json\n')  # bad data: one line
    assert main(["train-reward", train_cfg, "data.source=jsonl", f"data.train_path={tmp_path / 'bad.jsonl'}",
                 f"output_dir={tmp_path / 'bad'}", "device=cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:2: not valid JSON" in err
