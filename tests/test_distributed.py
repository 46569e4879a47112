"""A real 2-process CPU run (accelerate, gloo): ranks stay identical, advantages match one process."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffalign.algorithms.flow_grpo import group_advantages
from diffalign.pipelines.tiny import build_tiny

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_flow_grpo_epoch(tmp_path):
    build_tiny("sd3").save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\nthree crosses\n")
    config = {
        "kind": "train", "algorithm": "flow_grpo", "output_dir": str(tmp_path / "run"), "seed": 1,
        "model": {"family": "sd3", "path": str(tmp_path / "sd3"), "device": "cpu"},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(tmp_path / "prompts.txt"),
        "eval_prompts": str(tmp_path / "prompts.txt"), "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"lr": 0.01},
        "sampling": {"num_steps": 2, "height": 32, "width": 32},
        "flow_grpo": {"prompts_per_epoch": 2, "group_size": 4, "batch_size": 2, "num_steps": 3,
                      "guidance_scale": 1.0, "beta": 0.0, "clip_range": 0.2},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    pythonpath = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(HERE, "ddp_worker.py"), str(path), str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"accelerate launch failed:\n{result.stderr[-3000:]}")
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert int(r0["world"]) == 2
    lora = [k for k in r0 if k.startswith("lora.")]
    assert lora and all(torch.equal(r0[k], r1[k]) for k in lora), "ranks diverged after the DDP update"
    assert any(r0[k].abs().sum() > 0 for k in lora if "lora_B" in k), "the update did not change lora_B"
    # the advantages each rank used equal one process's computation on the same (gathered) samples
    rewards = torch.cat([r0["rewards"], r1["rewards"]])
    expected = group_advantages(rewards, r0["groups"], global_std=True)
    torch.testing.assert_close(torch.cat([r0["advantages"], r1["advantages"]]), expected)
    assert torch.equal(r0["groups"], r1["groups"])
