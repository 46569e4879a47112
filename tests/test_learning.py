"""Learning tests: every training algorithm raises a dense reward on the shipped world base within a few minutes on
one core, judged under the evaluation sampler (20 ODE steps, CFG 3) on fresh seeds. A change that stops an
algorithm from learning fails here."""

import json

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
from diffalign.algorithms.nft import NFTJob, NFTTrainer
from diffalign.algorithms.raft import RAFTJob, RAFTTrainer
from diffalign.config import load_config
from diffalign.training.loop import run_training

PROMPT = "a photo of a red square"


def _common(tmp_path, epochs: int) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    return {
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"family": "sd3", "path": "builtin:world-sd3", "max_sequence_length": 16},
        "lora": {"rank": 16, "alpha": 32}, "prompts": str(prompts),
        "eval_sets": {"red": {"prompts": str(prompts), "images_per_prompt": 16}},
        "rewards": [{"name": "reward_fixtures:RedFraction"}],
        "train": {"epochs": epochs, "lr": 1e-3, "ema_decay": 0.0, "eval_every": epochs, "checkpoint_every": epochs},
        "sampling": {"num_steps": 20, "height": 64, "width": 64, "guidance_scale": 3.0},
    }  # fmt: skip


def _gain(tmp_path) -> tuple[float, float]:
    before = json.loads((tmp_path / "run" / "eval_before.json").read_text())["red/reward/total"]
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())["red/reward/total"]
    return before, after


def test_flow_grpo_raises_a_dense_reward(tmp_path, one_thread):
    data = _common(tmp_path, epochs=16)
    data["flow_grpo"] = {"prompts_per_epoch": 4, "group_size": 8, "batch_size": 32, "num_steps": 10,
                         "guidance_scale": 3.0, "window": "random", "window_size": 2, "window_range": [0, 6],
                         "clip_range": 1e-3, "beta": 0.0, "updates_per_epoch": 4}  # fmt: skip
    run_training(load_config(FlowGRPOJob, data), FlowGRPOTrainer)
    before, after = _gain(tmp_path)
    assert after > 2.0 * before, (before, after)


def test_raft_raises_a_dense_reward(tmp_path, one_thread):
    data = _common(tmp_path, epochs=6)
    data["raft"] = {"prompts_per_round": 1, "samples_per_prompt": 32, "keep": 4, "steps_per_round": 8,
                    "batch_size": 16, "sample_batch": 32}  # fmt: skip
    run_training(load_config(RAFTJob, data), RAFTTrainer)
    before, after = _gain(tmp_path)
    assert after > 1.5 * before, (before, after)


def test_nft_raises_a_dense_reward(tmp_path, one_thread):
    """CFG-free rollouts and training (DiffusionNFT's default), judged under the CFG evaluation sampler."""
    data = _common(tmp_path, epochs=12)
    data["nft"] = {"prompts_per_epoch": 1, "group_size": 32, "batch_size": 32, "num_steps": 10,
                   "updates_per_epoch": 4}  # fmt: skip
    run_training(load_config(NFTJob, data), NFTTrainer)
    before, after = _gain(tmp_path)
    assert after > 2.0 * before, (before, after)
