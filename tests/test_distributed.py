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


def _tiny_job(tmp_path, **train) -> str:
    """A tiny SD3 Flow-GRPO job (prompts, reward fixture, 2 prompts x 4 samples per epoch); returns its path."""
    build_tiny("sd3").save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\nthree crosses\n")
    config = {
        "kind": "train", "algorithm": "flow_grpo", "output_dir": str(tmp_path / "run"), "seed": 1,
        "model": {"family": "sd3", "path": str(tmp_path / "sd3"), "device": "cpu"},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(tmp_path / "prompts.txt"),
        "eval_sets": {"eval": {"prompts": str(tmp_path / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"lr": 0.01, **train},
        "sampling": {"num_steps": 2, "height": 32, "width": 32},
        "flow_grpo": {"prompts_per_epoch": 2, "group_size": 4, "batch_size": 2, "num_steps": 3,
                      "guidance_scale": 1.0, "beta": 0.0, "clip_range": 0.2},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _launch(script: str, *args: str) -> None:
    """``accelerate launch`` two CPU processes (gloo) running ``tests/<script>`` with ``args``."""
    pythonpath = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(HERE, script), *args]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"accelerate launch {script} {' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")


def test_two_process_flow_grpo_epoch(tmp_path):
    _launch("ddp_worker.py", _tiny_job(tmp_path), str(tmp_path))
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


def test_two_process_dmd_keeps_ranks_identical(tmp_path):
    """DMD2 under DDP: both adapters (generator and fake score) stay identical across ranks after generator and
    fake-score steps, the stop step of the backward simulation is the same on both, their samples are not."""
    build_tiny("sd3").save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\nthree crosses\n")
    config = {
        "kind": "train", "algorithm": "dmd", "output_dir": str(tmp_path / "run"), "seed": 2,
        "model": {"family": "sd3", "path": str(tmp_path / "sd3"), "device": "cpu", "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(tmp_path / "prompts.txt"),
        "eval_sets": {"eval": {"prompts": str(tmp_path / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"epochs": 6, "lr": 3e-3, "eval_every": 100, "checkpoint_every": 100, "eval_images_per_prompt": 1},
        "sampling": {"num_steps": 6, "height": 32, "width": 32, "guidance_scale": 2.0},
        "dmd": {"generator_every": 2, "batch_size": 2},
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    _launch("dmd_worker.py", str(tmp_path / "job.yaml"), str(tmp_path))
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    lora = [k for k in r0 if "lora_" in k]
    for adapter in (".default.", ".fake_score."):
        names = [k for k in lora if adapter in k]
        assert names and all(torch.equal(r0[k], r1[k]) for k in names), f"ranks diverged in {adapter}"
        assert any(r0[k].abs().sum() > 0 for k in names if "lora_B" in k), f"{adapter} did not train"
    assert torch.equal(r0["stops"], r1["stops"]) and len(set(r0["stops"].tolist())) > 1
    assert not torch.equal(r0["fingerprints"], r1["fingerprints"])  # each rank draws its own samples


@pytest.fixture(scope="module")
def sharded_job(tmp_path_factory):
    """A tiny SD3 Flow-GRPO job for the 2-process runs (EMA every step, a checkpoint every epoch)."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    job = _tiny_job(tmp_path, epochs=3, ema_decay=0.5, ema_every=1, checkpoint_every=1, eval_every=3,
                    eval_images_per_prompt=1)  # fmt: skip
    return tmp_path, job


def _lora(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def test_fsdp2_lora_matches_ddp_and_resumes_identically(sharded_job):
    tmp_path, job = sharded_job
    _launch("train_worker.py", "fsdp", job, f"output_dir={tmp_path / 'fsdp'}")
    _launch("train_worker.py", "ddp", job, f"output_dir={tmp_path / 'ddp'}")
    _launch("train_worker.py", "fsdp", job, f"output_dir={tmp_path / 'resumed'}", "train.epochs=2")
    _launch("train_worker.py", "fsdp", job, f"output_dir={tmp_path / 'resumed'}")  # resumes from epoch 2
    sharded, ddp, resumed = _lora(tmp_path / "fsdp"), _lora(tmp_path / "ddp"), _lora(tmp_path / "resumed")
    assert sharded.keys() == ddp.keys() == resumed.keys()
    assert any(v.abs().max() > 1e-3 for k, v in sharded.items() if "lora_B" in k), "training did not move lora_B"
    for key in sharded:  # the sharded run takes the same steps as DDP (up to the order of float reductions)
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-4, atol=1e-5)
        assert torch.equal(sharded[key], resumed[key]), f"{key}: kill-and-resume under FSDP2 diverged"


def test_fsdp2_full_fine_tuning_exports_a_stock_transformer(sharded_job):
    from diffusers import SD3Transformer2DModel

    tmp_path, job = sharded_job
    _launch("train_worker.py", "fsdp", job, f"output_dir={tmp_path / 'full'}", "lora.rank=0", "train.lr=0.001",
            "train.epochs=1")  # fmt: skip
    tuned = SD3Transformer2DModel.from_pretrained(str(tmp_path / "full" / "final")).state_dict()
    base = SD3Transformer2DModel.from_pretrained(str(tmp_path / "sd3"), subfolder="transformer").state_dict()
    assert tuned.keys() == base.keys()
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert len(changed) >= len(base) - 1, f"only {len(changed)} of {len(base)} tensors were trained"
    # checkpoints hold whole tensors (gathered from the shards), not one process's shard
    checkpoint = load_file(str(tmp_path / "full" / "checkpoints" / "step-000001" / "modules" / "policy.safetensors"))
    params = dict(
        SD3Transformer2DModel.from_pretrained(str(tmp_path / "sd3"), subfolder="transformer").named_parameters()
    )
    assert checkpoint.keys() == params.keys()
    assert all(checkpoint[k].shape == params[k].shape for k in params)


def test_a_two_process_checkpoint_resumes_in_one_process(sharded_job):
    """Checkpoints hold whole tensors keyed by name, so a run sharded over 2 processes continues on one."""
    import shutil

    from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
    from diffalign.config import load_config
    from diffalign.training.loop import run_training

    tmp_path, job = sharded_job
    if not (tmp_path / "fsdp" / "final").exists():
        _launch("train_worker.py", "fsdp", job, f"output_dir={tmp_path / 'fsdp'}")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "fsdp", moved)
    sharded = _lora(moved)
    # epochs=3: nothing left to train, so the export is the checkpoint as one process loaded it
    run_training(load_config(FlowGRPOJob, job, [f"output_dir={moved}"]), FlowGRPOTrainer)
    reloaded = _lora(moved)
    assert reloaded.keys() == sharded.keys()
    assert all(torch.equal(reloaded[k], sharded[k]) for k in sharded), "one process loaded a different state"
    run_training(load_config(FlowGRPOJob, job, [f"output_dir={moved}", "train.epochs=4"]), FlowGRPOTrainer)
    continued = _lora(moved)
    assert sorted(os.listdir(moved / "checkpoints"))[-1] == "step-000004"
    assert all(torch.isfinite(v).all() for v in continued.values())
    assert any(not torch.equal(continued[k], sharded[k]) for k in sharded), "the resumed epoch did not train"


def test_a_one_process_checkpoint_resumes_in_two_sharded_processes(sharded_job):
    """The other direction: a run started on one process continues sharded over 2 (FSDP2), from the same state."""
    from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
    from diffalign.config import load_config
    from diffalign.training.loop import run_training

    tmp_path, job = sharded_job
    single = tmp_path / "single"
    run_training(load_config(FlowGRPOJob, job, [f"output_dir={single}", "train.epochs=2"]), FlowGRPOTrainer)
    one = _lora(single)
    # epochs=2: nothing left to train, so the export is the checkpoint as the 2 sharded processes loaded it
    _launch("train_worker.py", "fsdp", job, f"output_dir={single}", "train.epochs=2")
    reloaded = _lora(single)
    assert reloaded.keys() == one.keys()
    assert all(torch.equal(reloaded[k], one[k]) for k in one), "the sharded processes loaded a different state"
    _launch("train_worker.py", "fsdp", job, f"output_dir={single}")  # epoch 3, sharded
    continued = _lora(single)
    assert sorted(os.listdir(single / "checkpoints"))[-1] == "step-000003"
    assert all(torch.isfinite(v).all() for v in continued.values())
    assert any(not torch.equal(continued[k], one[k]) for k in one), "the sharded epoch did not train"


@pytest.mark.slow
def test_two_modules_on_one_transformer_train_alike_under_ddp_and_fsdp2(tmp_path):
    """Two registered LoRA adapters on one transformer, updated in alternating phases: 2 processes (one DDP
    wrapper per adapter; one FSDP2 sharding for both) take the steps one process takes (every process sees the
    same data), and an FSDP2 run resumes exactly."""
    from seam_fixtures import ToyJob, TwoAdapterTrainer

    from diffalign.config import load_config
    from diffalign.training.loop import run_training

    run_training(load_config(ToyJob, {"output_dir": str(tmp_path / "one")}), TwoAdapterTrainer)
    _launch("seam_worker.py", "ddp", str(tmp_path / "ddp"))
    _launch("seam_worker.py", "fsdp", str(tmp_path / "fsdp"))
    _launch("seam_worker.py", "fsdp", str(tmp_path / "resumed"), "epochs=2")
    _launch("seam_worker.py", "fsdp", str(tmp_path / "resumed"))
    for lora in ("pytorch_lora_weights.safetensors", "fake_score/pytorch_lora_weights.safetensors"):
        one, ddp, fsdp, resumed = (load_file(str(tmp_path / run / "final" / lora))
                                   for run in ("one", "ddp", "fsdp", "resumed"))  # fmt: skip
        assert one.keys() == ddp.keys() == fsdp.keys() == resumed.keys()
        assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k), lora
        for key in one:
            torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(fsdp[key], one[key], rtol=1e-5, atol=1e-7)
            assert torch.equal(resumed[key], fsdp[key]), f"{lora} {key}: kill-and-resume under FSDP2 diverged"
