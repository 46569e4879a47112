"""RTDMD (AC-DMD cold start, then the hybrid policy gradient with SubGRPO): the maths on Gaussian data (the
re-noising kernel's marginal, the unbiased ambient target, the unbiased consistency estimator), then on tiny real
SD3 models the generator direction, gradient truncation, the two time-scales, SubGRPO and the shared noise, the
zero policy gradient of the deterministic last step, reward back-propagation, exact resume of both stages, the
export (one LoRA; CPS at eta 1 equals the stock scheduler's stochastic sampling) and bad configs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffalign.algorithms.dmd import FAKE, GENERATOR, read_student
from diffalign.algorithms.rtdmd import (
    FAKE_DIR,
    RLMicro,
    RTDMDJob,
    RTDMDTrainer,
    ambient_loss,
    ambient_target,
    combined_advantages,
    consistency,
    renoise,
    shared_noise,
    subgrpo_steps,
)
from diffalign.config import ConfigError, load_config
from diffalign.pipelines import load_flow_model
from diffalign.pipelines.tiny import build_tiny
from diffalign.sampling.steps import cps_step
from diffalign.training.loop import TrainContext, run_training

PROMPTS = ["a red circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ maths, Gaussian data
def test_the_renoised_state_has_the_flows_marginal_at_the_target_time():
    """x0 ~ N(m, c^2): x_s = (1-s) x0 + s e is re-noised to t; its mean and variance are the flow's at t."""
    m, c = 0.7, 0.4
    for s, t in ((0.0, 0.3), (0.5, 0.8), (0.9, 0.95)):
        tt = torch.full((1,), t)
        # analytic: a (1 - s) = 1 - t and a^2 s^2 + sigma^2 = t^2 (so the variance is (1-t)^2 c^2 + t^2)
        one, sigma = renoise(torch.ones(1, 1, 1, 1), s, tt, torch.zeros(1, 1, 1, 1))
        a = float(one)
        assert a * (1 - s) == pytest.approx(1 - t, abs=1e-6)
        assert a**2 * s**2 + float(sigma) ** 2 == pytest.approx(t**2, abs=1e-6)
        g = torch.Generator().manual_seed(0)
        n = 200_000
        x0 = m + c * torch.randn(n, 1, 1, 1, generator=g)
        x_s = (1 - s) * x0 + s * torch.randn(n, 1, 1, 1, generator=g)
        x_t, _ = renoise(x_s, s, tt.expand(n), torch.randn(n, 1, 1, 1, generator=g))
        assert float(x_t.mean()) == pytest.approx((1 - t) * m, abs=0.01)
        assert float(x_t.var()) == pytest.approx((1 - t) ** 2 * c**2 + t**2, rel=0.01)


def test_the_ambient_target_is_unbiased_for_the_clean_posterior_mean():
    m, c, s, t, n = 0.5, 0.6, 0.5, 0.8, 400_000
    g = torch.Generator().manual_seed(1)
    x0 = m + c * torch.randn(n, 1, 1, 1, generator=g)
    x_s = (1 - s) * x0 + s * torch.randn(n, 1, 1, 1, generator=g)
    eps = torch.randn(n, 1, 1, 1, generator=g)
    tt = torch.full((n,), t)
    x_t, sigma = renoise(x_s, s, tt, eps)
    target = ambient_target(x_s, s, tt, eps, sigma)
    denoised = x_t - t * target
    # the identity x_t - t v* = x_s/(1-s) - (1-t) s^2 eps / ((1-s)^2 sigma)
    expected = x_s / (1 - s) - (1 - t) * s**2 * eps / ((1 - s) ** 2 * sigma.view(-1, 1, 1, 1))
    torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5)
    # regressing it on x_t gives E[x0 | x_t] = m + (1-t) c^2 / ((1-t)^2 c^2 + t^2) (x_t - (1-t) m)
    slope = (1 - t) * c**2 / ((1 - t) ** 2 * c**2 + t**2)
    design = torch.stack([torch.ones(n), x_t.flatten().double()], dim=1).double()
    coef = torch.linalg.lstsq(design, denoised.flatten().double().unsqueeze(1)).solution.flatten()
    assert float(coef[1]) == pytest.approx(slope, abs=0.02)
    assert float(coef[0]) == pytest.approx(m - slope * (1 - t) * m, abs=0.02)
    # the same regression on the clean x0 recovers the same coefficients
    coef_clean = torch.linalg.lstsq(design, x0.flatten().double().unsqueeze(1)).solution.flatten()
    torch.testing.assert_close(coef, coef_clean, atol=0.02, rtol=0)
    # at s = 0 the target is flow matching's eps - x_s
    x_t0, sigma0 = renoise(x0[:10], 0.0, tt[:10], eps[:10])
    torch.testing.assert_close(ambient_target(x0[:10], 0.0, tt[:10], eps[:10], sigma0), eps[:10] - x0[:10])


def test_the_clamp_weight_is_the_plain_velocity_mse_above_sigma_squared_0_1():
    g = torch.Generator().manual_seed(2)
    v, target = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.4, 0.5, 0.9, 1.0])
    assert float(ambient_loss(v, target, sigma)) == pytest.approx(float(((v - target) ** 2).mean()), rel=1e-6)
    small = torch.full((4,), 0.1)
    assert float(ambient_loss(v, target, small)) == pytest.approx(10 * 0.01 * float(((v - target) ** 2).mean()))


def test_the_two_transition_consistency_estimator_is_unbiased():
    g = torch.Generator().manual_seed(3)
    anchor, mu = torch.randn(8, generator=g), torch.randn(8, generator=g)
    draws = 200_000
    h_1 = mu + torch.randn(draws, 8, generator=g)
    h_2 = mu + torch.randn(draws, 8, generator=g)
    estimates = ((h_1 - anchor) * (h_2 - anchor)).mean(dim=1)
    assert float(estimates.mean()) == pytest.approx(float(((mu - anchor) ** 2).mean()), abs=0.02)
    assert float(estimates.min()) < 0  # a single draw can be negative
    assert float(consistency(h_1[0], h_1[0], anchor)) == pytest.approx(float(((h_1[0] - anchor) ** 2).mean()))
    assert float(consistency(anchor, anchor, anchor)) == 0.0  # a constant denoiser


def test_subgrpo_steps_are_a_function_of_seed_and_epoch():
    picks = [subgrpo_steps(5, e, [0, 1, 2], 2) for e in range(30)]
    assert all(len(p) == 2 and set(p) <= {0, 1, 2} for p in picks)
    assert len({tuple(p) for p in picks}) == 3  # changes across epochs
    assert [subgrpo_steps(5, e, [0, 1, 2], 2) for e in range(30)] == picks  # every process draws the same


def test_advantages_are_standardised_after_weighting():
    g = torch.Generator().manual_seed(4)
    table = torch.rand(24, 2, generator=g)
    groups = torch.arange(4).repeat_interleave(6)
    adv = combined_advantages(table, [1.0, 0.5], groups)
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(adv.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_the_deterministic_last_cps_step_has_no_policy_gradient():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    out = cps_step(x, v, 0.5, 0.0, noise_level=0.9, noise=torch.randn(3, 2, 4, 4, generator=g))
    assert (out.std == 0).all() and torch.equal(out.x_next, out.mean) and torch.isnan(out.log_prob).all()
    # the code's likelihood -(x' - mu_theta)^2 at the recorded x' = mu_old: its gradient is exactly zero
    recorded = out.x_next.detach()
    mean = cps_step(x, v, 0.5, 0.0, noise_level=0.9).mean
    (grad,) = torch.autograd.grad(-((recorded - mean) ** 2).mean(), v)
    assert not grad.any()


# ------------------------------------------------------------------------------------------------ tiny SD3
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtdmd")
    build_tiny("sd3").save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _data(root, out, stage="cold_start", cold=None):
    data = {
        "output_dir": str(out), "seed": 3, "algorithm": "rtdmd",
        "model": {"family": "sd3", "path": str(root / "sd3"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(root / "prompts.txt"),
        "eval_sets": {"train": {"prompts": str(root / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:DifferentiableRedness"}],
        "train": {"epochs": 4, "lr": 3e-3, "ema_decay": 0.5, "ema_every": 1, "eval_every": 10,
                  "checkpoint_every": 1, "eval_images_per_prompt": 1, "keep_checkpoints": 5},
        "sampling": {"num_steps": 6, "height": 32, "width": 32, "guidance_scale": 2.0},
        "dmd": {"generator_every": 2, "batch_size": 4, "real_guidance_scale": 2.0},
        "rtdmd": {"stage": stage},
    }  # fmt: skip
    if stage == "rl":
        data["rtdmd"].update({"cold_start": str(cold), "prompts_per_epoch": 2, "group_size": 4})
        data["train"].update({"epochs": 3})
    return data


def _job(root, out, stage="cold_start", cold=None, **overrides):
    return load_config(RTDMDJob, _data(root, out, stage, cold), [f"{k}={v}" for k, v in overrides.items()])


def _trainer(root, out, stage="cold_start", cold=None, **overrides) -> RTDMDTrainer:
    trainer = RTDMDTrainer(TrainContext(_job(root, out, stage, cold, **overrides)))
    trainer.ctx.train_mode(True)
    return trainer


def _lora(trainer, adapter):
    return {n: p.detach().clone() for n, p in trainer.flow.transformer.named_parameters() if f".{adapter}." in n}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cold_run(tiny, tmp_path_factory):
    """A finished 4-epoch cold start (two generator steps), the starting point of stage 2."""
    out = tmp_path_factory.mktemp("cold") / "run"
    run_training(_job(tiny, out), RTDMDTrainer)
    return out


def test_the_generator_direction_is_dmd_at_s0_and_its_noise_cancels(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    batch = trainer.collect(0)
    g = torch.Generator().manual_seed(0)
    x = batch.x_s
    t = torch.full((x.shape[0],), 0.6)
    eps, z1, z2 = (torch.randn(x.shape, generator=g) for _ in range(3))
    ours, scale = trainer.ac_direction(x, 0.0, t, eps, z1, batch.cond)
    dmd, dmd_scale = trainer.dm_direction(x, t, eps, batch.cond)
    torch.testing.assert_close(ours, dmd, rtol=1e-4, atol=1e-6)  # CPS runs in float32
    torch.testing.assert_close(scale, dmd_scale)
    # at s > 0 the mapping-back noise drops out of x_s^F - x_s^T (only the normaliser keeps it)
    s = 0.5
    a, sa = trainer.ac_direction(x, s, t, eps, z1, batch.cond)
    b, sb = trainer.ac_direction(x, s, t, eps, z2, batch.cond)
    assert a.abs().max() > 0 and not torch.allclose(sa, sb)
    torch.testing.assert_close(a * sa.view(-1, 1, 1, 1), b * sb.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)
    # with the fake score equal to the teacher (at init) and no CFG the direction is exactly 0
    plain = _trainer(tiny, tmp_path / "b", **{"dmd.real_guidance_scale": 1.0})
    zero, _ = plain.ac_direction(x, s, t, eps, z1, batch.cond)
    assert not zero.any()


def test_the_stop_index_is_shared_and_only_the_last_executed_step_has_gradient(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    stops = [trainer.collect(e).stop for e in range(16)]
    assert set(stops) == {1, 2, 3, 4}
    assert [trainer.collect(e).stop for e in range(6)] == stops[:6]  # a function of (seed, epoch) only
    batch = trainer.collect(stops.index(3))
    assert float(batch.metrics["boundary"]) == pytest.approx(float(trainer.times[3]))
    with_grad = []
    handle = trainer.flow.transformer.register_forward_hook(
        lambda m, i, o: with_grad.append(torch.is_grad_enabled()))  # fmt: skip
    terms = trainer.generator_loss(batch)
    handle.remove()
    assert with_grad.count(True) == 1  # the re-run of step k-1; the teacher and fake score run without gradient
    terms["loss_dm"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in trainer.ft.policy.trainable())
    assert all(p.grad is None for p in trainer.fake.trainable())


def test_ttur_and_the_every_iteration_ema(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    ema = trainer.ft.policy.ema
    gen, fake = _lora(trainer, GENERATOR), _lora(trainer, FAKE)
    out = trainer.update(trainer.collect(0), 0)  # generator_every 2: epoch 0 trains F alone
    assert "loss_ac" in out and "loss_consistency" in out and "loss_dm" not in out
    assert _same(gen, _lora(trainer, GENERATOR)) and not _same(fake, _lora(trainer, FAKE))
    assert ema.num_updates == 1  # the generator's EMA moved on a fake-only iteration too
    out = trainer.update(trainer.collect(1), 1)
    assert "loss_dm" in out and not _same(gen, _lora(trainer, GENERATOR))
    assert ema.num_updates == 2 and trainer.ft.policy.steps == 1 and trainer.fake.steps == 2


def test_the_fake_score_learns_the_generators_noisy_states(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", **{"dmd.fake_lr": 3e-2, "rtdmd.consistency_weight": 0.0})
    # at the clean boundary (k = K, s = 0) the target is flow matching's; noisier boundaries add irreducible
    # target variance (the 1/sigma_ts noise term) that a few steps cannot remove
    epoch = next(e for e in range(32) if trainer.collect(e).stop == trainer.cfg.num_steps)
    batch = trainer.collect(epoch)
    gen = _lora(trainer, GENERATOR)
    losses = [trainer.optimize(batch, 0, [["fake"]], trainer.loss, [FAKE])["loss_ac"] for _ in range(40)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert _same(gen, _lora(trainer, GENERATOR))


def _recovered_noise(trainer, states, cond, step):
    """The CPS noise of ``step`` of a recorded trajectory: ``(x' - mean) / std``."""
    t, t_next = float(trainer.times[step]), float(trainer.times[step + 1])
    with torch.no_grad(), trainer.network(GENERATOR):
        v = trainer.flow.velocity(states[:, step], t, cond)
    out = cps_step(states[:, step], v, t, t_next, noise_level=trainer.rt.eta)
    return (states[:, step + 1] - out.mean) / out.std.view(-1, 1, 1, 1)


def test_shared_noise_is_the_same_across_a_group_and_processes_and_only_off_the_selected_steps(
    tiny, cold_run, tmp_path
):  # fmt: skip
    trainer = _trainer(tiny, tmp_path / "a", "rl", cold_run)
    prompts = ["a red circle"] * 3 + ["a blue square"]
    cond = trainer.encode(prompts)
    selected = [1]
    seed = trainer.epoch_seed(4)
    trajectories = []
    for process in range(2):  # two processes: their own initial noise and generators, the same epoch
        g = torch.Generator().manual_seed(100 + process)
        x_init = torch.randn((4, *trainer.shape), generator=g)
        with torch.no_grad(), trainer.network(GENERATOR):
            trajectories.append(trainer.rollout(cond, prompts, x_init, selected, seed, g)[0])
    for step in (0, 2):  # unselected stochastic steps: the prompt's noise, bitwise on every sample and process
        expected = shared_noise("a red circle", step, seed, trainer.shape)
        for states in trajectories:
            noise = _recovered_noise(trainer, states, cond, step)
            for row in range(3):
                torch.testing.assert_close(noise[row], expected, rtol=1e-3, atol=1e-3)
            assert not torch.allclose(noise[3], expected, atol=0.1)  # another prompt: other noise
        assert torch.equal(shared_noise("a red circle", step, seed, trainer.shape), expected)
    a, b = (_recovered_noise(trainer, s, cond, 1) for s in trajectories)  # the selected step: fresh noise
    assert not torch.allclose(a[0], a[1], atol=0.1) and not torch.allclose(a[0], b[0], atol=0.1)
    batch = trainer.collect(4)
    assert batch.selected == subgrpo_steps(3, 4, [0, 1, 2], 2)
    assert torch.isnan(batch.log_probs[:, -1]).all() and torch.isfinite(batch.log_probs[:, :-1]).all()


def test_only_the_auxiliary_terms_train_the_deterministic_last_step(tiny, cold_run, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", "rl", cold_run)
    batch = trainer.collect(0)
    rows = torch.arange(4)
    last = trainer.cfg.num_steps - 1
    terms = trainer.rl_loss(batch, RLMicro(rows, last, 1.0))
    assert "loss_policy" not in terms and {"loss_dm", "loss_bp"} <= set(terms)
    ppo = trainer.rl_loss(batch, RLMicro(rows, batch.selected[0], 1.0))
    assert set(k for k in ppo if k.startswith("loss_")) == {"loss_policy"}
    assert torch.equal(ppo["ratio"], torch.ones(4))  # on-policy: the ratio is exactly 1
    for key in ("loss_dm", "loss_bp"):  # each auxiliary term alone reaches the generator
        trainer.ctx.modules["policy"].optimizer.zero_grad(set_to_none=True)
        trainer.rl_loss(batch, RLMicro(rows, last, 1.0))[key].backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in trainer.ft.policy.trainable()), key
    off = _trainer(tiny, tmp_path / "b", "rl", cold_run, **{"rtdmd.dm_weight": 0.0, "rtdmd.bp_weight": 0.0})
    terms = off.rl_loss(off.collect(0), RLMicro(rows, last, 1.0))
    terms["loss_dm"].backward()
    assert all(p.grad is None or not p.grad.any() for p in off.ft.policy.trainable())
    # the frozen cold-start adapters and the fake score get nothing from the generator step
    cold = [p for n, p in trainer.flow.transformer.named_parameters() if ".cold_start." in n]
    assert cold and all(not p.requires_grad and p.grad is None for p in cold)


def test_reward_backpropagation_raises_a_differentiable_reward(tiny, cold_run, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", "rl", cold_run,
                       **{"rtdmd.bp_weight": 1.0, "rtdmd.dm_weight": 0.0, "train.lr": 1e-2})  # fmt: skip
    batch = trainer.collect(0)
    last, x = trainer.cfg.num_steps - 1, batch.states[:, -2]
    t = float(trainer.times[last])

    def reward() -> float:
        with torch.no_grad(), trainer.network(GENERATOR):
            x0 = x - t * trainer.flow.velocity(x, t, batch.cond)
        return float(trainer.ft.rewards(trainer.flow.decode_latents(x0), batch.prompts).total.mean())

    before = reward()
    for _ in range(5):
        trainer.optimize(batch, 0, [[RLMicro(torch.arange(8), last, 1.0)]], trainer.loss, ["policy"])
    assert reward() > before + 1e-3, (before, reward())


# ------------------------------------------------------------------------------------------------ the loop
def _resume_matches(tiny, out, job, modules):
    resumed = out.parent / f"{out.name}-resumed"
    shutil.copytree(out, resumed)
    epochs = job.train.epochs
    for k in (epochs, epochs - 1):
        shutil.rmtree(resumed / "checkpoints" / f"step-{k:06d}")
    shutil.rmtree(resumed / "final")
    run_training(replace_output(job, resumed), RTDMDTrainer)
    ckpt = f"checkpoints/step-{epochs:06d}/modules"
    for name in modules:
        a = load_file(str(out / ckpt / f"{name}.safetensors"))
        b = load_file(str(resumed / ckpt / f"{name}.safetensors"))
        assert a and _same(a, b), name
    for path in ("final/pytorch_lora_weights.safetensors", f"{FAKE_DIR}/pytorch_lora_weights.safetensors"):
        assert _same(load_file(str(out / path)), load_file(str(resumed / path))), path


def replace_output(job, out):
    from dataclasses import replace

    return replace(job, output_dir=str(out))


def test_cold_start_kill_and_resume_is_bit_identical(tiny, cold_run):
    history = [json.loads(line) for line in (cold_run / "history.jsonl").read_text().splitlines()]
    assert [("loss_dm" in r, "loss_ac" in r) for r in history if "loss_ac" in r] == [
        (False, True), (True, True), (False, True), (True, True)]  # fmt: skip
    assert set(json.loads((cold_run / "comparison.json").read_text())) == {"student", "teacher", "teacher_naive"}
    _resume_matches(tiny, cold_run, _job(tiny, cold_run), ("policy", "policy.ema", FAKE))


def test_rl_stage_resumes_exactly_and_exports_one_lora_equal_to_the_stacked_adapters(tiny, cold_run, tmp_path):
    out = tmp_path / "rl"
    job = _job(tiny, out, "rl", cold_run)
    run_training(job, RTDMDTrainer)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    trained = [r for r in history if "loss_policy" in r]
    assert len(trained) == 3 and all("loss_ac" in r and "loss_bp" in r and "reward_mean" in r for r in trained)
    _resume_matches(tiny, out, job, ("policy", "policy.ema", FAKE))
    # final/ is one LoRA of rank 4 + 4 whose velocity is the cold-start + fresh adapters' (EMA) velocity
    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert {v.shape[0] for k, v in lora.items() if "lora_A" in k} == {8}
    trainer = _trainer(tiny, tmp_path / "live", "rl", cold_run)
    state = load_file(str(out / "checkpoints" / "step-000003" / "modules" / "policy.ema.safetensors"))
    params = dict(trainer.flow.transformer.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name.startswith("shadow."):
                params[name.removeprefix("shadow.")].copy_(value)
    merged = load_flow_model("sd3", str(tiny / "sd3"), lora=str(out / "final"), max_sequence_length=16)
    x = torch.randn(2, *trainer.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with trainer.network(GENERATOR):
            stacked = trainer.flow.velocity(x, 0.75, trainer.flow.encode_prompt(PROMPTS))
        single = merged.velocity(x, 0.75, merged.encode_prompt(PROMPTS))
    torch.testing.assert_close(single, stacked, rtol=1e-4, atol=1e-5)


def test_the_export_records_cps_and_the_stock_scheduler_reproduces_cps_at_eta_1(tiny, cold_run):
    record = read_student(cold_run / "final")
    assert record["sampler"] == "cps" and record["eta"] == 0.9 and record["num_inference_steps"] == 4
    assert "eta = 1" in record["stock_scheduler"]
    student = load_flow_model("sd3", str(tiny / "sd3"), lora=str(cold_run / "final"), max_sequence_length=16)
    times = student.time_grid(4, 32, 32, sigmas=record["sigmas"])
    noise = torch.randn(2, *student.latent_shape(32, 32), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    step_noise = [torch.randn(noise.shape) for _ in range(4)]  # what the scheduler draws, in order
    cond = student.encode_prompt(PROMPTS)
    x = noise
    with torch.no_grad():
        for i in range(4):
            v = student.velocity(x, float(times[i]), cond)
            x = cps_step(x, v, float(times[i]), float(times[i + 1]), noise_level=1.0, noise=step_noise[i]).x_next
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny / "sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    pipe.load_lora_weights(str(cold_run / "final"))
    torch.manual_seed(11)
    stock = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=4, sigmas=record["sigmas"],
                 guidance_scale=1.0, latents=noise.clone(), max_sequence_length=16,
                 output_type="latent").images  # fmt: skip
    torch.testing.assert_close(x, stock, rtol=1e-4, atol=1e-5)


def test_the_world_jobs_load():
    from diffalign.cli import _load_job

    root = Path(__file__).parent.parent / "configs" / "world"
    cold = _load_job("train", str(root / "rtdmd_cold_start.yaml"), [])
    assert isinstance(cold, RTDMDJob) and cold.rtdmd.stage == "cold_start" and cold.dmd.num_steps == 4
    rl = _load_job("train", str(root / "rtdmd.yaml"), [])
    assert rl.rtdmd.stage == "rl" and rl.rtdmd.cold_start == cold.output_dir


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("stage", "override", "match"),
    [
        ("cold_start", {"dmd.sigmas": "[1.0, 0.75, 0.5, 0.25]"}, "dmd.sigmas.*exactly 0"),
        ("cold_start", {"rtdmd.eta": 0.0}, "rtdmd.eta"),
        ("cold_start", {"rtdmd.eta": 1.5}, "rtdmd.eta"),
        ("rl", {"rtdmd.num_train_steps": 4}, "rtdmd.num_train_steps.*3 stochastic steps"),
        ("rl", {"rtdmd.train_steps_range": "[1, 3]"}, "rtdmd.train_steps_range.*not stochastic"),
        ("rl", {"rtdmd.cold_start": "null"}, "rtdmd.cold_start"),
        ("rl", {"rtdmd.group_size": 1}, "rtdmd.group_size"),
        ("rl", {"model.lora": "somewhere"}, "model.lora"),
        ("cold_start", {"rtdmd.renoise_clamp": "[0.5, 0.2]"}, "rtdmd.renoise_clamp"),
        ("cold_start", {"dmd.fake_per_step": "true"}, "dmd.fake_per_step"),
        ("cold_start", {"dmd.regression_weight": 0.25}, "dmd.regression_weight"),
    ],
)
def test_bad_configs_name_the_key(tiny, tmp_path, stage, override, match):
    with pytest.raises(ConfigError, match=match):
        _job(tiny, tmp_path / "a", stage, tmp_path / "cold", **override)


def test_a_cold_start_folder_without_loras_is_refused(tiny, tmp_path):
    (tmp_path / "cold").mkdir()
    with pytest.raises(ConfigError, match="rtdmd.cold_start.*holds no LoRA"):
        _trainer(tiny, tmp_path / "a", "rl", tmp_path / "cold")
