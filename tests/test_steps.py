"""Step maths: log-probs against torch.distributions, SDE -> ODE limit, re-scoring, marginal preservation."""

import math

import pytest
import torch

from diffalign.sampling.steps import STEP_KINDS, gaussian_log_prob, ode_step, step

SDE_KINDS = [k for k in STEP_KINDS if k != "ode"]


def _inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 5, 5, generator=g)
    v = torch.randn(batch, 3, 5, 5, generator=g)
    t = torch.tensor([0.9, 0.6, 0.4, 1.0])[:batch]
    t_next = torch.tensor([0.7, 0.5, 0.1, 0.8])[:batch]
    return x, v, t, t_next


@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_equals_torch_normal(kind, reduce):
    x, v, t, t_next = _inputs()
    out = step(kind, x, v, t, t_next, noise_level=0.7, generator=torch.Generator().manual_seed(1), reduce=reduce)
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    ref = normal.log_prob(out.x_next)
    ref = ref.mean(dim=(1, 2, 3)) if reduce == "mean" else ref.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_rescoring_a_sampled_transition_returns_its_log_prob(kind):
    x, v, t, t_next = _inputs(2)
    out = step(kind, x, v, t, t_next, noise_level=0.8, generator=torch.Generator().manual_seed(3))
    again = step(kind, x, v, t, t_next, noise_level=0.8, x_next=out.x_next)
    assert torch.equal(again.log_prob, out.log_prob)
    other = step(kind, x, v + 0.1, t, t_next, noise_level=0.8, x_next=out.x_next)
    assert (other.log_prob < out.log_prob + 1e-6).all() or not torch.equal(other.log_prob, out.log_prob)


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_sde_step_tends_to_ode_step_as_noise_vanishes(kind):
    x, v, t, t_next = _inputs(4)
    ode = ode_step(x, v, t, t_next)
    gaps = []
    for level in (1e-1, 1e-2, 1e-3, 1e-4):
        out = step(kind, x, v, t, t_next, noise_level=level, generator=torch.Generator().manual_seed(0))
        gaps.append((out.x_next - ode.x_next).abs().max().item())
    assert gaps[-1] < 1e-3
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))


def test_ode_step_is_euler_and_has_no_density():
    x, v, t, t_next = _inputs()
    out = ode_step(x, v, t, t_next)
    torch.testing.assert_close(out.x_next, x + (t_next - t).view(-1, 1, 1, 1) * v)
    assert torch.isnan(out.log_prob).all() and (out.std == 0).all()


def test_cps_last_step_is_deterministic():
    x, v, _, _ = _inputs(batch=2)
    out = step("cps", x, v, 0.2, 0.0, noise_level=0.9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x_next, x - 0.2 * v)  # x0_hat
    assert torch.isnan(out.log_prob).all()


def test_flow_sde_first_step_uses_next_time_in_denominator():
    x, v, _, _ = _inputs(batch=1)
    out = step("flow_sde", x, v, 1.0, 0.8, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    expected = 0.7 * math.sqrt(1.0 / (1 - 0.8)) * math.sqrt(0.2)
    assert out.std.item() == pytest.approx(expected, rel=1e-6)


def test_bad_step_inputs():
    x, v, t, t_next = _inputs()
    with pytest.raises(ValueError, match="t_next < t"):
        step("flow_sde", x, v, t_next, t)
    with pytest.raises(ValueError, match="unknown step kind"):
        step("euler_maruyama", x, v, t, t_next)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, x, torch.ones(4), reduce="max")


# ---------------------------------------------------------------- analytic Gaussian flow
# Data x0 ~ N(m, s^2) per coordinate, x_t = (1-t) x0 + t eps. Then x_t ~ N((1-t) m, (1-t)^2 s^2 + t^2) and the
# exact velocity is E[eps - x0 | x_t] = (x_t - (1-t) m) * (t - (1-t) s^2) / var_t - m.
M, S = 1.5, 0.5


def exact_velocity(x, t):
    var = (1 - t) ** 2 * S**2 + t**2
    return (x - (1 - t) * M) * (t - (1 - t) * S**2) / var - M


@pytest.mark.parametrize(("kind", "level"), [("flow_sde", 0.7), ("dance", 0.5), ("ode", 0.0)])
def test_samplers_preserve_gaussian_marginals(kind, level):
    g = torch.Generator().manual_seed(0)
    n, steps = 40000, 200
    times = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 1, 1, 1, generator=g)
    for i in range(steps):
        t, t_next = times[i].item(), times[i + 1].item()
        v = exact_velocity(x, t)
        x = step(kind, x, v, t, t_next, noise_level=level, generator=g).x_next
        if i == steps // 2:  # an intermediate marginal too
            mid = (1 - t_next) ** 2 * S**2 + t_next**2
            assert x.mean().item() == pytest.approx((1 - t_next) * M, abs=0.03)
            assert x.var().item() == pytest.approx(mid, rel=0.05)
    assert x.mean().item() == pytest.approx(M, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.05)


def test_cps_keeps_the_mean_but_not_the_spread():
    """CPS injects fresh noise of std ``t_next sin(eta pi/2)`` at every step whatever the step size, re-using the
    posterior-mean ``eps_hat``; so it is not a discretised SDE: the mean is kept, the spread shrinks and does not
    recover with more steps (std 0.42 instead of 0.5 here). This is the published method's behaviour."""
    g = torch.Generator().manual_seed(0)
    finals = []
    for steps in (40, 200):
        times = torch.linspace(1, 0, steps + 1)
        x = torch.randn(40000, 1, 1, 1, generator=g)
        for i in range(steps):
            t, t_next = times[i].item(), times[i + 1].item()
            x = step("cps", x, exact_velocity(x, t), t, t_next, noise_level=0.7, generator=g).x_next
        assert x.mean().item() == pytest.approx(M, abs=0.02)
        finals.append(x.std().item())
    assert all(0.75 * S < s < 0.9 * S for s in finals), finals
