"""RAFT (reward-filtered fine-tuning) on tiny real models: it keeps the best samples, trains only the LoRA, resumes
exactly, and rejects bad configs (its learning test on the world base is in ``test_learning.py``)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign.algorithms.raft import RAFTJob, RAFTTrainer
from diffalign.config import ConfigError, load_config
from diffalign.pipelines import load_flow_model
from diffalign.pipelines.tiny import build_tiny
from diffalign.training.loop import TrainContext, run_training

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("raft")
    build_tiny("sd3").save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _job(root, out, **overrides):
    data = {
        "output_dir": str(out), "seed": 5,
        "model": {"family": "sd3", "path": str(root / "sd3"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(root / "prompts.txt"),
        "eval_sets": {"train": {"prompts": str(root / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"epochs": 2, "lr": 3e-3, "ema_decay": 0.0, "eval_every": 10, "checkpoint_every": 1,
                  "eval_images_per_prompt": 8, "keep_checkpoints": 5},
        "sampling": {"num_steps": 4, "height": 32, "width": 32, "guidance_scale": 2.0},
        "raft": {"prompts_per_round": 2, "samples_per_prompt": 8, "keep": 2, "steps_per_round": 4, "batch_size": 4,
                 "sample_batch": 8, "anchor": 0.1},
    }  # fmt: skip
    return load_config(RAFTJob, data, [f"{k}={v}" for k, v in overrides.items()])


def test_raft_trains_only_the_lora(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    run_training(_job(tiny, out), RAFTTrainer)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["kept"] for r in history if "kept" in r] == [4.0, 4.0]  # 2 prompts x keep 2 per round
    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k for k in lora)
    base = load_flow_model("sd3", str(tiny / "sd3"))
    tuned = load_flow_model("sd3", str(tiny / "sd3"), lora=str(out / "final"))
    x, t = torch.randn(2, *base.latent_shape(32, 32)), torch.tensor([0.5, 0.5])
    cond = base.encode_prompt(PROMPTS)
    with torch.no_grad():
        assert not torch.allclose(base.velocity(x, t, cond), tuned.velocity(x, t, cond))


def test_raft_resumes_identically(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    run_training(_job(tiny, out), RAFTTrainer)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    shutil.rmtree(resumed / "final")
    run_training(_job(tiny, resumed), RAFTTrainer)
    a = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raft_bad_configs(tiny, tmp_path):
    with pytest.raises(ConfigError, match="raft.keep"):
        _job(tiny, tmp_path / "a", **{"raft.keep": 9})
    with pytest.raises(ConfigError, match="raft.replay"):
        RAFTTrainer(TrainContext(_job(tiny, tmp_path / "b", **{"raft.replay": 0.5})))
