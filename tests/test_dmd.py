"""DMD2 distillation on tiny real models: the distribution-matching gradient (zero when the fake score is the
teacher, its plumbing), the fake score's flow matching, the alternating phases, exact resume of both modules,
the export that the stock diffusers pipeline samples identically, and bad configs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffalign.algorithms.dmd import FAKE, GENERATOR, DMDJob, DMDTrainer, read_student
from diffalign.config import ConfigError, load_config
from diffalign.pipelines import load_flow_model
from diffalign.pipelines.tiny import build_tiny
from diffalign.release import release
from diffalign.sampling.sampler import SDE, sample
from diffalign.training.loop import TrainContext, run_training

PROMPTS = ["a red circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd")
    build_tiny("sd3").save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _job(root, out, **overrides):
    data = {
        "output_dir": str(out), "seed": 3,
        "model": {"family": "sd3", "path": str(root / "sd3"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(root / "prompts.txt"),
        "eval_sets": {"train": {"prompts": str(root / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"epochs": 4, "lr": 3e-3, "ema_decay": 0.5, "ema_every": 1, "eval_every": 10,
                  "checkpoint_every": 1, "eval_images_per_prompt": 2, "keep_checkpoints": 5},
        "sampling": {"num_steps": 6, "height": 32, "width": 32, "guidance_scale": 2.0},
        "dmd": {"generator_every": 2, "batch_size": 4},
    }  # fmt: skip
    return load_config(DMDJob, data, [f"{k}={v}" for k, v in overrides.items()])


def _trainer(root, out, **overrides) -> DMDTrainer:
    trainer = DMDTrainer(TrainContext(_job(root, out, **overrides)))
    trainer.ctx.train_mode(True)
    return trainer


def _lora(trainer, adapter):
    return {n: p.detach().clone() for n, p in trainer.flow.transformer.named_parameters() if f".{adapter}." in n}


def _base(trainer):
    return {n: p.detach().clone() for n, p in trainer.flow.transformer.named_parameters() if "lora_" not in n}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the DM gradient
def test_generator_gradient_is_exactly_zero_when_the_fake_score_is_the_teacher(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", **{"dmd.real_guidance_scale": 1.0})
    batch = trainer.collect(1)
    terms = trainer.generator_loss(batch)
    assert float(terms["loss_dm"].detach()) == 0.0
    terms["loss_dm"].backward()
    grads = [p.grad for p in trainer.ft.policy.trainable()]
    assert grads and all(g is None or not g.any() for g in grads)
    # with CFG in the real score the teacher differs from the fake score: the same loss has a gradient
    guided = _trainer(tiny, tmp_path / "b", **{"dmd.real_guidance_scale": 3.0})
    guided.generator_loss(guided.collect(1))["loss_dm"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in guided.ft.policy.trainable())


def test_dm_loss_gradient_is_the_normalised_direction_over_numel(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    batch = trainer.collect(0)
    x = batch.x0.clone().requires_grad_(True)
    g, scale = trainer.dm_direction(x.detach(), batch.dm_t, batch.dm_noise, batch.cond)
    assert g.abs().max() > 0 and (scale > 0).all()
    xd = x.double()
    loss = 0.5 * torch.nn.functional.mse_loss(xd, (xd - g).detach())
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad.double(), g / x.numel(), rtol=1e-6, atol=1e-12)
    # the direction is the scaled x0 difference: per sample, mean |g| * scale = mean |x0_fake - x0_real|
    assert torch.isfinite(g).all()


def test_backward_simulation_stop_step_is_shared_and_covers_every_step(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    stops = [trainer.collect(e).stop for e in range(24)]
    assert set(stops) == {0, 1, 2, 3}
    assert [trainer.collect(e).stop for e in range(6)] == stops[:6]  # a function of (seed, epoch) only
    b = trainer.collect(int(stops.index(2)))
    # the trained state is the student's own (two Euler steps of G from the epoch's noise), reached without
    # gradient: the generator loss back-propagates through the last executed step only
    assert b.x_k.shape == b.x0.shape and not torch.equal(b.x_k, b.x0) and not b.x_k.requires_grad
    last = _trainer(tiny, tmp_path / "b", **{"dmd.stop": "last"})
    assert {last.collect(e).stop for e in range(6)} == {3}


def test_the_world_job_loads():
    from diffalign.cli import _load_job

    job = _load_job("train", str(Path(__file__).parent.parent / "configs" / "world" / "dmd.yaml"), [])
    assert isinstance(job, DMDJob) and job.dmd.num_steps == 4 and job.sampling.num_steps == 20


# ------------------------------------------------------------------------------------------------ the phases
def test_fake_score_loss_falls_on_a_frozen_generator(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", **{"dmd.fake_lr": 3e-2})
    gen, base = _lora(trainer, GENERATOR), _base(trainer)
    batch = trainer.collect(0)
    losses = [trainer.optimize(batch, 0, [["fake"]], trainer.loss, [FAKE])["loss_fake"] for _ in range(40)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert _same(gen, _lora(trainer, GENERATOR)) and _same(base, _base(trainer))


def test_each_phase_changes_only_its_own_parameters(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a")
    batch = trainer.collect(1)
    gen, fake, base = _lora(trainer, GENERATOR), _lora(trainer, FAKE), _base(trainer)
    trainer.optimize(batch, 1, [["generator"]], trainer.loss, [trainer.ft.policy.name])
    assert not _same(gen, _lora(trainer, GENERATOR))
    assert _same(fake, _lora(trainer, FAKE)) and _same(base, _base(trainer))
    gen = _lora(trainer, GENERATOR)
    trainer.optimize(batch, 1, [["fake"]], trainer.loss, [FAKE])
    assert not _same(fake, _lora(trainer, FAKE))
    assert _same(gen, _lora(trainer, GENERATOR)) and _same(base, _base(trainer))
    # the alternating update: epoch 0 trains the fake score alone, epoch 1 (generator_every = 2) both
    fake, gen = _lora(trainer, FAKE), _lora(trainer, GENERATOR)
    out = trainer.update(trainer.collect(0), 0)
    assert "loss_fake" in out and "loss_dm" not in out
    assert _same(gen, _lora(trainer, GENERATOR)) and not _same(fake, _lora(trainer, FAKE))
    out = trainer.update(trainer.collect(1), 1)
    assert "loss_fake" in out and "loss_dm" in out and not _same(gen, _lora(trainer, GENERATOR))


def test_a_fake_score_per_step_trains_and_answers_for_its_own_step_only(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "a", **{"dmd.fake_per_step": True})
    names = [f"{FAKE}_{k}" for k in range(4)]
    assert trainer.fake_names == names and set(names) <= set(trainer.ctx.modules)
    stops = {trainer.collect(e).stop: e for e in range(24)}
    batch = trainer.collect(stops[2])
    before = {n: _lora(trainer, n) for n in names}
    gen = _lora(trainer, GENERATOR)
    trainer.optimize(batch, stops[2], [["fake"]], trainer.loss, [trainer.fake_name(batch.stop)])
    changed = [n for n in names if not _same(before[n], _lora(trainer, n))]
    assert changed == [f"{FAKE}_2"] and _same(gen, _lora(trainer, GENERATOR))
    # the generator's direction at a step-2 sample comes from that step's fake score: it is zero where that
    # fake score is still the teacher (real CFG 1) and non-zero once it has trained
    plain = _trainer(tiny, tmp_path / "b", **{"dmd.fake_per_step": True, "dmd.real_guidance_scale": 1.0})
    b0 = plain.collect(stops[0])
    assert float(plain.generator_loss(b0)["loss_dm"].detach()) == 0.0
    plain.optimize(plain.collect(stops[2]), stops[2], [["fake"]], plain.loss, [f"{FAKE}_2"])
    assert float(plain.generator_loss(b0)["loss_dm"].detach()) == 0.0
    assert float(plain.generator_loss(plain.collect(stops[2]))["loss_dm"].detach()) > 0.0


def test_the_regression_loss_pairs_noise_with_the_teacher_sample_and_pulls_the_first_step_to_it(tiny, tmp_path):
    # real CFG 1 and an untrained fake score make the DM direction 0: the generator steps follow loss_reg alone
    trainer = _trainer(tiny, tmp_path / "a", **{"dmd.regression_weight": 1.0, "dmd.regression_pairs": 6,
                                                "dmd.real_guidance_scale": 1.0})  # fmt: skip
    which, noise, target = trainer.pairs
    assert noise.shape == target.shape == (6, *trainer.shape)
    # each target is the teacher's reference sampler (6 ODE steps, CFG 2) from that noise, on that pair's prompt
    flow, job = trainer.flow, trainer.ctx.cfg
    times = flow.time_grid(job.sampling.num_steps, 32, 32)
    with torch.no_grad(), flow.adapter(None):
        again = sample(flow, flow.encode_prompt([trainer.ft.prompts[j] for j in which]), times, x_init=noise,
                       guidance_scale=2.0, keep_states=False).final  # fmt: skip
    torch.testing.assert_close(again, target, rtol=1e-5, atol=1e-5)
    assert trainer.collect(0).reg_noise is None  # only generator steps draw pairs
    batch = trainer.collect(1)
    assert batch.reg_noise is not None and batch.reg_target.shape == batch.x0.shape
    first = trainer.generator_loss(batch)["loss_reg"].item()
    for _ in range(15):
        trainer.optimize(batch, 1, [["generator"]], trainer.loss, [trainer.ft.policy.name])
    assert trainer.generator_loss(batch)["loss_reg"].item() < 0.9 * first
    with pytest.raises(ConfigError, match="sampling.sde"):
        _job(tiny, tmp_path / "b", **{"dmd.regression_weight": 1.0, "sampling.sde": "cps"})


# ------------------------------------------------------------------------------------------------ the loop
def test_kill_and_resume_is_bit_identical_for_both_modules(tiny, tmp_path):
    out = tmp_path / "run"
    run_training(_job(tiny, out), DMDTrainer)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [("loss_dm" in r, "loss_fake" in r) for r in history if "loss_fake" in r] == [
        (False, True), (True, True), (False, True), (True, True)]  # fmt: skip
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary) == {"student", "teacher", "teacher_naive"}
    assert (out / "teacher" / "grids" / "before_train.png").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "final")
    run_training(_job(tiny, resumed), DMDTrainer)
    ckpt = "checkpoints/step-000004/modules"
    for name in ("policy", "policy.ema", FAKE):
        a = load_file(str(out / ckpt / f"{name}.safetensors"))
        b = load_file(str(resumed / ckpt / f"{name}.safetensors"))
        assert a and _same(a, b), name
    a = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert _same(a, b)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_the_exported_student_through_the_stock_pipeline_equals_our_sampler(tiny, tmp_path, eta):
    out = tmp_path / "run"
    run_training(_job(tiny, out, **{"train.epochs": 2, "train.checkpoint_every": 10, "dmd.eta": eta}), DMDTrainer)
    record = read_student(out / "final")
    assert record["family"] == "sd3" and record["num_inference_steps"] == 4
    assert record["sigmas"] == [1.0, 0.75, 0.5, 0.25] and record["times"][-1] == 0.0
    assert record["stochastic_sampling"] == (eta == 1) and record["sde"] == ("cps" if eta else "ode")
    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # the student moved

    student = load_flow_model("sd3", str(tiny / "sd3"), lora=str(out / "final"), max_sequence_length=16)
    noise = torch.randn(2, *student.latent_shape(32, 32), generator=torch.Generator().manual_seed(7))
    times = student.time_grid(4, 32, 32, sigmas=record["sigmas"])
    torch.testing.assert_close(times, torch.tensor(record["times"]))
    sde = SDE(kind="cps", noise_level=record["noise_level"]) if eta else None
    with torch.no_grad():  # the stock scheduler draws its step noise from the global generator, in step order
        ours = sample(student, student.encode_prompt(PROMPTS), times, x_init=noise, sde=sde,
                      generator=torch.Generator().manual_seed(11)).final  # fmt: skip
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny / "sd3")
    pipe.load_lora_weights(str(out / "final"))
    if eta:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "final"))
        assert pipe.scheduler.config.stochastic_sampling
    else:
        assert not (out / "final" / "scheduler_config.json").exists()
    torch.manual_seed(11)
    stock = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=record["num_inference_steps"],
                 sigmas=record["sigmas"], guidance_scale=record["guidance_scale"], latents=noise.clone(),
                 max_sequence_length=16, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    base = load_flow_model("sd3", str(tiny / "sd3"), max_sequence_length=16)
    with torch.no_grad():
        teacher = sample(base, base.encode_prompt(PROMPTS), times, x_init=noise, sde=sde,
                         generator=torch.Generator().manual_seed(11)).final  # fmt: skip
    assert (teacher - ours).abs().max() > 1e-4
    # the release ships the student's scheduler, and its card calls the pipeline with the student's times and
    # without CFG
    release(out, tmp_path / "release")
    text = (tmp_path / "release" / "README.md").read_text()
    assert f"sigmas={record['times'][:-1]!r}" in text and "guidance_scale=1.0" in text, text
    shipped = json.loads((tmp_path / "release" / "scheduler" / "scheduler_config.json").read_text())
    assert shipped.get("stochastic_sampling", False) == (eta == 1) and shipped["shift"] == 1.0


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"dmd.sigmas": "[1.0, 0.75, 0.5, 0.25]"}, "dmd.sigmas.*exactly 0"),
        ({"dmd.regression_weight": -1.0}, "dmd.regression_weight"),
        ({"dmd.regression_pairs": 0}, "dmd.regression_pairs"),
        ({"dmd.sigmas": "[1.0, 0.5, 0.75, 0.0]"}, "dmd.sigmas.*strictly decrease"),
        ({"dmd.sigmas": "[1.5, 0.5, 0.0]"}, "dmd.sigmas.*in \\[0, 1\\]"),
        ({"dmd.sigmas": "[1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0]"}, "dmd.sigmas.*fewer student steps"),
        ({"dmd.sigmas": "[1.0, 0.5, 0.4999, 0.0]"}, "dmd.sigmas.*1000-level"),
        ({"dmd.eta": "0.5"}, "dmd.eta.*stock FlowMatchEulerDiscreteScheduler"),
        ({"model.family": "flux2"}, "model.family"),
        ({"lora.rank": 0}, "lora.rank"),
        ({"dmd.generator_every": 0}, "dmd.generator_every"),
        ({"dmd.dm_time_range": "[0.5, 0.2]"}, "dmd.dm_time_range"),
    ],
)
def test_bad_configs_name_the_key(tiny, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _job(tiny, tmp_path / "a", **override)


def test_a_student_of_another_family_is_refused(tiny, tmp_path, caplog):
    from diffalign.cli import preflight
    from diffalign.config import SampleJob

    folder = tmp_path / "flux_student"
    folder.mkdir()
    record = {"family": "flux", "sigmas": [1.0, 0.5], "num_inference_steps": 2, "guidance_scale": 1.0}
    (folder / "student.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="model.lora.*'flux' teacher"):
        _job(tiny, tmp_path / "a", **{"model.lora": str(folder)})
    model = {"family": "sd3", "path": str(tiny / "sd3"), "lora": str(folder)}
    sample_job = load_config(SampleJob, {"model": model, "sampling": {"height": 32, "width": 32}})
    with pytest.raises(ConfigError, match="model.lora.*'flux' teacher"):  # diffalign sample / eval / steer
        preflight(sample_job, str(tmp_path / "out"), "--out")
    (folder / "student.json").write_text(json.dumps({**record, "family": "sd3"}))
    preflight(sample_job, str(tmp_path / "out"), "--out")  # the right family: sampled, with a hint
    assert "'sampling.sigmas=[1.0, 0.5]'" in caplog.text and "sampling.sde=ode" in caplog.text


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_dmd2_lifts_the_4_step_student_on_held_out_world_prompts(tmp_path):
    """DMD2 proper (the fake score trained on the student's samples, 5 of its steps per generator step, the
    re-noising student): 150 epochs (30 generator steps) raise the 4-step student's partial credit and strict
    accuracy on held-out world prompts (docs/dmd.md: at full length it reaches the 20-step CFG teacher)."""
    data = {
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"family": "sd3", "path": "builtin:world-sd3", "max_sequence_length": 16},
        "lora": {"rank": 16, "alpha": 32},
        "eval_sets": {"test": {"prompts": "world:test", "max_prompts": 24, "images_per_prompt": 4}},
        "rewards": [{"name": "world"}],
        "train": {"epochs": 150, "lr": 2e-4, "weight_decay": 0.01, "grad_clip": 10.0, "ema_decay": 0.9,
                  "ema_every": 1, "eval_every": 150, "checkpoint_every": 150},
        "sampling": {"num_steps": 8, "height": 64, "width": 64, "guidance_scale": 3.0},
        "dmd": {"generator_every": 5, "batch_size": 16, "real_guidance_scale": 3.0},
    }  # fmt: skip
    summary = run_training(load_config(DMDJob, data), DMDTrainer)
    before = json.loads((tmp_path / "run" / "eval_before.json").read_text())
    after = summary["student"]
    assert after["test/world/partial"] > before["test/world/partial"] + 0.05, (before, after)
    assert after["test/world/overall"] > before["test/world/overall"], (before, after)
