"""The min-norm QP, the MARBLE gradient balancer and per-reward advantages: QP optimality against brute force,
normalisation and exclusion, what the balancer writes into ``.grad``, amortisation, 2 processes (DDP, FSDP2) against
one, bad input.

Also the worker of the 2-process test: ``accelerate launch ... tests/test_balance.py OUT`` runs ``_worker``.
"""

import itertools
import logging
import os
import subprocess
import sys

import pytest
import torch

from diffalign.balance import (
    BalanceConfig,
    BalanceError,
    GradientBalancer,
    marble_solution,
    min_norm_weights,
    normalise_per_group,
    reward_advantages,
    reward_losses,
    reward_table,
    update_cosines,
)
from diffalign.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------- the QP
def _vectors(K: int, D: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(K, D, generator=g, dtype=torch.float64)
    return torch.randn(K, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, D, generator=g,
                                                                                dtype=torch.float64)  # fmt: skip


def _brute_force(vectors: torch.Tensor) -> float:
    """min |d|^2 over the hull, independently of the solver: for every support, the min-norm point of its affine
    hull by least squares on the vectors themselves; the smallest norm among those inside the simplex."""
    best = float("inf")
    K = vectors.shape[0]
    for size in range(1, K + 1):
        for support in itertools.combinations(range(K), size):
            p = vectors[list(support)]
            z = torch.linalg.lstsq((p[1:] - p[0]).T, -p[0][:, None]).solution.flatten() if size > 1 else p[:0, 0]
            w = torch.cat([1 - z.sum(dim=0, keepdim=True), z])
            if bool((w >= -1e-10).all()):
                best = min(best, float((w @ p).pow(2).sum()))
    return best


def test_two_orthogonal_unit_gradients_get_half_each():
    for method in ("exact", "frank_wolfe"):
        solution = min_norm_weights(torch.eye(2), method=method)
        torch.testing.assert_close(solution.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
        assert solution.norm_sq == pytest.approx(0.5)


def test_opposite_gradients_give_a_zero_direction_and_equal_ones_the_gradient():
    g = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    for vectors in (torch.cat([g, -g]), torch.cat([g, 3 * g])):
        solution = marble_solution(vectors @ vectors.T)
        direction = solution.coefficients @ vectors
        if vectors[1, 0] < 0:
            torch.testing.assert_close(direction, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
        else:  # unit gradients coincide: the update is the unit gradient times the mean norm (2 |g|)
            torch.testing.assert_close(direction, 2 * g[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
def test_kkt_conditions_and_brute_force_on_random_gram_matrices(K):
    for seed in range(24):
        D = (3, 50)[seed % 2]
        rank = max(1, K - 2) if seed % 3 == 0 else None  # every third Gram matrix is rank-deficient
        vectors = _vectors(K, D, 100 * K + seed, rank)
        G = vectors @ vectors.T
        solution = min_norm_weights(G)
        w = solution.weights
        assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        d = w @ vectors
        inner, norm_sq = vectors @ d, float(d @ d)
        assert bool((inner >= norm_sq - 1e-6).all()), f"KKT fails (seed {seed}): {inner - norm_sq}"
        assert bool(((inner - norm_sq).abs()[w > 1e-9] <= 1e-6).all()), "KKT equality fails on the support"
        assert solution.gap <= 1e-9
        assert norm_sq == pytest.approx(_brute_force(vectors), abs=1e-9)
        assert solution.norm_sq == pytest.approx(norm_sq, abs=1e-12)
        fw = min_norm_weights(G, method="frank_wolfe")  # degenerate faces are where plain Frank-Wolfe crawls
        assert fw.gap <= 1e-9 and fw.norm_sq == pytest.approx(norm_sq, abs=1e-9)


@pytest.mark.parametrize("K", [10, 12, 14, 16])
def test_frank_wolfe_agrees_with_the_exact_solver(K):
    for seed in range(3):
        vectors = _vectors(K, (8, 40, 200)[seed], seed, rank=K // 2 if seed == 0 else None)
        G = vectors @ vectors.T
        exact = min_norm_weights(G, method="exact")
        fw = min_norm_weights(G, method="frank_wolfe")
        assert fw.method == "frank_wolfe" and fw.gap <= 1e-9
        assert fw.norm_sq == pytest.approx(exact.norm_sq, abs=1e-9)
        torch.testing.assert_close(fw.weights @ vectors, exact.weights @ vectors, atol=1e-6, rtol=0)


def test_frank_wolfe_meets_kkt_at_k_20_and_auto_picks_it():
    vectors = _vectors(20, 64, 7)
    solution = min_norm_weights(vectors @ vectors.T)
    assert solution.method == "frank_wolfe"
    d = solution.weights @ vectors
    assert bool((vectors @ d >= d @ d - 1e-6).all())


def test_solver_is_deterministic():
    G = (v := _vectors(6, 5, 3, rank=3)) @ v.T
    assert torch.equal(min_norm_weights(G).weights, min_norm_weights(G.clone()).weights)


def test_zero_and_nan_gradients_are_excluded_and_reported():
    vectors = _vectors(4, 6, 11)
    vectors[1] = 0.0
    vectors[3, 2] = float("nan")
    G = vectors @ vectors.T
    solution = min_norm_weights(G)
    assert solution.excluded == {1: "zero", 3: "non-finite"}
    assert float(solution.weights[1]) == 0.0 and float(solution.weights[3]) == 0.0
    alone = min_norm_weights(G[[0, 2]][:, [0, 2]])
    torch.testing.assert_close(solution.weights[[0, 2]], alone.weights)


def test_a_single_valid_gradient_gets_weight_one_and_all_invalid_is_an_error():
    G = torch.diag(torch.tensor([4.0, 0.0, float("nan")], dtype=torch.float64))
    solution = min_norm_weights(G)
    assert solution.method == "single" and solution.weights.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(BalanceError, match="zero .0. or non-finite .1."):
        min_norm_weights(torch.diag(torch.tensor([0.0, float("nan")])))


# ----------------------------------------------------------------------------------------------- normalisation
def test_scaling_one_gradient_leaves_the_normalised_weights_unchanged():
    for seed in range(10):
        vectors = _vectors(4, 9, seed)
        before = marble_solution(vectors @ vectors.T)
        scaled = vectors.clone()
        scaled[seed % 4] *= 100.0
        after = marble_solution(scaled @ scaled.T)
        torch.testing.assert_close(after.weights, before.weights, atol=1e-10, rtol=0)
        # the update is the unit-gradient min-norm point times the mean raw norm
        unit = vectors / vectors.norm(dim=1, keepdim=True)
        expected = (before.weights @ unit) * vectors.norm(dim=1).mean()
        torch.testing.assert_close(before.coefficients @ vectors, expected)


def test_marble_solution_single_and_zero_gradients():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    single = marble_solution(g @ g.T)
    assert single.status == "single" and single.coefficients.tolist() == [1.0, 0.0]  # its own raw gradient
    zero = marble_solution(torch.zeros(2, 2))
    assert zero.status == "all_zero" and zero.coefficients.abs().sum() == 0
    with pytest.raises(BalanceError, match="non-finite"):
        marble_solution(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]))


def test_update_cosines_are_non_negative_after_a_solve():
    for seed in range(20):
        vectors = _vectors(5, 12, seed)
        G = vectors @ vectors.T
        solution = marble_solution(G)
        cos = update_cosines(G, solution.coefficients)
        u = solution.coefficients @ vectors
        expected = vectors @ u / (vectors.norm(dim=1) * u.norm())
        torch.testing.assert_close(cos, expected)
        assert float(cos.min()) >= -1e-9


def test_a_cancelled_update_has_no_direction():
    """Two opposite rewards (as float32 backprop leaves them: opposite up to rounding) and a third: the min-norm
    point is the cancelled pair, whose direction is rounding noise, so its cosines are 0, not a conflict."""
    g = _vectors(2, 12, 3)[0].float()
    noise = 1e-7 * g.norm() * torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectors = torch.stack([g.double(), -g.double() + noise, _vectors(3, 12, 4)[2]])
    G = vectors @ vectors.T
    solution = marble_solution(G)
    assert solution.coefficients[2] == 0 and solution.qp.norm_sq < 1e-10
    assert update_cosines(G, solution.coefficients).tolist() == [0.0, 0.0, 0.0]
    # a real update keeps its cosines, however small it is in absolute terms
    small = 1e-6 * G
    torch.testing.assert_close(update_cosines(small, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
                               update_cosines(G, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)))  # fmt: skip


# ----------------------------------------------------------------------------------------------- the balancer
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


def _batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    target = torch.randn(n, 4, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, 3, generator=g, dtype=torch.float64)
    advantages[[1, 5], 2] = float("nan")  # the third reward abstains on two samples
    return x, target, advantages


def _losses(model, x, target, advantages):
    out = model(x)
    per_sample = ((out - target) ** 2).mean(dim=1)
    losses = reward_losses(lambda a: a * per_sample, advantages)
    return losses, 1e-2 * out.pow(2).mean()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _autograd_rows(model, losses) -> torch.Tensor:
    rows = [torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])


def test_solve_writes_the_balanced_direction_plus_the_regulariser_into_grad():
    model = _model()
    x, target, advantages = _batch()
    params = list(model.parameters())
    for p in params:  # a gradient accumulated before the solve is kept
        p.grad = torch.full_like(p, 0.01)
    losses, kl = _losses(model, x, target, advantages)
    rows = _autograd_rows(model, losses + [kl])
    expected_solution = marble_solution(rows[:3] @ rows[:3].T)
    balancer = GradientBalancer(BalanceConfig(method="marble", every=5, ema=0.7), ["a", "b", "c"], params)
    report = balancer.solve(losses, optimizer_step=0, regulariser=kl)
    expected = 0.01 + expected_solution.coefficients @ rows[:3] + rows[3]
    torch.testing.assert_close(_grads(model), expected)
    torch.testing.assert_close(report.weights, expected_solution.weights)
    torch.testing.assert_close(report.ema_weights, report.weights)  # the first solve sets the EMA
    torch.testing.assert_close(report.grad_norms, rows[:3].norm(dim=1))
    assert report.status == "balanced" and report.min_cosine >= -1e-9
    metrics = report.metrics()
    assert metrics["balance/min_cos_negative"] == 0.0 and set(metrics) >= {"balance/weight/a", "balance/cos/c"}


def test_ema_stays_on_the_simplex_and_rho_zero_is_the_raw_solve():
    x, target, advantages = _batch()
    for rho in (0.0, 0.7):
        model = _model()
        balancer = GradientBalancer(BalanceConfig(method="marble", every=1, ema=rho), ["a", "b", "c"],
                                    list(model.parameters()))  # fmt: skip
        previous = None
        for step in range(3):
            adv = advantages.roll(step, dims=0)
            report = balancer.solve(_losses(model, x, target, adv)[0], optimizer_step=step)
            alpha = balancer.weights
            assert bool((alpha >= 0).all()) and float(alpha.sum()) == pytest.approx(1.0)
            expected = report.weights if previous is None or rho == 0 else rho * previous + (1 - rho) * report.weights
            torch.testing.assert_close(alpha, expected)
            previous = alpha


def test_amortising_the_coefficients_reproduces_the_solve_and_the_weights_do_not_when_norms_differ():
    x, target, advantages = _batch()
    advantages[:, 0] *= 20  # reward a's gradient is far larger than the others'
    directions = {}
    for amortise in ("weights", "coefficients"):
        model = _model()
        params = list(model.parameters())
        balancer = GradientBalancer(BalanceConfig(method="marble", ema=0.0, amortise=amortise), ["a", "b", "c"],
                                    params)  # fmt: skip
        balancer.solve(_losses(model, x, target, advantages)[0], optimizer_step=0)
        solved = _grads(model).clone()
        model.zero_grad()
        balancer.amortised_loss(_losses(model, x, target, advantages)[0]).backward()
        directions[amortise] = (solved, _grads(model).clone())
    solved, amortised = directions["coefficients"]
    torch.testing.assert_close(amortised, solved)
    solved, amortised = directions["weights"]
    assert float(torch.nn.functional.cosine_similarity(amortised, solved, dim=0)) < 0.99
    with pytest.raises(ConfigError, match="balance.amortise"):
        BalanceConfig(amortise="raw")


def test_due_follows_the_schedule_and_the_state_round_trips():
    model = _model()
    x, target, advantages = _batch()
    balancer = GradientBalancer(BalanceConfig(method="marble", every=3, ema=0.5), ["a", "b", "c"],
                                list(model.parameters()))  # fmt: skip
    assert balancer.due(0)
    balancer.solve(_losses(model, x, target, advantages)[0], optimizer_step=0)
    assert [balancer.due(s) for s in range(7)] == [False, False, False, True, True, True, True]
    other = GradientBalancer(balancer.cfg, ["a", "b", "c"], list(model.parameters()))
    other.load_state_dict(balancer.state_dict())
    assert torch.equal(other.weights, balancer.weights) and not other.due(2) and other.due(3)
    with pytest.raises(ValueError, match="rewards"):
        GradientBalancer(balancer.cfg, ["a", "b", "z"], list(model.parameters())).load_state_dict(
            balancer.state_dict()
        )


def test_amortised_backward_equals_the_weighted_sum_of_reward_gradients_on_a_tiny_sd3_transformer():
    """On a real diffusers transformer with a LoRA: the single backward of ``amortised_loss`` gives exactly
    ``sum_k alpha_k g_k``; for a loss affine in the advantage, ``combined_advantages`` gives the same gradient."""
    from peft import LoraConfig

    from diffalign.pipelines.tiny import tiny_sd3

    transformer = tiny_sd3().transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    params = [p for p in transformer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    B = 4
    x = torch.randn(B, 4, 16, 16, generator=g)
    text = torch.randn(B, 8, 32, generator=g)
    pooled = torch.randn(B, 64, generator=g)
    target = torch.randn(B, 4, 16, 16, generator=g)
    advantages = torch.randn(B, 3, generator=g)

    def forward():
        v = transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=torch.full((B,), 500.0), return_dict=False)[0]  # fmt: skip
        return ((v - target) ** 2).mean(dim=(1, 2, 3))

    balancer = GradientBalancer(BalanceConfig(method="marble", every=10, ema=0.7), ["a", "b", "c"], params)
    per_sample = forward()
    balancer.solve(reward_losses(lambda a: a * per_sample, advantages), optimizer_step=0)
    alpha = balancer.weights
    assert bool((alpha > 0).sum() >= 2)

    per_sample = forward()
    losses = reward_losses(lambda a: a * per_sample, advantages)
    rows = _autograd_rows_of(params, losses)
    for p in params:
        p.grad = None
    balancer.amortised_loss(losses).backward()
    amortised = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(amortised, alpha.float() @ rows, rtol=1e-5, atol=1e-7)

    for p in params:
        p.grad = None
    (balancer.combined_advantages(advantages) * forward()).mean().backward()
    combined = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(combined, amortised, rtol=1e-5, atol=1e-7)


def _autograd_rows_of(params, losses) -> torch.Tensor:
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])


def test_a_grad_scaler_scales_what_is_written_not_what_is_solved_or_reported(request):
    """With fp16 loss scaling (accelerate's GradScaler), ``.grad`` holds scaled gradients for the scaler to unscale:
    the balancer writes the scaled direction, while weights and norms are those of the unscaled gradients."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what Accelerator(mixed_precision="fp16") sets
    x, target, advantages = _batch()
    reports, grads = [], []
    for accelerator in (None, acc):
        model = _model()
        balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b", "c"], list(model.parameters()),
                                    accelerator=accelerator)  # fmt: skip
        losses, kl = _losses(model, x, target, advantages)
        reports.append(balancer.solve(losses, optimizer_step=0, regulariser=kl))
        grads.append(_grads(model))
    torch.testing.assert_close(grads[1], 1024.0 * grads[0])
    torch.testing.assert_close(reports[1].weights, reports[0].weights)
    torch.testing.assert_close(reports[1].grad_norms, reports[0].grad_norms)
    assert reports[1].update_norm == pytest.approx(reports[0].update_norm)


def test_measure_reports_the_conflict_of_a_weighted_sum():
    """Two rewards whose gradients nearly oppose, one much larger: the summed update points against the small one;
    ``measure`` writes the update's own gradient and reports the negative cosine."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    big = -(w * torch.tensor([10.0, 1.0], dtype=torch.float64)).sum()
    small = -(w * torch.tensor([-1.0, 0.5], dtype=torch.float64)).sum()
    balancer = GradientBalancer(BalanceConfig(method="sum", every=2), ["big", "small"], [w])
    report = balancer.measure([big, small], big + small, optimizer_step=0)
    torch.testing.assert_close(w.grad, torch.tensor([-9.0, -1.5], dtype=torch.float64))
    assert report.min_cosine < 0 and report.metrics()["balance/min_cos_negative"] == 1.0
    assert float(report.cosines[0]) > 0 and not balancer.due(1) and balancer.due(2)


def test_a_nan_gradient_is_excluded_and_logged(caplog):
    model = _model()
    x, target, advantages = _batch()
    losses, _ = _losses(model, x, target, advantages)
    losses[1] = losses[1] * float("nan")
    balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b", "c"], list(model.parameters()))
    with caplog.at_level(logging.WARNING, logger="diffalign.balance"):
        report = balancer.solve(losses, optimizer_step=0)
    assert report.excluded == {"b": "non-finite"} and float(report.weights[1]) == 0.0
    assert "['b']" in caplog.text
    assert bool(torch.isfinite(_grads(model)).all())


def test_every_gradient_nan_is_an_error_and_leaves_grad_alone():
    model = _model()
    x, target, advantages = _batch()
    losses, kl = _losses(model, x, target, advantages)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b", "c"], list(model.parameters()))
    with pytest.raises(BalanceError, match="non-finite"):
        balancer.solve([loss * float("nan") for loss in losses], optimizer_step=0, regulariser=kl)
    assert bool((_grads(model) == 1).all())
    losses, kl = _losses(model, x, target, advantages)
    with pytest.raises(BalanceError, match="regulariser"):
        balancer.solve(losses, optimizer_step=0, regulariser=kl * float("inf"))


def test_all_zero_gradients_give_only_the_regulariser():
    model = _model()
    x, target, _ = _batch()
    zero_adv = torch.zeros(8, 3, dtype=torch.float64)
    losses, kl = _losses(model, x, target, zero_adv)
    kl_grad = _autograd_rows(model, [kl])[0]
    balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b", "c"], list(model.parameters()))
    report = balancer.solve(losses, optimizer_step=0, regulariser=kl)
    assert report.status == "all_zero" and balancer.weights is None and balancer.due(0)
    torch.testing.assert_close(_grads(model), kl_grad)


def test_bad_configuration_names_the_key():
    with pytest.raises(ConfigError, match="balance.method"):
        BalanceConfig(method="mean")
    with pytest.raises(ConfigError, match="balance.every"):
        BalanceConfig(every=0)
    with pytest.raises(ConfigError, match="balance.ema"):
        BalanceConfig(ema=1.0)
    model = _model()
    with pytest.raises(ConfigError, match="balance.method.*one reward"):
        GradientBalancer(BalanceConfig(method="marble"), ["only"], list(model.parameters()))
    balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b"], list(model.parameters()))
    with pytest.raises(BalanceError, match="first micro-step must be a solve"):
        balancer.amortised_loss([torch.zeros(()), torch.zeros(())])
    with pytest.raises(ValueError, match="depends on the parameters"):
        balancer.solve([torch.zeros(()), torch.zeros(())], optimizer_step=0)


# ----------------------------------------------------------------------------------------------- advantages
def _table():
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(12, 3, generator=g)
    groups = torch.arange(3).repeat_interleave(4)
    return rewards, groups


def test_sum_is_flow_grpos_advantage_of_the_weighted_total():
    from diffalign.algorithms.flow_grpo import group_advantages

    rewards, groups = _table()
    out = reward_advantages(rewards, groups, "sum", ["a", "b", "c"], weights=[1.0, 2.0, 0.5])
    total = rewards @ torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(out.values[:, 0], group_advantages(total, groups, global_std=True))
    assert out.names == ["total"]


def test_per_reward_advantages_keep_abstentions_as_nan():
    rewards, groups = _table()
    rewards[[0, 1, 6], 2] = float("nan")
    out = reward_advantages(rewards, groups, "marble", ["a", "b", "c"])
    assert out.values.shape == (12, 3) and out.valid[:, 2].sum() == 9 and not bool(out.valid[[0, 1, 6], 2].any())
    valid = ~torch.isnan(rewards[:, 2])
    r = rewards[valid, 2]
    std = r.std(unbiased=False)
    for group in range(3):
        member = valid & (groups == group)
        expected = (rewards[member, 2] - rewards[member, 2].mean()) / (std + 1e-4)
        torch.testing.assert_close(out.values[member, 2], expected)
    torch.testing.assert_close(out.values[:, 0], normalise_per_group(rewards[:, 0], groups))


def test_gdpo_normalises_per_reward_then_over_the_batch():
    rewards, groups = _table()
    rewards[:, 1] *= 100.0  # a reward with a large spread
    rewards[3, :] = float("nan")  # a sample every reward abstains on
    out = reward_advantages(rewards, groups, "gdpo", ["a", "b", "c"])
    values = out.values[:, 0]
    assert torch.isnan(values[3]) and int(torch.isnan(values).sum()) == 1
    valid = values[~torch.isnan(values)]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    per_reward = torch.stack([normalise_per_group(rewards[:, k], groups) for k in range(3)], dim=1)
    s = per_reward.sum(dim=1)
    expected = (s - s.nanmean()) / (s[~torch.isnan(s)].std(unbiased=False) + 1e-4)
    torch.testing.assert_close(values, expected, equal_nan=True)


def test_a_reward_abstaining_on_the_whole_batch_is_excluded_and_all_abstaining_is_an_error(caplog):
    rewards, groups = _table()
    rewards[:, 1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="diffalign.balance"):
        out = reward_advantages(rewards, groups, "marble", ["a", "b", "c"])
    assert out.excluded == ["b"] and "['b']" in caplog.text and bool(torch.isnan(out.values[:, 1]).all())
    with pytest.raises(BalanceError, match="every reward abstains"):
        reward_advantages(torch.full((12, 3), float("nan")), groups, "gdpo", ["a", "b", "c"])
    with pytest.raises(ConfigError, match="balance.method.*one reward"):
        reward_advantages(rewards[:, :1], groups, "marble", ["a"])
    with pytest.raises(ConfigError, match="weights must be 1"):
        reward_advantages(rewards, groups, "marble", ["a", "b", "c"], weights=[1.0, 2.0, 1.0])


def test_reward_losses_mask_abstentions_and_reward_table_stacks_components():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    advantages = torch.tensor([[1.0, float("nan")], [2.0, float("nan")], [float("nan"), float("nan")]])
    losses = reward_losses(lambda a: a * x, advantages)
    assert losses[0].item() == pytest.approx((1 * 1 + 2 * 2) / 2) and losses[1].item() == 0.0
    assert losses[1].requires_grad  # still attached: every process can run the same backward passes
    table, names = reward_table({"p": torch.ones(3), "q": torch.zeros(3)})
    assert names == ["p", "q"] and table.shape == (3, 2)


# ----------------------------------------------------------------------------------------------- 2 processes
def _shared_problem():
    """The global batch of the 2-process test (16 samples: each half has the same abstentions per reward)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    target = torch.randn(16, 4, generator=g, dtype=torch.float64)
    advantages = torch.randn(16, 3, generator=g, dtype=torch.float64)
    advantages[[2, 9], 1] = float("nan")
    return x, target, advantages


def _worker(out: str) -> None:
    """One process of the 2-process run: the balancer on this process's half under DDP, then under FSDP2."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    acc = Accelerator(cpu=True)
    x, target, advantages = _shared_problem()
    rows = slice(8 * acc.process_index, 8 * (acc.process_index + 1))
    result = {}
    for mode in ("ddp", "fsdp"):
        model = _model()
        if mode == "ddp":
            network = acc.prepare(model)
        else:
            fully_shard(model[0])
            fully_shard(model[2])
            network = fully_shard(model)
        cfg = BalanceConfig(method="marble", every=10, ema=0.7)
        balancer = GradientBalancer(cfg, ["a", "b", "c"], list(model.parameters()), accelerator=acc)
        with balancer.solve_context(network):
            losses, kl = _losses(network, x[rows], target[rows], advantages[rows])
            report = balancer.solve(losses, optimizer_step=0, regulariser=kl)
        grads = [p.grad.full_tensor() if mode == "fsdp" else p.grad for p in model.parameters()]
        result[f"{mode}.weights"] = report.weights
        result[f"{mode}.grad"] = torch.cat([g.reshape(-1) for g in grads])
    path = os.path.join(out, f"rank{acc.process_index}.safetensors")
    save_file({k: v.contiguous() for k, v in result.items()}, path)


def test_two_processes_ddp_and_fsdp2_give_the_weights_of_one_process(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           __file__, str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"accelerate launch failed:\n{result.stderr[-3000:]}")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    model = _model()
    x, target, advantages = _shared_problem()
    balancer = GradientBalancer(BalanceConfig(method="marble"), ["a", "b", "c"], list(model.parameters()))
    losses, kl = _losses(model, x, target, advantages)
    expected = balancer.solve(losses, optimizer_step=0, regulariser=kl)
    assert int((expected.weights > 0).sum()) >= 2, "the problem should balance more than one reward"
    for rank in ranks:
        for mode in ("ddp", "fsdp"):
            torch.testing.assert_close(rank[f"{mode}.weights"], expected.weights, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(rank[f"{mode}.grad"], _grads(model), rtol=1e-9, atol=1e-12)
    assert torch.equal(ranks[0]["ddp.weights"], ranks[1]["ddp.weights"])
    assert torch.equal(ranks[0]["fsdp.weights"], ranks[1]["fsdp.weights"])


if __name__ == "__main__":
    _worker(sys.argv[1])
