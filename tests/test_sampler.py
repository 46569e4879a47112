"""The sampler loop on tiny real models: log-prob recording and re-scoring, windows, steering hooks, NFE."""

import pytest
import torch

from diffalign.pipelines import wrap_pipeline
from diffalign.pipelines.tiny import build_tiny
from diffalign.sampling import SDE, SteeringHook, sample, transition_log_prob, window
from diffalign.sampling.sampler import check_generator

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def sd3():
    return wrap_pipeline(build_tiny("sd3"))


def _run(flow, sde=None, seed=0, **kw):
    cond = flow.encode_prompt(PROMPTS)
    times = flow.time_grid(5, 32, 32)
    g = torch.Generator().manual_seed(seed)
    return sample(flow, cond, times, shape=flow.latent_shape(32, 32), generator=g, sde=sde, **kw), cond


@pytest.mark.parametrize("kind", ["flow_sde", "cps", "dance"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_rescoring_through_the_model_gives_ratio_one(sd3, kind, cfg):
    sde = SDE(kind=kind, noise_level=0.7)
    traj, cond = _run(sd3, sde, guidance_scale=cfg)
    assert traj.states.shape == (3, 6, 4, 16, 16) and traj.log_probs.shape == (3, 5)
    for i in range(traj.num_steps):
        lp = traj.log_probs[:, i]
        if torch.isnan(lp).all():  # CPS's final step (t_next = 0) is deterministic
            continue
        out = transition_log_prob(sd3, traj.states[:, i], traj.states[:, i + 1], traj.times[i], traj.times[i + 1],
                                  cond, sde=sde, guidance_scale=cfg)  # fmt: skip
        ratio = torch.exp(out.log_prob - lp)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_rescoring_with_per_sample_times_matches(sd3):
    sde = SDE(kind="flow_sde")
    traj, cond = _run(sd3, sde)
    steps = torch.tensor([0, 2, 4])  # a different step per sample, as a trainer's shuffled batch has
    rows = torch.arange(3)
    out = transition_log_prob(sd3, traj.states[rows, steps], traj.states[rows, steps + 1], traj.times[steps],
                              traj.times[steps + 1], cond, sde=sde)  # fmt: skip
    torch.testing.assert_close(out.log_prob, traj.log_probs[rows, steps], rtol=0, atol=1e-5)


def test_sde_sampler_tends_to_ode_sampler(sd3):
    ode, _ = _run(sd3, None)
    gaps = [(_run(sd3, SDE(noise_level=a))[0].final - ode.final).abs().max().item() for a in (1e-1, 1e-3)]
    assert gaps[1] < gaps[0] and gaps[1] < 1e-2


def test_window_makes_only_those_steps_stochastic(sd3):
    traj, _ = _run(sd3, SDE(steps=window(1, 2)))
    assert traj.stochastic.tolist() == [False, True, True, False, False]
    assert torch.isnan(traj.log_probs[:, [0, 3, 4]]).all() and torch.isfinite(traj.log_probs[:, [1, 2]]).all()
    with pytest.raises(ValueError, match="out of range"):
        _run(sd3, SDE(steps=[7]))


def test_same_generator_same_samples_and_seed_changes_them(sd3):
    a, _ = _run(sd3, SDE(), seed=1)
    b, _ = _run(sd3, SDE(), seed=1)
    c, _ = _run(sd3, SDE(), seed=2)
    assert torch.equal(a.states, b.states) and not torch.allclose(a.final, c.final)


def test_nfe_counts_transformer_rows(sd3):
    rows = []

    def count(module, args, kwargs, out):
        rows.append(kwargs["hidden_states"].shape[0])

    handle = sd3.transformer.register_forward_hook(count, with_kwargs=True)
    try:
        traj, _ = _run(sd3, SDE(), guidance_scale=3.0)
    finally:
        handle.remove()
    assert traj.nfe == sum(rows) == 5 * 3 * 2


class _Identity(SteeringHook):
    pass


class _BranchThenPrune(SteeringHook):
    """Doubles every particle after step 1 and keeps the even rows after step 3, nudging v on the way."""

    def __init__(self):
        self.calls = 0

    def velocity(self, index, x, t, v, cond):
        self.calls += 1
        return v

    def select(self, info):
        if info.index == 1:
            return torch.arange(info.x.shape[0]).repeat_interleave(2)
        if info.index == 3:
            return torch.arange(0, info.x.shape[0], 2)
        return None


def test_identity_hook_leaves_sampling_unchanged(sd3):
    plain, _ = _run(sd3, SDE(), seed=3)
    hooked, _ = _run(sd3, SDE(), seed=3, steering=_Identity())
    assert torch.equal(plain.states, hooked.states)
    torch.testing.assert_close(plain.log_probs, hooked.log_probs, rtol=0, atol=0, equal_nan=True)


def test_branching_and_pruning_hook(sd3):
    hook = _BranchThenPrune()
    traj, _ = _run(sd3, SDE(), seed=3, steering=hook)
    assert hook.calls == 5
    assert traj.states.shape[0] == 3 and traj.log_probs.shape == (3, 5)
    assert traj.ancestors.tolist() == [0, 1, 2]
    # siblings share their history up to the branch point
    assert torch.equal(traj.states[:, :3], _run(sd3, SDE(), seed=3)[0].states[:, :3])
    assert traj.nfe == 3 * 2 + 6 * 2 + 3


def test_sample_argument_errors(sd3):
    cond = sd3.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match="x_init or shape"):
        sample(sd3, cond, sd3.time_grid(3, 32, 32))
    with pytest.raises(ValueError, match="batch"):
        sample(sd3, cond, sd3.time_grid(3, 32, 32), x_init=torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="noise_level"):
        SDE(noise_level=0.0)
    with pytest.raises(ValueError, match="SDE.kind"):
        SDE(kind="ode")


def test_a_generator_on_another_device_than_the_model_is_a_clear_error():
    check_generator(None, "cpu")
    check_generator(torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="generator is on cpu but the model runs on meta"):
        check_generator(torch.Generator(), "meta")
