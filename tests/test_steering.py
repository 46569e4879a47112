"""Inference-time steering: invariants on tiny real pipelines and quality on the analytic Gaussian-mixture flow."""

import math

import pytest
import torch

from diffalign.pipelines import wrap_pipeline
from diffalign.pipelines.tiny import build_tiny
from diffalign.rewards.base import RewardError
from diffalign.sampling import SDE, sample
from diffalign.steering import METHODS, BudgetError, DiffusionTree, SteeringPipeline, SteeringProblem, steer
from diffalign.steering.analytic import (
    GaussianMixture,
    GaussianMixtureFlow,
    energy_distance,
    mean_pairwise_distance,
    measure_energy_distance,
)
from diffalign.steering.base import systematic_resample

STEPS = 5


@pytest.fixture(scope="module")
def sd3():
    return wrap_pipeline(build_tiny("sd3"))


def _mean_latent(z):
    return z.flatten(1).mean(1)


def _problem(flow, reward=_mean_latent, cfg=2.0, lam=1.0, sde=None):
    return SteeringProblem(
        flow=flow,
        cond=flow.encode_prompt(["a red circle"]),
        times=flow.time_grid(STEPS, 32, 32),
        shape=flow.latent_shape(32, 32),
        reward=reward,
        sde=sde or SDE(),
        guidance_scale=cfg,
        inverse_temperature=lam,
    )


def _plain(problem, batch, seed):
    cond, uncond = problem._batch_conds(batch)
    g = torch.Generator().manual_seed(seed)
    return sample(problem.flow, cond, problem.times, shape=problem.shape, generator=g, sde=problem.sde,
                  guidance_scale=problem.guidance_scale, uncond=uncond).final  # fmt: skip


def _constant(z):
    return torch.full((z.shape[0],), 0.3)


# ------------------------------------------------------------------------------------------ constant reward


def test_constant_reward_best_of_n_returns_the_first_plain_sample(sd3):
    problem = _problem(sd3, _constant)
    out = steer(problem, "best_of_n", 4 * problem.sample_cost, generator=torch.Generator().manual_seed(5))
    assert out.info["candidates"] == 4
    assert torch.equal(out.latents[0], _plain(problem, 4, 5)[0])


def test_constant_reward_smc_never_resamples_and_equals_plain_sampling(sd3):
    problem = _problem(sd3, _constant)
    out = steer(problem, "smc", 3 * problem.sample_cost, generator=torch.Generator().manual_seed(6))
    assert out.info["resample_steps"] == [] and out.info["ancestors"].tolist() == [0, 1, 2]
    assert torch.equal(out.latents, _plain(problem, 3, 6))


def test_constant_reward_doob_correction_is_zero_and_samples_equal_plain(sd3):
    problem = _problem(sd3, _constant)
    out = steer(problem, "doob", 10_000, num_samples=2, num_candidates=4, generator=torch.Generator().manual_seed(7))
    assert all(n == 0 for n in out.info["shift_norms"])
    assert torch.equal(out.latents, _plain(problem, 2, 7))


@pytest.mark.parametrize("search", [False, True])
def test_constant_reward_tree_values_are_constant_and_rollouts_are_plain_samples(sd3, search):
    problem = _problem(sd3, _constant)
    widening = {} if search else {"widening": 1.0, "alpha": 0.5}  # the weighted DTS then branches below the root
    tree = DiffusionTree(problem, search=search, branch_steps=[0, 2], generator=torch.Generator().manual_seed(8),
                         **widening)  # fmt: skip
    tree.grow(24 * problem.sample_cost)
    tree.sample(1, readout="greedy")  # brings the weighted tree's uniform soft values up to date
    assert all(n.value == pytest.approx(0.3, abs=1e-6) for n in tree.nodes[1:])
    # the first wave rolls out from the root together, exactly as plain sampling of that batch: 2 rollouts with
    # the paper's widening, a whole wave of 16 for the weighted DTS (whose level counts start at the root)
    first = 2 if search else 16
    assert torch.equal(torch.stack([tree.nodes[i].state for i in tree.leaves[:first]]), _plain(problem, first, 8))
    if not search:  # every importance weight is 1: the weighted read-out is uniform over the leaves
        ids, probs = tree.leaf_probabilities()
        torch.testing.assert_close(probs, torch.full_like(probs, 1 / len(ids)))
        assert len(ids) > 24 and any(len(tree.nodes[n].children) > 1 for n in tree.by_level[1])  # it branched
    # the paper's read-out is then the base process: uniform over the children at every node
    ids, probs = tree.leaf_probabilities("paper")
    for leaf, p in zip(ids, probs.tolist(), strict=True):
        expected, node = 1.0, tree.nodes[leaf]
        while node.parent >= 0:
            expected /= len(tree.nodes[node.parent].children)
            node = tree.nodes[node.parent]
        assert p == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ NFE accounting


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nfe_equals_transformer_rows_and_respects_the_budget(sd3, method):
    rows = []
    handle = sd3.transformer.register_forward_hook(
        lambda m, a, kw, o: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    problem = _problem(sd3)
    budget = 7 * problem.sample_cost + 3
    try:
        out = steer(problem, method, budget, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert out.nfe == sum(rows) <= budget
    assert out.nfe >= problem.sample_cost and out.latents.shape[1:] == problem.shape
    assert torch.isfinite(out.rewards).all()


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_cuda_with_a_cuda_generator(method):
    """On a GPU the sampling generator lives on the GPU; every method still counts NFE exactly and stays finite."""
    flow = wrap_pipeline(build_tiny("sd3").to("cuda"))
    rows = []
    handle = flow.transformer.register_forward_hook(
        lambda m, a, kw, o: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    problem = _problem(flow, lam=5.0)
    budget = 7 * problem.sample_cost + 3
    try:
        out = steer(problem, method, budget, generator=torch.Generator("cuda").manual_seed(0))
    finally:
        handle.remove()
    assert out.nfe == sum(rows) <= budget and out.latents.device.type == "cuda"
    assert torch.isfinite(out.rewards).all()


@pytest.mark.gpu
def test_a_cpu_generator_for_a_cuda_model_is_a_clear_error():
    flow = wrap_pipeline(build_tiny("sd3").to("cuda"))
    problem = _problem(flow)
    for method in sorted(METHODS):
        with pytest.raises(ValueError, match="generator is on cpu but the model runs on cuda"):
            steer(problem, method, 2 * problem.sample_cost, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator is on cpu but the model runs on cuda"):
        sample(flow, problem.cond, problem.times, shape=problem.shape, generator=torch.Generator(), sde=SDE())


def test_nfe_without_cfg_counts_one_per_particle_step(sd3):
    problem = _problem(sd3, cfg=1.0)
    assert problem.step_cost == 1 and problem.sample_cost == STEPS
    out = steer(problem, "best_of_n", 3 * STEPS, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 3 * STEPS


@pytest.mark.parametrize("search", [False, True])
def test_tree_is_anytime_and_read_out_needs_no_model_calls(sd3, search):
    problem = _problem(sd3)
    tree = DiffusionTree(problem, search=search, branch_steps=[0, 2, 4], generator=torch.Generator().manual_seed(1))
    first = tree.grow(5 * problem.sample_cost)
    leaves = len(tree.leaves)
    second = tree.grow(5 * problem.sample_cost)
    assert len(tree.leaves) > leaves and tree.nfe == first + second
    nfe = sd3.nfe
    for readout in ("paper", "best", "greedy", *(() if search else ("weighted",))):
        latents, rewards, ids = tree.sample(3, readout=readout)
        assert latents.shape == (3, *problem.shape)
        torch.testing.assert_close(rewards, _mean_latent(latents))
    assert sd3.nfe == nfe
    # the paper's greedy read-out follows argmax v: its leaf has the best value among its siblings
    _, _, (greedy,) = tree.sample(1, readout="greedy")
    siblings = tree.nodes[tree.nodes[greedy].parent].children
    assert tree.nodes[greedy].value == max(tree.nodes[c].value for c in siblings)


def test_dts_star_returns_the_best_leaves_it_found_and_distinct_ones_for_several_samples(sd3):
    problem = _problem(sd3)
    out = steer(problem, "dts_star", 12 * problem.sample_cost, num_samples=4, branch_steps=[0, 2, 4], widening=1.0,
                alpha=0.5, generator=torch.Generator().manual_seed(2))  # fmt: skip
    tree = out.info["tree"]
    found = sorted((tree.nodes[i].reward for i in tree.leaves), reverse=True)
    assert len(found) > 4 and out.rewards.tolist() == pytest.approx(found[:4])
    assert out.rewards[0] == pytest.approx(out.info["best_reward"])
    assert torch.equal(out.latents[0], tree.best_leaf()[0])
    assert len({tuple(z.flatten().tolist()) for z in out.latents}) == 4  # distinct leaves, not copies of one
    # the paper's greedy walk is still available; it returns a leaf of the highest-value subtree, often not the best
    greedy, greedy_rewards, _ = tree.sample(4, readout="greedy")
    assert greedy_rewards[0] <= out.rewards[0] and len({tuple(z.flatten().tolist()) for z in greedy}) == 4
    with pytest.raises(BudgetError, match="too few"):
        tree.sample(len(tree.leaves) + 1)


def test_progressive_widening_bounds_every_node_and_a_narrow_setting_branches_below_the_root(sd3):
    """``|children| < C N^alpha + 1`` everywhere. With the paper's C = 2, alpha = 0.8 the root keeps widening for
    the first ~35 iterations, so a 10-sample budget is 10 rollouts from the root (best-of-10); C = 1,
    alpha = 0.5 spends the same budget on fewer initial noises and branches below them."""
    problem = _problem(sd3)
    shape = {}
    for widening, alpha in [(2.0, 0.8), (1.0, 0.5)]:
        tree = DiffusionTree(problem, search=True, branch_steps=[0, 2, 4], widening=widening, alpha=alpha,
                             wave_size=1, generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert tree.grow(10 * problem.sample_cost) <= 10 * problem.sample_cost
        for node in tree.nodes:
            assert len(node.children) < widening * node.visits**alpha + 1
        shape[widening, alpha] = (len(tree.nodes[0].children), sum(node.level == 1 for node in tree.nodes))
    assert shape[2.0, 0.8] == (10, 10)  # every rollout from the root: one branch per initial noise
    root_children, second_level = shape[1.0, 0.5]
    assert root_children < 10 and second_level > root_children


# ------------------------------------------------------------------------------------------ steering works


def test_every_method_raises_the_reward_on_a_tiny_model(sd3):
    problem = _problem(sd3, lam=50.0)
    budget = 16 * problem.sample_cost
    base = _mean_latent(_plain(problem, 16, 3)).mean()
    for method in ["best_of_n", "dts_star", "smc"]:
        out = steer(problem, method, budget, generator=torch.Generator().manual_seed(3))
        assert out.rewards.mean() > base, method


@pytest.mark.parametrize("estimator", ["gradient", "mc"])
def test_doob_shifts_every_sample_toward_higher_reward(sd3, estimator):
    # the sampler's own noise is shared with plain sampling, so the comparison is paired sample by sample
    problem = _problem(sd3, lam=200.0)
    plain = _mean_latent(_plain(problem, 4, 4))
    out = steer(problem, "doob", 10_000, num_samples=4, estimator=estimator, num_candidates=None if estimator ==
                "gradient" else 8, generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert (out.rewards > plain).all(), (out.rewards, plain)


# ------------------------------------------------------------------------------------------ analytic target


def _ring_problem(lam, steps=40):
    mixture = GaussianMixture.ring()
    flow = GaussianMixtureFlow(mixture)
    direction = torch.tensor([1.0, 0.0])
    problem = SteeringProblem(flow=flow, cond=flow.cond(), times=torch.linspace(1, 0, steps + 1), shape=(2, 1, 1),
                              reward=lambda z: z.flatten(1) @ direction, inverse_temperature=lam)  # fmt: skip
    return problem, mixture.tilt_linear(direction, lam)


def test_gaussian_mixture_velocity_transports_noise_to_the_mixture():
    problem, _ = _ring_problem(1.0)
    mixture = problem.flow.mixture
    x = sample(problem.flow, problem.flow.cond(2000), problem.times, shape=(2, 1, 1),
               generator=torch.Generator().manual_seed(0)).final.flatten(1)  # fmt: skip
    data = mixture.sample(2000, torch.Generator().manual_seed(1))
    assert energy_distance(x, data) < 0.02
    assert energy_distance(x, data) < 0.1 * energy_distance(x, data + 1.0)


def test_tilt_linear_matches_importance_weighting():
    mixture = GaussianMixture.ring()
    c, lam = torch.tensor([0.5, -1.0]), 0.7
    x = mixture.sample(200_000, torch.Generator().manual_seed(0)).double()
    w = torch.softmax(lam * (x @ c.double()), 0)
    tilted = mixture.tilt_linear(c, lam)
    exact_mean = (tilted.weights[:, None] * tilted.means).sum(0)
    torch.testing.assert_close((w[:, None] * x).sum(0), exact_mean, atol=0.02, rtol=0)


def _mixture_problem(lam, steps=40):
    """5 Gaussians in 2-D with the linear reward ``<c, x>``: the tilted target is again a mixture, known exactly."""
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(1.5 * torch.randn(5, 2, generator=g), 0.3 + 0.2 * torch.rand(5, generator=g),
                              0.5 + torch.rand(5, generator=g))  # fmt: skip
    flow, c = GaussianMixtureFlow(mixture), torch.tensor([0.3, 0.4])
    problem = SteeringProblem(flow=flow, cond=flow.cond(), times=torch.linspace(1, 0, steps + 1), shape=(2, 1, 1),
                              reward=lambda z: z.flatten(1) @ c, inverse_temperature=lam)  # fmt: skip
    return problem, mixture.tilt_linear(c, lam), c


def _readout_distance(tree, reference, spread, reward, readout=None):
    ids, probs = tree.leaf_probabilities(readout)
    x = torch.stack([tree.nodes[i].state for i in ids])
    return measure_energy_distance(x, reference, probs, y_spread=spread), float((probs * reward(x).double()).sum())


def test_dts_converges_to_an_exact_tilted_target():
    """At lam 2 the weighted read-out distribution at 32k NFE is within 3x the distance of 800 exact target draws
    (the sampling floor of 32k NFE), closer than at 8k, and its mean reward is the target's (means of 4 seeds).
    On a tree that branches below the root from the start (C 1, alpha 0.8) it stays much closer to the target
    than the paper's read-out of the same trees, which is under-tilted."""
    problem, target, c = _mixture_problem(2.0)
    reference = target.sample(10_000, torch.Generator().manual_seed(7))
    spread = mean_pairwise_distance(reference)
    target_reward = float((target.weights * (target.means @ c.double())).sum())
    distance, reward = {}, {}
    for budget in (8_000, 32_000):
        runs = [_readout_distance(steer(problem, "dts", budget, wave_size=32, generator=torch.Generator().manual_seed(
            seed)).info["tree"], reference, spread, problem.reward) for seed in range(4)]  # fmt: skip
        distance[budget], reward[budget] = (sum(r[k] for r in runs) / 4 for k in (0, 1))
    floor = spread / (32_000 // problem.sample_cost)
    assert distance[32_000] < 3 * floor, (distance, floor)
    assert distance[32_000] < distance[8_000], distance
    assert abs(reward[32_000] - target_reward) < 0.03, (reward, target_reward)
    weighted, paper = [], []
    for seed in range(2):
        tree = steer(problem, "dts", 32_000, widening=1.0, alpha=0.8, wave_size=32,
                     generator=torch.Generator().manual_seed(seed)).info["tree"]  # fmt: skip
        assert sum(tree.level_expansions[1:]) > tree.level_expansions[0]  # most rollouts start below the root
        weighted.append(_readout_distance(tree, reference, spread, problem.reward))
        paper.append(_readout_distance(tree, reference, spread, problem.reward, "paper"))
    assert sum(w[0] for w in weighted) < 0.5 * sum(p[0] for p in paper), (weighted, paper)
    assert all(abs(w[1] - target_reward) < abs(p[1] - target_reward) for w, p in zip(weighted, paper, strict=True))


def test_systematic_resampling_is_identity_for_equal_weights_and_follows_weights():
    g = torch.Generator().manual_seed(0)
    assert systematic_resample(torch.zeros(5), g).tolist() == [0, 1, 2, 3, 4]
    idx = systematic_resample(torch.log(torch.tensor([0.0, 0.0, 1.0, 0.0]) + 1e-30), g)
    assert idx.tolist() == [2, 2, 2, 2]


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_clear_errors(sd3):
    with pytest.raises(ValueError, match="stochastic"):
        _problem(sd3, sde=None).__class__(flow=sd3, cond=sd3.encode_prompt(["x"]), times=sd3.time_grid(3, 32, 32),
                                          shape=(4, 16, 16), reward=_mean_latent, sde=None)  # fmt: skip
    for lam in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="inverse_temperature"):
            _problem(sd3, lam=lam)
    problem = _problem(sd3)
    for method in sorted(METHODS):
        with pytest.raises(BudgetError, match="below the cost"):
            steer(problem, method, problem.sample_cost - 1)
    with pytest.raises(ValueError, match="unknown steering method"):
        steer(problem, "mcts", 100)
    with pytest.raises(ValueError, match="differentiable"):
        steer(_problem(sd3, reward=lambda z: _mean_latent(z).detach()), "doob", 10_000, estimator="gradient")
    with pytest.raises(ValueError, match="even"):
        steer(problem, "doob", 10_000, num_candidates=3)
    with pytest.raises(RewardError, match="NaN"):
        steer(_problem(sd3, reward=lambda z: torch.full((z.shape[0],), float("nan"))), "best_of_n", 100)
    with pytest.raises(ValueError, match="read-outs"):
        steer(problem, "dts", 100, readout="best")
    with pytest.raises(ValueError, match="read-outs"):
        steer(problem, "dts_star", 100, readout="weighted")
    paper_tree = steer(problem, "dts", 100, readout="paper").info["tree"]
    with pytest.raises(ValueError, match="importance weights"):
        paper_tree.sample(1, readout="weighted")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_whole_float_budget_is_accepted_and_a_fractional_one_is_an_error(sd3, method):
    problem = _problem(sd3)
    budget = 7 * problem.sample_cost
    out = steer(problem, method, float(budget), generator=torch.Generator().manual_seed(0))
    assert problem.sample_cost <= out.nfe <= budget
    for bad in (budget + 0.5, float("nan"), "800"):
        with pytest.raises(ValueError, match="whole number of NFE"):
            steer(problem, method, bad, generator=torch.Generator().manual_seed(0))


def test_a_steer_config_takes_a_whole_float_budget():
    from diffalign.config import ConfigError, load_config
    from diffalign.steering.jobs import SteerJob

    assert load_config(SteerJob, {"budget": 800.0}).budget == 800
    assert load_config(SteerJob, {}, ["budget=640"]).budget == 640
    with pytest.raises(ConfigError, match="'budget'.*whole number"):
        load_config(SteerJob, {"budget": 800.5})


def test_an_empty_stochastic_window_is_a_clear_error(sd3):
    with pytest.raises(ValueError, match="sde.steps=.*selects none"):
        _problem(sd3, sde=SDE(steps=[]))
    with pytest.raises(ValueError, match="out of range"):
        _problem(sd3, sde=SDE(steps=[STEPS]))


def test_steering_transitions_follow_the_stochastic_window(sd3):
    """With ``sde.steps = [0, 1]`` the later steps are Euler steps in every method, as in plain sampling."""
    problem = _problem(sd3, _constant, sde=SDE(steps=[0, 1]))
    x = problem.initial_noise(2, torch.Generator().manual_seed(0))
    out, v = problem.transition(x, 3, torch.Generator().manual_seed(0))
    assert (out.std == 0).all()
    torch.testing.assert_close(out.x_next, x + (problem.times[4] - problem.times[3]) * v)
    tree = DiffusionTree(problem, branch_steps=[0, 1], generator=torch.Generator().manual_seed(8))
    tree.grow(16 * problem.sample_cost)
    assert torch.equal(torch.stack([tree.nodes[i].state for i in tree.leaves]), _plain(problem, 16, 8))
    with pytest.raises(ValueError, match="after the last stochastic step"):
        DiffusionTree(problem, branch_steps=[0, 3])
    assert DiffusionTree(problem).levels[:-1] == [0, 1]  # default: branch within the stochastic window
    # Doob pays look-ahead only for the two stochastic steps, and changes nothing for a constant reward
    budget = 2 * (problem.sample_cost + 2 * 2 * problem.step_cost)
    doob = steer(problem, "doob", budget, num_samples=2, num_candidates=2, generator=torch.Generator().manual_seed(3))
    assert doob.nfe == budget and torch.equal(doob.latents, _plain(problem, 2, 3))


def test_steering_pipeline_returns_images_rewards_and_nfe(sd3):
    pipe = SteeringPipeline(sd3)

    def redness(images, prompts):
        return images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1)

    out = pipe(prompt="a red circle", reward=redness, method="dts_star", budget=240.0, num_images_per_prompt=3,
               num_inference_steps=STEPS, height=32, width=32, guidance_scale=2.0, progress=False)  # fmt: skip
    pixels = [tuple(image.tobytes()) for image in out.images]
    assert len(out.images) == 3 and len(set(pixels)) == 3  # three distinct images, the tree's three best leaves
    assert out.rewards.tolist() == sorted(out.rewards.tolist(), reverse=True)

    out = pipe(prompt=["a red circle", "a blue square"], reward=redness, method="dts_star", budget=120,
               num_inference_steps=STEPS, height=32, width=32, guidance_scale=2.0, progress=False)  # fmt: skip
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert out.rewards.shape == (2,) and all(n <= 120 for n in out.nfe)
    with pytest.raises(ValueError, match="stochastic"):
        pipe(prompt="x", reward=redness, sde="ode", num_inference_steps=STEPS, height=32, width=32)


@pytest.mark.parametrize("method", ["dts_star", "smc", "doob"])
def test_steering_pipeline_on_every_family_counts_transformer_rows(family, method):
    pipe = SteeringPipeline.from_pipe(build_tiny(family))
    rows = []
    handle = pipe.flow.transformer.register_forward_hook(
        lambda m, a, kw, o: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    scale = 1.0 if pipe.flow.has_guidance_embedding else 2.0
    budget = 3 * STEPS * (1 if scale == 1.0 else 2) * (4 if method == "doob" else 1)
    try:
        out = pipe(prompt="a red circle", reward=lambda images, prompts: images.flatten(1).mean(1), method=method,
                   budget=budget, num_inference_steps=STEPS, height=32, width=32, guidance_scale=scale,
                   progress=False)  # fmt: skip
    finally:
        handle.remove()
    assert out.nfe[0] == sum(rows) <= budget and len(out.images) == 1


def test_cli_steer_writes_images_rewards_and_nfe_and_rejects_bad_configs(tmp_path, capsys):
    import json

    import yaml

    from diffalign.cli import main

    model = tmp_path / "tiny-sd3"
    build_tiny("sd3").save_pretrained(model)
    config = tmp_path / "steer.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "steer", "model": {"family": "sd3", "path": str(model)}, "method": "dts_star", "budget": 60,
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0, "sde": "flow_sde"},
        "rewards": [{"name": "tests.reward_fixtures:Redness"}],
        "method_args": {"dts_star": {"c_uct": 0.1}, "smc": {"potential": "max"}},
    }))  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "out"
    assert main(["steer", str(config), "--prompts", str(prompts), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "two blue squares"]
    assert all(r["nfe"] <= 60 and r["method"] == "dts_star" for r in rows)
    assert (out / "grid.png").exists() and (out / "00001.png").exists()
    assert json.loads((out / "summary.json").read_text())["prompts"] == 2
    bad = [("inverse_temperature=0", "'inverse_temperature'"), ("sampling.sde=ode", "'sampling.sde'"),
           ("budget=5", "'budget'"), ("method=beam", "method"),
           ("method_args.dts_star.cuct=1", "'method_args.dts_star.cuct'"),
           ("method_args.beam.c_uct=1", "'method_args.beam'")]  # fmt: skip
    for override, message in bad:
        assert main(["steer", str(config), "--prompts", str(prompts), "--out", str(out), override]) == 2
        assert message in capsys.readouterr().err


def test_world_benchmark_best_of_n_curve_is_the_mean_over_all_subsets():
    """The best-of-N curve of one pool equals brute force over every size-n subset of a pool."""
    import itertools

    from diffalign.steering.best_of_n import best_of_n_curve

    rewards = [0.25, 1.0, 0.5, 0.125, 0.75, 0.375, 0.625]
    correct = [r == 1.0 for r in rewards]
    curve = best_of_n_curve(rewards, correct)
    for n in range(1, len(rewards) + 1):
        subsets = list(itertools.combinations(range(len(rewards)), n))
        best = [max(s, key=lambda k: rewards[k]) for s in subsets]
        assert curve[n - 1][0] == pytest.approx(sum(rewards[k] for k in best) / len(subsets))
        assert curve[n - 1][1] == pytest.approx(sum(correct[k] for k in best) / len(subsets))
    assert all(b[0] >= a[0] - 1e-12 for a, b in zip(curve, curve[1:], strict=False))  # monotone up to rounding
    assert curve[-1][0] == pytest.approx(1.0)


def test_steering_follows_a_given_time_grid_in_the_pipeline_and_the_cli(sd3, tmp_path, monkeypatch):
    """``sigmas`` (a few-step student's step times) set the steering problem's grid: one best-of-1 sample is the
    plain sample on that grid, and ``diffalign steer`` passes ``sampling.sigmas`` through."""
    import yaml

    from diffalign.cli import main

    sigmas = [1.0, 0.5]
    pipe = SteeringPipeline(sd3)
    out = pipe(prompt="a red circle", reward=lambda images, prompts: images.flatten(1).mean(1), method="best_of_n",
               budget=2 * 2, num_inference_steps=2, height=32, width=32, guidance_scale=2.0, sigmas=sigmas,
               generator=torch.Generator().manual_seed(4), progress=False)  # fmt: skip
    problem = pipe.problem("a red circle", _mean_latent, num_inference_steps=2, height=32, width=32,
                           guidance_scale=2.0, sde=SDE(), inverse_temperature=1.0, sigmas=sigmas)  # fmt: skip
    assert torch.equal(problem.times, sd3.time_grid(2, 32, 32, sigmas=sigmas))
    assert not torch.equal(problem.times, sd3.time_grid(2, 32, 32))
    assert torch.equal(out.results[0].latents, _plain(problem, 1, 4))

    grids = []
    real_problem = SteeringPipeline.problem

    def recording_problem(self, *args, **kwargs):
        made = real_problem(self, *args, **kwargs)
        grids.append(made.times)
        return made

    monkeypatch.setattr(SteeringPipeline, "problem", recording_problem)
    model = tmp_path / "tiny-sd3"
    build_tiny("sd3").save_pretrained(model)
    config = tmp_path / "steer.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "steer", "model": {"family": "sd3", "path": str(model)}, "method": "best_of_n", "budget": 8,
        "sampling": {"num_steps": 2, "sigmas": sigmas, "height": 32, "width": 32, "guidance_scale": 2.0,
                     "sde": "flow_sde"},
        "rewards": [{"name": "tests.reward_fixtures:Redness"}],
    }))  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["steer", str(config), "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 0
    assert len(grids) == 1 and torch.allclose(grids[0], sd3.time_grid(2, 32, 32, sigmas=sigmas))
