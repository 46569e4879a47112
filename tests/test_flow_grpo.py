"""Flow-GRPO invariants on tiny real models: advantages, ratio = 1 and KL = 0 before the update, what trains,
exact resume, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer, GRPOMicro, group_advantages
from diffalign.config import ConfigError, load_config
from diffalign.pipelines.tiny import build_tiny
from diffalign.rewards import RewardError
from diffalign.training.checkpoint import CheckpointError
from diffalign.training.loop import TrainContext, run_training

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow cross"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("sd3", "flux"):
        build_tiny(family).save_pretrained(root / family)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _job(root, out, family="sd3", **overrides):
    data = {
        "output_dir": str(out),
        "seed": 3,
        "model": {"family": family, "path": str(root / family), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},
        "prompts": str(root / "prompts.txt"),
        "eval_sets": {"eval": {"prompts": str(root / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"epochs": 2, "lr": 1e-2, "ema_decay": 0.5, "ema_every": 1, "eval_every": 10,
                  "checkpoint_every": 1, "eval_images_per_prompt": 2, "keep_checkpoints": 5},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
        "flow_grpo": {"prompts_per_epoch": 2, "group_size": 4, "batch_size": 4, "num_steps": 4,
                      "guidance_scale": 2.0, "beta": 0.04, "clip_range": 0.2},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            data[section] = {**data[section], name: value}
        else:
            data[key] = value
    return load_config(FlowGRPOJob, data)


# -------------------------------------------------------------------------------------------- advantages
def test_group_advantages_zero_mean_per_group_and_zero_for_constant_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    for global_std in (True, False):
        adv = group_advantages(rewards, groups, global_std=global_std)
        for g in range(3):
            assert adv[groups == g].mean().abs() < 1e-6
        assert torch.equal(adv[groups == 1], torch.zeros(3))
    per_group = group_advantages(rewards, groups, global_std=False)
    torch.testing.assert_close(per_group[:3], torch.tensor([-1.0, 0.0, 1.0]) / (torch.tensor(2 / 3).sqrt() + 1e-4))
    glob = group_advantages(rewards, groups, global_std=True)
    torch.testing.assert_close(glob[:3], torch.tensor([-1.0, 0.0, 1.0]) / (rewards.std(unbiased=False) + 1e-4))


# -------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("window", ["all", "random"])
def test_ratio_is_one_and_kl_zero_before_the_first_update(tiny_models, tmp_path, window):
    job = _job(tiny_models, tmp_path / "run", **{"flow_grpo.window": window})
    trainer = FlowGRPOTrainer(TrainContext(job))
    batch = trainer.collect(0)
    assert batch.states.shape == (8, 5, 4, 16, 16) and batch.advantages.shape == (8,)
    rows = torch.arange(8)
    for j in range(batch.train_steps.shape[1]):
        with torch.no_grad():
            info = trainer.loss(batch, GRPOMicro(rows, j, 8))
        torch.testing.assert_close(info["ratio"], torch.ones(8), rtol=0, atol=1e-5)
        assert info["kl"].abs().max() < 1e-10
        assert info["clipfrac"].sum() == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_parameters_change_and_frozen_ones_do_not(tiny_models, tmp_path, family):
    job = _job(tiny_models, tmp_path / "run", family=family, **{"train.epochs": 1})
    trainer = FlowGRPOTrainer(TrainContext(job))
    flow = trainer.flow
    before = {n: p.detach().clone() for n, p in flow.transformer.named_parameters()}
    batch = trainer.collect(0)
    assert batch.advantages.abs().sum() > 0
    trainer.update(batch, 0)
    changed = {n for n, p in flow.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no parameter changed"
    assert all("lora_" in n for n in changed), [n for n in changed if "lora_" not in n][:3]
    assert any("lora_B" in n for n in changed)
    for module in ("vae", "text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in getattr(flow.pipe, module).parameters())


def test_a_prompt_file_of_world_prompts_is_judged_by_the_world_evaluator(tiny_models, tmp_path):
    prompts = tmp_path / "world.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    out = tmp_path / "run"
    job = _job(tiny_models, out, prompts=str(prompts), eval_sets={"world": {"prompts": str(prompts)}},
               **{"train.epochs": 1, "train.eval_images_per_prompt": 1})  # fmt: skip
    run_training(job, FlowGRPOTrainer)
    after = json.loads((out / "eval_after.json").read_text())
    assert {"world/world/overall", "world/world/colors", "world/world/counting"} <= after.keys()
    lo, hi = after["world/world/image_accuracy_ci_lo"], after["world/world/image_accuracy_ci_hi"]
    assert 0.0 <= lo <= after["world/world/image_accuracy"] <= hi <= 1.0
    assert "world/diversity" not in after  # undefined with one image per prompt (was written as NaN)


def test_training_run_writes_outputs_and_resumes_identically(tiny_models, tmp_path):
    out = tmp_path / "run"
    run_training(_job(tiny_models, out), FlowGRPOTrainer)
    for name in ("config.yaml", "history.jsonl", "curves.png", "eval_before.json", "eval_after.json",
                 "eval_epoch-00002.json", "grids/before_eval.png", "grids/after_eval.png",
                 "grids/epoch-00002_eval.png", "final/pytorch_lora_weights.safetensors"):  # fmt: skip
        assert (out / name).exists(), name
    after = json.loads((out / "eval_after.json").read_text())
    assert "eval/diversity" in after and not any("/world/" in k for k in after)  # not world prompts
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    shutil.rmtree(resumed / "final")
    run_training(_job(tiny_models, resumed), FlowGRPOTrainer)
    a = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tracker", ["tensorboard", "none", "wandb"])
def test_report_to_picks_the_tracker_and_logs_grids_and_config(tiny_models, tmp_path, monkeypatch, tracker):
    if tracker == "wandb":
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    job = _job(tiny_models, out, **{"train.epochs": 1, "train.eval_images_per_prompt": 1, "train.report_to": tracker})
    run_training(job, FlowGRPOTrainer)
    assert (out / "history.jsonl").exists() and (out / "curves.png").exists()
    events = list(out.rglob("events.out.tfevents.*"))
    if tracker != "tensorboard":
        assert not events
        assert (out / "wandb").is_dir() == (tracker == "wandb")
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent)).Reload().Tags()
    assert "eval/eval" in logged["images"] and "config/text_summary" in logged["tensors"]
    assert any(tag.startswith("reward") or "/" in tag for tag in logged["scalars"])


def test_report_to_wandb_without_the_package_is_a_config_error(tiny_models, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.report_to.*wandb"):
        _job(tiny_models, tmp_path / "run", **{"train.report_to": "wandb"})


def test_resume_refuses_a_changed_config_and_falls_back_past_a_corrupt_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "run"
    run_training(_job(tiny_models, out), FlowGRPOTrainer)
    saved = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.01 -> 0\.02"):
        run_training(_job(tiny_models, out, **{"train.lr": 0.02, "train.epochs": 3}), FlowGRPOTrainer)
    assert (out / "config.yaml").read_text() == saved  # the record of the run is left as it was
    # a longer run on the same config resumes; a corrupt newest checkpoint is skipped for the one before it
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    run_training(_job(tiny_models, reference, **{"train.epochs": 3}), FlowGRPOTrainer)
    (out / "checkpoints" / "step-000002" / "modules" / "policy.safetensors").write_bytes(b"not a tensor file")
    run_training(_job(tiny_models, out, **{"train.epochs": 3}), FlowGRPOTrainer)
    a = load_file(str(reference / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no epoch recorded twice
    assert (out / "eval_epoch-00002.json").exists() and (out / "eval_epoch-00003.json").exists()


def test_mixed_precision_comes_from_the_launcher_unless_the_config_sets_it(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)
    try:
        assert TrainContext(_job(tiny_models, tmp_path / "a")).accelerator.mixed_precision == "bf16"
        AcceleratorState._reset_state(True)
        job = _job(tiny_models, tmp_path / "b", **{"train.mixed_precision": "no"})
        assert TrainContext(job).accelerator.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)


#: A 3-epoch run of ``_job`` on this machine type (2-core x86 CPU, torch 2.14) before Flow-GRPO moved onto the
#: shared trainer seam (commit d540821): per-epoch rollout reward, KL and gradient norm, and sums of the final
#: LoRA. The refactored loop reproduced them bit for bit; the tolerance only allows for other CPUs' kernels.
PINNED_HISTORY = {
    "reward_mean": [0.16472044587135315, 0.16636237502098083, 0.1647776961326599],
    "kl": [8.427246575593017e-05, 0.00017256494296210198, 0.0008766871930371659],
    "grad_norm": [0.004076729994267225, 0.003197237499989569, 0.004407974076457322],
    "ratio": [0.9998884896437327, 1.0000215570131938, 0.9999456405639648],
}
PINNED_LORA = {"lora_B_abs": 40.72725513505338, "lora_B": 1.3262101157970392, "lora_A_abs": 392.2212574645964}


def test_the_numbers_of_a_short_run_are_those_of_the_pre_seam_loop(tiny_models, tmp_path):
    out = tmp_path / "run"
    # the pre-seam loop let gradient through CFG's unconditional branch
    run_training(_job(tiny_models, out, **{"train.epochs": 3, "flow_grpo.detach_uncond": False}), FlowGRPOTrainer)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][1:]
    for key, values in PINNED_HISTORY.items():
        torch.testing.assert_close(torch.tensor([r[key] for r in rows], dtype=torch.float64),
                                   torch.tensor(values, dtype=torch.float64), rtol=1e-3, atol=0, msg=key)  # fmt: skip
    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    sums = {
        "lora_B_abs": sum(float(v.double().abs().sum()) for k, v in lora.items() if "lora_B" in k),
        "lora_B": sum(float(v.double().sum()) for k, v in lora.items() if "lora_B" in k),
        "lora_A_abs": sum(float(v.double().abs().sum()) for k, v in lora.items() if "lora_A" in k),
    }
    for key, value in PINNED_LORA.items():
        assert sums[key] == pytest.approx(value, rel=1e-3), key


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_on_cuda_trains_lora_only_and_ratio_is_one_before_the_update(
    tiny_models, tmp_path, precision, request
):
    """On a GPU (fp32 or bf16 autocast): ratio 1 and KL 0 before the update, then only LoRA parameters move."""
    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed per process state
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    job = _job(tiny_models, tmp_path / "run", **{"train.mixed_precision": precision, "train.epochs": 1})
    ctx = TrainContext(job)
    trainer = FlowGRPOTrainer(ctx)
    flow = trainer.flow
    assert flow.device.type == "cuda"
    before = {n: p.detach().clone() for n, p in flow.transformer.named_parameters()}
    batch = trainer.collect(0)
    rows = job.flow_grpo.batch_size  # the rows of the first rollout batch: the same kernels as the rollout
    with torch.no_grad(), ctx.accelerator.autocast():
        info = trainer.loss(batch, GRPOMicro(torch.arange(rows), 0, rows))
    torch.testing.assert_close(info["ratio"].float().cpu(), torch.ones(rows), rtol=0, atol=1e-4)
    assert info["kl"].abs().max() < 1e-6
    trainer.update(batch, 0)
    changed = {n for n, p in flow.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in flow.transformer.parameters())


def test_exported_lora_loads_into_the_stock_pipeline(tiny_models, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    run_training(_job(tiny_models, out, **{"train.epochs": 1}), FlowGRPOTrainer)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3")
    pipe.load_lora_weights(out / "final")
    images = pipe(prompt=PROMPTS[:1], height=32, width=32, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)


# -------------------------------------------------------------------------------------------- bad input
def test_nan_reward_stops_training_and_keeps_the_last_good_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "run"
    # 1 eval call (before) + 2 rollout batches in epoch 1 succeed, epoch 2's rollout returns NaN
    rewards = [{"name": "reward_fixtures:NaNAfterCalls", "args": {"ok_calls": 3}}]
    with pytest.raises(RewardError, match="NaN"):
        run_training(_job(tiny_models, out, rewards=rewards), FlowGRPOTrainer)
    assert (out / "checkpoints" / "step-000001" / "state.json").exists()
    assert not (out / "checkpoints" / "step-000002").exists()


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tiny_models, tmp_path):
    out = tmp_path / "run"
    run_training(_job(tiny_models, out, **{"train.epochs": 1}), FlowGRPOTrainer)
    (out / "checkpoints" / "step-000001" / "modules" / "policy.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step-000001"):
        run_training(_job(tiny_models, out, **{"train.epochs": 2}), FlowGRPOTrainer)


def test_bad_configs(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="prompts"):
        FlowGRPOTrainer(TrainContext(_job(tiny_models, tmp_path / "a", prompts=str(empty))))
    with pytest.raises(ConfigError, match="flow_grpo.group_size"):
        _job(tiny_models, tmp_path / "b", **{"flow_grpo.group_size": 1})
    with pytest.raises(ConfigError, match="flow_grpo.group_size.*multiple of batch_size 3"):  # before any load
        _job(tiny_models, tmp_path / "c", **{"flow_grpo.batch_size": 3})
    with pytest.raises(ConfigError, match="lora.rank"):
        _job(tiny_models, tmp_path / "c", **{"lora.rank": -1})
    with pytest.raises(ConfigError, match="eval_sets.test.prompts.*valid"):
        _job(tiny_models, tmp_path / "c", eval_sets={"test": {"prompts": "world:valid"}})
    with pytest.raises(ConfigError, match="'prompts'.*valid"):
        _job(tiny_models, tmp_path / "c", prompts="world:valid")
    with pytest.raises(ConfigError, match="flow_grpo.window_range"):
        _job(tiny_models, tmp_path / "d", **{"flow_grpo.window": "random", "flow_grpo.window_range": [3, 4]})
    with pytest.raises(ConfigError, match="unknown reward|rewards"):
        FlowGRPOTrainer(TrainContext(_job(tiny_models, tmp_path / "e", rewards=[{"name": "no_such_reward"}])))


def test_detaching_the_unconditional_branch_changes_the_gradient_not_the_ratio(tiny_models, tmp_path):
    grads = {}
    for detach in (False, True):
        trainer = FlowGRPOTrainer(TrainContext(_job(tiny_models, tmp_path / str(detach),
                                                    **{"flow_grpo.detach_uncond": detach})))  # fmt: skip
        batch = trainer.collect(0)
        micro = trainer.split(batch, 0)[0][0]
        terms = trainer.loss(batch, micro)
        assert torch.allclose(terms["ratio"], torch.ones_like(terms["ratio"]))
        trainer.ctx.modules["policy"].optimizer.zero_grad()
        sum(v for k, v in terms.items() if k.startswith("loss_")).backward()
        grads[detach] = torch.cat([p.grad.flatten() for p in trainer.ctx.modules["policy"].trainable()])
        AcceleratorState._reset_state(True)
    assert not torch.allclose(grads[False], grads[True])


def test_the_curriculum_draws_prompts_with_spread_and_stops_when_none_is_left(tiny_models, tmp_path):
    trainer = FlowGRPOTrainer(TrainContext(_job(tiny_models, tmp_path / "c", **{
        "flow_grpo.prompt_sampling": "curriculum", "flow_grpo.curriculum_floor": 1e-6})))  # fmt: skip
    trainer.spread.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    trainer.drawn.fill_(1)
    for epoch in range(5):
        prompts, _, chosen = trainer.epoch_prompts(epoch)
        assert 2 in chosen  # the one prompt with spread is drawn every epoch
    trainer._track_spread(np.array([0, 1]), torch.tensor([0.3, 0.0]))
    assert trainer.spread[0] == pytest.approx(0.15) and trainer.drawn[0] == 2
    trainer.spread.zero_()
    with pytest.raises(ConfigError, match="ran out of prompts with reward variance"):
        trainer._track_spread(np.array([0, 1]), torch.tensor([0.0, 0.0]))
    AcceleratorState._reset_state(True)


# -------------------------------------------------------------------------------------------- several rewards
def test_sum_of_one_reward_keeps_flow_grpos_advantages(tiny_models, tmp_path):
    trainer = FlowGRPOTrainer(TrainContext(_job(tiny_models, tmp_path / "run")))
    batch = trainer.collect(0)
    _, groups, _ = trainer.epoch_prompts(0)
    torch.testing.assert_close(batch.advantages, group_advantages(batch.rewards, groups))
    assert batch.reward_advantages is None and trainer.balance.balancer is None


def test_marble_through_flow_grpo(tiny_models, tmp_path):
    """The amortised step's single backward is the alpha-weighted sum of the per-reward gradients (plus the KL's);
    a solve step logs QP weights and never points against a reward; the specialist's abstentions are masked."""
    rewards = [{"name": "reward_fixtures:Redness"}, {"name": "reward_fixtures:CircleRedness"}]
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")  # both drawn: the specialist scores half
    job = _job(tiny_models, tmp_path / "run", rewards=rewards, prompts=str(tmp_path / "two.txt"),
               balance={"method": "marble", "every": 1})  # fmt: skip
    trainer = FlowGRPOTrainer(TrainContext(job))
    batch = trainer.collect(0)
    applies = ~torch.isnan(batch.reward_advantages)
    assert batch.advantages is None and applies[:, 0].all() and applies[:, 1].float().mean() == 0.5
    micro = trainer.split(batch, 0)[0][0]
    params = trainer.ctx.modules["policy"].trainable()
    balancer = trainer.balance.balancer
    balancer.load_state_dict({"names": balancer.names, "weights": torch.tensor([0.25, 0.75], dtype=torch.float64),
                              "last_full": 0, "solves": 1})  # fmt: skip
    trainer.balance.begin_micro(1, 2)
    assert trainer.balance.mode == "amortised"
    terms = trainer.loss(batch, micro)
    amortised = torch.autograd.grad(terms["loss_policy"] + terms["loss_kl"], params)
    trainer.balance.mode = "solve"
    terms = trainer.loss(batch, micro)
    losses = terms["balance_reward_losses"]
    g = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in range(2)]
    kl = torch.autograd.grad(terms["loss_kl"], params)
    for i, got in enumerate(amortised):
        torch.testing.assert_close(got, 0.25 * g[0][i] + 0.75 * g[1][i] + kl[i], rtol=1e-4, atol=1e-10)
    balancer.load_state_dict({"names": balancer.names, "weights": None, "last_full": None, "solves": 0})
    trainer.balance.store()
    metrics = trainer.update(batch, 0)
    assert metrics["balance/reports"] == 2 and metrics["balance/min_cos"] >= -1e-6  # one solve per optimizer step
    assert metrics["balance/excluded"] == 0 and 0 < metrics["balance/alpha/CircleRedness"] < 1
    assert {"balance/weight/Redness", "balance/alpha/CircleRedness", "reward/CircleRedness/applies"} <= set(
        metrics) | set(batch.metrics)  # fmt: skip


def test_reward_interval_is_clustered_by_prompt_and_skips_abstentions():
    from diffalign.world.evaluator import prompt_mean_interval

    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    values = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, float("nan"), float("nan")])
    lo, hi = prompt_mean_interval(values, prompts)
    sums, counts = np.array([4.0, 0.0, 1.0]), np.array([4.0, 4.0, 2.0])
    mean = 5 / 10
    se = np.sqrt(((sums - counts * mean) ** 2).sum() / 6) / counts.mean()
    assert lo == pytest.approx(mean - 1.96 * se) and hi == pytest.approx(mean + 1.96 * se)
    # identical images within a prompt carry no more information than one: the interval does not shrink with them
    one = prompt_mean_interval(torch.tensor([1.0, 0.0, 1.0]), ["a", "b", "c"])
    four = prompt_mean_interval(
        torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(4), [p for p in "abc" for _ in range(4)]
    )
    assert four == pytest.approx(one)
    assert all(v != v for v in prompt_mean_interval(torch.tensor([1.0, float("nan")]), ["a", "b"]))
