"""DiffusionNFT on tiny real models: the loss's maths (the optimality weight, the on-policy identity with
advantage-weighted flow matching, its affinity in the advantage), the old policy's schedule, the balance wiring
(amortised steps are the weighted sum of the per-reward gradients, abstentions are masked, solves never point
against a reward), exact resume and bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign.algorithms.nft import (
    NFTConfig,
    NFTJob,
    NFTTrainer,
    implicit_errors,
    nft_policy_loss,
    optimality_weight,
)
from diffalign.balance import BalanceError
from diffalign.balance.wiring import REWARD_LOSSES
from diffalign.config import ConfigError, load_config
from diffalign.pipelines.tiny import build_tiny
from diffalign.rewards import RewardError
from diffalign.training.loop import TrainContext, run_training

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny("sd3").save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _job(root, out, rewards=("Redness",), **overrides):
    data = {
        "output_dir": str(out), "seed": 3,
        "model": {"family": "sd3", "path": str(root / "sd3"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(root / "prompts.txt"),
        "eval_sets": {"eval": {"prompts": str(root / "prompts.txt")}},
        "rewards": [{"name": f"reward_fixtures:{name}"} for name in rewards],
        "train": {"epochs": 2, "lr": 1e-2, "ema_decay": 0.5, "ema_every": 1, "eval_every": 10,
                  "checkpoint_every": 1, "eval_images_per_prompt": 2, "keep_checkpoints": 5},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 1.0},
        "nft": {"prompts_per_epoch": 2, "group_size": 4, "batch_size": 4, "num_steps": 4, "updates_per_epoch": 2},
    }  # fmt: skip
    return load_config(NFTJob, data, [f"{k}={v}" for k, v in overrides.items()])


def _lora(trainer) -> list[torch.nn.Parameter]:
    return trainer.ft.policy.trainable()


def _perturb(trainer, scale=0.05) -> None:
    """Random LoRA weights (a zero-initialised B would make the velocity independent of A), old = current."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for old, current in trainer.pairs.values():
            current.copy_(scale * torch.randn(current.shape, generator=g))
            old.copy_(current)


# -------------------------------------------------------------------------------------------- the loss's maths
def test_optimality_weight_maps_advantages_to_zero_one():
    a = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(optimality_weight(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def _random_state(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7, 1.0])[:B]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.5 * torch.randn(B, 4, 8, 8, generator=g)
    return x0, eps, t, x_t, v_old


def _grad_v(loss_of_v, v_old):
    v = v_old.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_v(v), v)
    return grad


def test_on_policy_gradient_is_advantage_weighted_flow_matching_for_every_beta():
    x0, eps, t, x_t, v_old = _random_state()
    A = torch.tensor([1.5, -0.7, 0.0])
    u = eps - x0
    w = t * (u - v_old).abs().mean(dim=(1, 2, 3))
    tt = t.view(-1, 1, 1, 1)

    def awfm(v):
        return (A * t**2 / w * ((v - u) ** 2).mean(dim=(1, 2, 3))).mean()

    expected = _grad_v(awfm, v_old)
    B, D = x0.shape[0], x0[0].numel()  # the reference's closed form, per sample, over the batch mean
    closed = -(2 * tt**2 * A.view(-1, 1, 1, 1) / (D * w.view(-1, 1, 1, 1))) * (u - v_old) / B
    torch.testing.assert_close(expected, closed)
    for beta in (1.0, 0.1, 0.37):

        def nft(v, beta=beta):
            pos, neg = implicit_errors(v, v_old, x0, x_t, t, beta)
            return nft_policy_loss(pos, neg, A, beta, 5.0).mean()

        got = _grad_v(nft, v_old)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        assert got[2].abs().max() == 0  # A = 0: no gradient at on-policy


def test_the_loss_is_affine_in_the_advantage_and_finite_at_a_perfect_prediction():
    x0, eps, t, x_t, v_old = _random_state(seed=1)
    v_off = v_old + 0.1  # off-policy, so the trust-region part contributes too
    A = torch.tensor([[1.0, -2.0], [0.5, 0.3], [-1.2, 2.2]])
    alpha = torch.tensor([0.3, 0.7])

    def grad_for(adv):
        return _grad_v(lambda v: nft_policy_loss(*implicit_errors(v, v_old, x0, x_t, t, 0.5), adv, 0.5, 5.0).mean(),
                       v_off)  # fmt: skip

    combined = grad_for(A @ alpha)
    weighted = alpha[0] * grad_for(A[:, 0]) + alpha[1] * grad_for(A[:, 1])
    torch.testing.assert_close(combined, weighted, rtol=1e-5, atol=1e-7)
    exact = eps - x0  # v_old = v = the flow target: x0+- == x0
    pos, neg = implicit_errors(exact, exact, x0, x_t, t, 1.0)
    assert torch.isfinite(nft_policy_loss(pos, neg, A[:, 0], 1.0, 5.0)).all() and pos.abs().max() < 1e-6


def test_old_policy_decay_follows_the_anchors_schedules():
    nft = NFTConfig()
    assert [nft.decay(n) for n in (0, 100, 500, 2000)] == [0.0, 0.1, 0.5, 0.5]
    ocr = NFTConfig(decay_uprate=0.0075, decay_cap=0.999, decay_flat=75)
    assert [ocr.decay(n) for n in (0, 74, 75, 175)] == [0.0, 0.0, 0.0, pytest.approx(0.75)]
    assert NFTConfig(decay_cap=0.95).decay(10_000) == 0.95
    assert NFTConfig().train_times == 9 and NFTConfig(num_steps=25).train_times == 24


# -------------------------------------------------------------------------------------------- the trainer
def test_on_policy_trainer_gradient_equals_advantage_weighted_flow_matching(tiny, tmp_path, one_thread):
    trainer = NFTTrainer(TrainContext(_job(tiny, tmp_path / "run", **{"nft.kl_beta": 0.0})))
    _perturb(trainer)
    batch = trainer.collect(0)
    assert batch.x0.shape == (8, 4, 16, 16) and batch.train_steps.shape == (8, 3)
    micro = trainer.split(batch, 0)[0][0]
    params = _lora(trainer)
    trainer.balance.begin_micro(0, 1)
    grads = {}
    for beta in (1.0, 0.1):
        trainer.cfg.beta = beta
        grads[beta] = torch.autograd.grad(trainer.loss(batch, micro)["loss_policy"], params)
    f = trainer.forward(batch, micro)
    u = f["noise"] - f["x0"]
    w = (f["t"] * (u - f["v_old"]).abs().mean(dim=(1, 2, 3))).clamp(min=1e-5)
    A = batch.advantages[micro.rows]
    share = micro.rows.numel() / micro.step_rows / batch.train_steps.shape[1]
    awfm = share * (A * f["t"] ** 2 / w * ((f["v"] - u) ** 2).mean(dim=(1, 2, 3))).mean()
    expected = torch.autograd.grad(awfm, params)
    assert max(float(g.abs().max()) for g in expected) > 0
    for beta in (1.0, 0.1):
        for got, want in zip(grads[beta], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_old_policy_is_a_separate_adapter_moved_by_the_decay(tiny, tmp_path, one_thread):
    trainer = NFTTrainer(TrainContext(_job(tiny, tmp_path / "run", **{"nft.decay_uprate": 0.25})))
    _perturb(trainer)
    before = {n: old.clone() for n, (old, _) in trainer.pairs.items()}
    batch = trainer.collect(0)
    metrics = trainer.update(batch, 0)
    assert metrics["old_decay"] == 0.5 and trainer.ft.policy.steps == 2  # d = min(0.25 * 2, 0.5)
    for name, (old, current) in trainer.pairs.items():
        assert not old.requires_grad
        torch.testing.assert_close(old, 0.5 * before[name] + 0.5 * current.detach())
    assert any(not torch.equal(before[n], old) for n, (old, _) in trainer.pairs.items())


def test_amortised_step_is_the_weighted_sum_of_per_reward_gradients(tiny, tmp_path, one_thread):
    job = _job(tiny, tmp_path / "run", rewards=("Redness", "Blueness"), **{"balance.method": "marble"})
    trainer = NFTTrainer(TrainContext(job))
    _perturb(trainer)
    batch = trainer.collect(0)
    micro = trainer.split(batch, 0)[0][0]
    params = _lora(trainer)
    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64)
    balancer = trainer.balance.balancer
    balancer.load_state_dict({"names": balancer.names, "weights": alpha, "last_full": 0, "solves": 1})
    trainer.balance.begin_micro(0, 1)
    assert trainer.balance.mode == "amortised"
    terms = trainer.loss(batch, micro)
    amortised = torch.autograd.grad(terms["loss_policy"] + terms["loss_kl"], params)
    trainer.balance.mode = "solve"
    terms = trainer.loss(batch, micro)
    losses = terms[REWARD_LOSSES]
    per_reward = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in range(2)]
    kl = torch.autograd.grad(terms["loss_kl"], params)
    for i, got in enumerate(amortised):
        torch.testing.assert_close(got, 0.3 * per_reward[0][i] + 0.7 * per_reward[1][i] + kl[i], rtol=1e-4,
                                   atol=1e-10)  # fmt: skip
    # MARBLE's own amortised form, one backward with sum_k alpha_k A_k, is the same (no clip, no abstention)
    trainer.balance.mode = "plain"
    batch.advantages = batch.reward_advantages @ alpha.float()
    assert batch.advantages.abs().max() < 5
    combined = torch.autograd.grad(trainer.loss(batch, micro)["loss_policy"], params)
    for i, got in enumerate(combined):
        torch.testing.assert_close(got, 0.3 * per_reward[0][i] + 0.7 * per_reward[1][i], rtol=1e-4, atol=1e-10)


def test_marble_masks_an_abstaining_specialist_and_solves_never_point_against_a_reward(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")  # both drawn: the specialist applies to half
    job = _job(tiny, out, rewards=("Redness", "Blueness", "CircleRedness"), prompts=str(tmp_path / "two.txt"),
               **{"balance.method": "marble", "balance.every": 1, "train.epochs": 2})  # fmt: skip
    run_training(job, NFTTrainer)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][1:]
    for record in history:
        assert record["reward/CircleRedness/applies"] == 0.5 and record["reward/Redness/applies"] == 1
        assert record["balance/reports"] == 2  # a solve at each of the epoch's two optimizer steps
        assert record["balance/min_cos"] >= -1e-6 and record["balance/min_cos_negative"] == 0
        weights = [record[f"balance/alpha/{n}"] for n in ("Redness", "Blueness", "CircleRedness")]
        assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)


def test_a_weighted_sum_of_opposed_rewards_is_measured_as_conflicting(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    job = _job(tiny, out, rewards=("Redness", "Blueness"), **{"balance.every": 1, "train.epochs": 1})
    run_training(job, NFTTrainer)
    record = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][-1]
    # red - blue and blue - red sum to zero reward: the update is orthogonal or opposed to at least one of them
    assert record["balance/reports"] == 2 and record["balance/min_cos"] <= 1e-3
    assert "balance/negative_fraction_run" in record


def test_nft_resumes_identically(tiny, tmp_path, one_thread):
    overrides = {"balance.method": "marble", "balance.every": 2, "train.epochs": 3, "nft.decay_uprate": 0.2}
    rewards = ("Redness", "CircleRedness")
    out = tmp_path / "run"
    run_training(_job(tiny, out, rewards=rewards, **overrides), NFTTrainer)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    shutil.rmtree(resumed / "final")
    run_training(_job(tiny, resumed, rewards=rewards, **overrides), NFTTrainer)
    a = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = (out / "history.jsonl").read_text().splitlines()
    hb = (resumed / "history.jsonl").read_text().splitlines()
    drop = ("epoch_seconds",)
    strip = [{k: v for k, v in json.loads(line).items() if k not in drop} for line in ha]
    assert strip == [{k: v for k, v in json.loads(line).items() if k not in drop} for line in hb]


def test_bad_input_is_refused_with_the_key_named(tiny, tmp_path):
    with pytest.raises(ConfigError, match="nft.beta"):
        _job(tiny, tmp_path / "a", **{"nft.beta": 0.0})
    with pytest.raises(ConfigError, match="nft.group_size"):
        _job(tiny, tmp_path / "b", **{"nft.group_size": 1})
    with pytest.raises(ConfigError, match="nft.batch_size"):
        _job(tiny, tmp_path / "c", **{"nft.batch_size": 3})
    with pytest.raises(ConfigError, match="balance.method"):
        _job(tiny, tmp_path / "d", **{"balance.method": "mean"})
    with pytest.raises(ConfigError, match="lora.rank"):
        NFTTrainer(TrainContext(_job(tiny, tmp_path / "e", **{"lora.rank": 0})))
    with pytest.raises(ConfigError, match="balance.method"):  # marble needs at least two rewards
        NFTTrainer(TrainContext(_job(tiny, tmp_path / "f", **{"balance.method": "marble"})))
    with pytest.raises(ConfigError, match="weights must be 1"):
        NFTTrainer(TrainContext(_job(tiny, tmp_path / "g", rewards=("Redness", "Blueness"),
                                     **{"balance.method": "marble", "rewards.0.weight": 2.0})))  # fmt: skip


def test_abstaining_everywhere_and_broken_rewards_stop_the_run(tiny, tmp_path, one_thread):
    (tmp_path / "squares.txt").write_text("a blue square\n")
    job = _job(tiny, tmp_path / "a", rewards=("CircleRedness",), prompts=str(tmp_path / "squares.txt"))
    with pytest.raises(BalanceError, match="every reward abstains"):
        NFTTrainer(TrainContext(job)).collect(0)
    job = _job(tiny, tmp_path / "b", rewards=("NaNAfterCalls",))
    with pytest.raises(RewardError, match="NaN"):
        NFTTrainer(TrainContext(job)).collect(0)
