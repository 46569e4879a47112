"""DMD2 few-step distillation of a flow model (Yin et al. 2024, "Improved Distribution Matching Distillation for
Fast Image Synthesis", arXiv 2405.14867; DMD: arXiv 2311.18828), in rectified-flow form, on the shared loop.

Three networks share one transformer:

- the **teacher**: the base model with every adapter off (``flow.adapter(None)``), evaluated with CFG ``w``:
  ``v_real = v_u + w (v_c - v_u)``;
- the **generator** G (the LoRA adapter ``default``, registered as ``policy``): a few-step sampler on the
  fixed time list ``sigmas`` (the checkpoint's scheduler shifts ``dmd.sigmas`` exactly as the stock pipeline
  shifts its ``sigmas`` argument), started from the teacher (its LoRA starts at zero), sampled without CFG;
- the **fake score** F (the LoRA adapter ``fake_score``): tracks the distribution of G's samples, without CFG.
  With ``dmd.fake_per_step`` there is one fake score per student step (adapters ``fake_score_0`` ..
  ``fake_score_{K-1}``), each tracking the clean estimates of its own step: under backward simulation G's
  samples are a mixture over the stop steps, and a single F models that mixture, so the direction it gives a
  step's sample is ``s_mixture - s_real`` rather than ``s_step - s_real``.

Per epoch, on ``batch_size`` prompts per process (``collect``): pick the stop step ``k`` (``dmd.stop``:
``random``, uniform over the ``K`` steps and the same on every process, or the ``last``), run G for ``k`` steps
of its sampler from noise without gradient to the state ``x_k`` at ``s_k`` (backward simulation: G is trained on the
states its own sampler visits), and its clean estimate ``x = x_k - s_k v_G(x_k)``. The update then takes

1. every ``generator_every``-th epoch, one **generator step** on the distribution-matching loss. With
   ``x = x_k - s_k v_G(x_k)`` recomputed with gradient (through the last executed step only), ``t`` uniform
   over ``dm_time_range`` of the checkpoint's 1000-level training schedule and ``x_t = (1-t) x + t eps``::

       x0_real = x_t - t v_real(x_t),   x0_fake = x_t - t v_F(x_t)                   (no gradient)
       g = (x0_fake - x0_real) / mean_CHW |x - x0_real|                              (per sample, NaN -> 0)
       L_DM = 1/2 mean (x - sg[x - g])^2                                             (so dL/dx = g / numel)

   ``x0_fake - x0_real = t (v_real - v_F)`` points along the score difference ``s_fake - s_real``, the
   gradient of the reverse KL between G's distribution and the (guided) teacher's; the per-sample normaliser
   is DMD's in place of an analytic weight. When F equals the teacher (and ``w = 1``) ``g`` is exactly 0.
2. every epoch, one **fake-score step**: flow matching on G's detached samples ``x``, after the generator
   step and on the same samples (DMD2's order), ``t`` drawn as the distribution-matching loss draws it (or
   logit-normal)::

       L_F = mean || v_F((1-t) x + t eps) - (eps - x) ||^2

   F thus takes ``generator_every`` steps per generator step (the two time-scale rule that keeps F close to
   G's current distribution). The first generator step comes after ``generator_every - 1`` of them (at the
   start F is the teacher, and the generator gradient only the CFG difference).

3. optionally (``dmd.regression_weight`` > 0, DMD's regression loss, Yin et al. 2023 Sec. 3.3), in the generator
   step also ``L_reg = w mean || x0_G(z) - ODE_teacher(z) ||^2`` on pairs of noise ``z`` and the teacher's
   reference-sampler output from it (``sampling``, an ODE with CFG; ``dmd.regression_pairs`` pairs made once at
   the start, on training prompts), where ``x0_G(z) = z - s_0 v_G(z)`` is the student's first clean estimate.
   The pairs tie the student's first step to the teacher's actual samples, which the score difference alone
   (the reverse KL to the CFG-guided score) does not; the distance is in latent space (DMD: LPIPS on pixels).

Defaults, with the anchors' values (DMD2 ``main/train_sd.py``, ``experiments/*``; RTDMD ``DMDTrainer``):
4 steps at ``[1, 0.75, 0.5, 0.25]`` (DMD2's timesteps 999/749/499/249, RTDMD's list) before the shift;
``generator_every`` 5 (DMD2 SDXL; 10 for SD1.5 and RTDMD); real CFG: the family's (SD3 4.5, RTDMD's SD3.5);
DM times over indices [20, 980] of 1000 (both); F's times uniform over the same levels (DMD2; RTDMD
logit-normal(0, 1)); one learning rate for both networks (both); LoRA on both (RTDMD r32/alpha64). DMD2's
GAN term is not implemented; the regression loss is off by default, as in DMD2.

**The student's sampler** (``dmd.eta``). Each step predicts the clean estimate ``x0_hat = x_i - s_i v_G(x_i)``
and moves to the next time with the CPS step ``x_{i+1} = (1 - s_{i+1}) x0_hat + s_{i+1} (cos(eta pi/2) eps_hat
+ sin(eta pi/2) z)``, ``z`` fresh noise. ``eta = 1`` (the default, DMD2's multi-step rule) re-noises ``x0_hat``:
``x_{i+1}`` is then exactly a sample of the flow's marginal at ``s_{i+1}`` *of G's own output distribution*,
which is what the loss trains every step's ``x0_hat`` to match to the teacher's data distribution, so training
and sampling agree. ``eta = 0`` is Euler: the next state reuses the noise ``eps_hat`` implied by ``x0_hat``,
which is consistent only while ``x0_hat`` is the posterior mean (the teacher's blurry early estimates); once
DMD makes the early estimates sharp samples, Euler's implied noise is no longer Gaussian and the next state
leaves the marginal the next step was trained on (on the world base the student then gets worse with
training, ``docs/dmd.md``). The stock ``FlowMatchEulerDiscreteScheduler`` samples both: ``eta = 0`` as it is,
``eta = 1`` with ``stochastic_sampling=True`` (written to the export's ``scheduler_config.json``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.algorithms.flow_matching import PromptCache
from diffalign.config import ConfigError, SamplingConfig, check_sigmas
from diffalign.release import SIGMAS_FILE, STUDENT_FILE
from diffalign.sampling.generate import initial_noise, resolve_guidance_scale
from diffalign.sampling.sampler import guided_velocity, sample
from diffalign.sampling.steps import cps_step
from diffalign.training.evaluation import Evaluator, plot_history
from diffalign.training.finetuning import Finetuning, RunSection
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Trainer, seeded
from diffalign.types import Cond

log = logging.getLogger("diffalign.dmd")

#: The generator's adapter (``Finetuning``'s LoRA) and the fake score's.
GENERATOR, FAKE = "default", "fake_score"
#: Families whose adapters support this trainer.
FAMILIES = ("sd3", "flux")


@dataclass(kw_only=True)
class DMDConfig:
    """DMD2 settings (the anchors' defaults in the module docstring).

    Attributes:
        sigmas: the student's step times before the checkpoint's time shift, strictly decreasing to 0 (the
            stock pipeline's ``sigmas`` argument is this list without its final 0).
        generator_every: a generator step every this many epochs; the fake score steps every epoch.
        batch_size: generator samples per process and epoch.
        stop: the step whose state G is trained at: ``random`` (DMD2's backward simulation, uniform over the
            steps) or ``last`` (always the final step, so that the fake score models the student's outputs).
        real_guidance_scale: the teacher's CFG scale in the real score (null: the family's default, 1 for
            guidance-embedded checkpoints).
        real_guidance: embedded guidance of a guidance-distilled teacher (FLUX.1-dev; null: 3.5).
        dm_time_range: fractions of the checkpoint's 1000-level training schedule that the re-noising time of
            the distribution-matching loss is drawn from, uniformly over the levels.
        fake_lr: the fake score's learning rate (null: ``train.lr``).
        fake_time_sampling: how the fake score's flow-matching times are drawn: ``uniform`` over
            ``dm_time_range`` of the training schedule (where the distribution-matching loss evaluates it; DMD2
            draws both uniformly) or ``logit_normal`` (RTDMD).
        fake_logit_mean, fake_logit_std: that logit-normal's location and scale.
        eta: the student sampler's noise (module docstring): 1 re-noises every clean estimate (DMD2), 0 is Euler.
            Only these two have a stock diffusers scheduler, so the exported student samples as trained.
        fake_per_step: one fake score per student step, trained on and queried for that step's samples only
            (module docstring); false: one fake score for all steps (DMD2).
        regression_weight: the weight of DMD's regression loss on teacher pairs (module docstring); 0: off (DMD2).
        regression_pairs: how many (noise, teacher sample) pairs the regression loss draws its batches from.
    """

    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])
    generator_every: int = 5
    batch_size: int = 8
    stop: Literal["random", "last"] = "random"
    real_guidance_scale: float | None = None
    real_guidance: float | None = None
    dm_time_range: list[float] = field(default_factory=lambda: [0.02, 0.98])
    fake_lr: float | None = None
    fake_time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    fake_logit_mean: float = 0.0
    fake_logit_std: float = 1.0
    eta: float = 1.0
    fake_per_step: bool = False
    regression_weight: float = 0.0
    regression_pairs: int = 1024

    def __post_init__(self) -> None:
        check_sigmas(self.sigmas, "dmd.sigmas", final_zero=True)
        if self.eta not in (0, 1):
            raise ConfigError(f"config key 'dmd.eta': 1 (re-noise every clean estimate, DMD2) or 0 (Euler), the two "
                              f"samplers the stock FlowMatchEulerDiscreteScheduler has; got {self.eta}")  # fmt: skip
        if self.regression_weight < 0:
            raise ConfigError(f"config key 'dmd.regression_weight': must be >= 0, got {self.regression_weight}")
        for key in ("generator_every", "batch_size", "regression_pairs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'dmd.{key}': must be >= 1, got {getattr(self, key)}")
        if self.real_guidance_scale is not None and self.real_guidance_scale < 1:
            raise ConfigError(f"config key 'dmd.real_guidance_scale': must be >= 1, got {self.real_guidance_scale}")
        lo_hi = self.dm_time_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ConfigError(f"config key 'dmd.dm_time_range': need [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
        if self.fake_lr is not None and self.fake_lr <= 0:
            raise ConfigError(f"config key 'dmd.fake_lr': must be > 0, got {self.fake_lr}")
        if self.fake_logit_std <= 0:
            raise ConfigError(f"config key 'dmd.fake_logit_std': must be > 0, got {self.fake_logit_std}")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(kw_only=True)
class DMDJob(RunSection):
    """``diffalign train`` with ``algorithm: dmd``; ``sampling`` is the teacher's reference sampler (e.g. 20 steps
    with CFG), evaluated beside the student."""

    kind: Literal["train"] = "train"
    algorithm: Literal["dmd"] = "dmd"
    dmd: DMDConfig = field(default_factory=DMDConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.family not in FAMILIES:
            raise ConfigError(f"config key 'model.family': DMD distils {' and '.join(FAMILIES)} models, got "
                              f"{self.model.family!r}")  # fmt: skip
        if self.lora.rank < 1:
            raise ConfigError("config key 'lora.rank': DMD trains the student as a LoRA on the teacher (the teacher "
                              "is the base with adapters off); set lora.rank >= 1")  # fmt: skip
        steps = self.dmd.num_steps
        if steps >= self.sampling.num_steps:
            raise ConfigError(f"config key 'dmd.sigmas': a {steps}-step student of a teacher sampled with "
                              f"sampling.num_steps={self.sampling.num_steps} steps is no distillation; give fewer "
                              f"student steps than the teacher's")  # fmt: skip
        levels = {round(1000 * s) for s in self.dmd.sigmas}
        if len(levels) != len(self.dmd.sigmas):
            raise ConfigError(f"config key 'dmd.sigmas': {self.dmd.sigmas} put two steps on one level of the "
                              f"teacher's 1000-level training schedule")  # fmt: skip
        if self.model.lora:
            check_student_family(self.model.lora, self.model.family, "model.lora")
        if self.dmd.regression_weight > 0 and self.sampling.sde != "ode":
            raise ConfigError(f"config key 'sampling.sde': the regression loss pairs noise with the teacher's "
                              f"reference sample from it, which needs a deterministic sampler (ode); got "
                              f"{self.sampling.sde!r}")  # fmt: skip


def student_sampling(sampling: SamplingConfig, sigmas: list[float], eta: float) -> SamplingConfig:
    """The student's sampler on ``sigmas`` (ending in 0), no CFG, at ``sampling``'s size: CPS steps with noise
    ``eta`` (1: DMD2's re-noising of each clean estimate; 0: Euler)."""
    sde = {"sde": "cps", "noise_level": float(eta)} if eta > 0 else {"sde": "ode"}
    return replace(sampling, num_steps=len(sigmas) - 1, sigmas=list(sigmas[:-1]), shift=None, guidance_scale=1.0,
                   **sde)  # fmt: skip


def read_student(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The sampling record of an exported student (``student.json``), or None for a plain LoRA folder."""
    path = os.path.join(os.fspath(folder), STUDENT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_student_family(folder: str | os.PathLike, family: str, key: str) -> None:
    """``ConfigError`` naming ``key`` when ``folder`` holds a student distilled from another family's teacher."""
    record = read_student(folder) if os.path.isdir(os.fspath(folder)) else None
    if record is not None and record["family"] != family:
        raise ConfigError(f"config key '{key}': {os.fspath(folder)!r} is a student of a {record['family']!r} teacher, "
                          f"but model.family is {family!r}")  # fmt: skip


def normalised_dm_direction(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """DMD's normalised distribution-matching direction at clean samples ``x`` ``(B, ...)``, from the teacher's and
    the fake score's clean estimates at the same re-noised state: ``g = (x0_fake - x0_real) / mean |x - x0_real|``
    (per sample, over every non-batch dim; NaN -> 0) in float64, and that normaliser ``(B,)``. The loss
    ``1/2 mean (x - sg[x - g])^2`` then has gradient ``g / numel`` with respect to ``x``."""
    x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    dims = tuple(range(1, x.ndim))
    scale = (x - x0_real).abs().mean(dim=dims)
    g = torch.nan_to_num((x0_fake - x0_real) / scale.view(-1, *([1] * len(dims))))
    return g, scale


@dataclass(kw_only=True)
class DMDBatch(Batch):
    """One epoch's generator samples on this process.

    Attributes:
        cond: ``B`` prompts' conditioning; ``stop``: the step ``k`` whose state is trained (same on every process).
        x_k: ``(B, C, H, W)`` G's state at ``times[k]`` (no gradient); ``x0``: its clean estimate (detached).
        dm_t, dm_noise: ``(B,)`` times and ``(B, C, H, W)`` noise of the distribution-matching loss.
        fake_t, fake_noise: the same for the fake score's flow matching.
        reg_cond, reg_noise, reg_target: with the regression loss on, at a generator step: ``B`` pairs'
            conditioning, noise ``(B, C, H, W)`` and the teacher's sample from it ``(B, C, H, W)``; else None.
    """

    cond: Cond
    stop: int
    x_k: Tensor
    x0: Tensor
    dm_t: Tensor
    dm_noise: Tensor
    fake_t: Tensor
    fake_noise: Tensor
    reg_cond: Cond | None = None
    reg_noise: Tensor | None = None
    reg_target: Tensor | None = None


class DMDTrainer(Trainer):
    """DMD2 over the shared loop (see the module docstring)."""

    name = "dmd"

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        job: DMDJob = ctx.cfg
        self.cfg: DMDConfig = job.dmd
        self.ft = Finetuning(ctx, 1)
        flow = self.flow = self.ft.flow
        t = job.train
        transformer = flow.transformer
        names = [f"{FAKE}_{k}" for k in range(self.cfg.num_steps)] if self.cfg.fake_per_step else [FAKE]
        fakes = []
        for name in names:
            flow.add_lora(rank=job.lora.rank, alpha=job.lora.alpha, target_modules=job.lora.target_modules,
                          adapter_name=name)  # fmt: skip
            params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
            optimizer = torch.optim.AdamW(params, lr=self.cfg.fake_lr or t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                          weight_decay=t.weight_decay, eps=t.adam_eps)  # fmt: skip
            scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_epochs,
                                      num_training_steps=t.epochs)  # fmt: skip
            fakes.append(ctx.register(name, transformer, optimizer, scheduler, grad_clip=t.grad_clip))
        self.fake = fakes[0]
        self.fake_names = names
        self.ft.policy.export = self._export
        transformer.set_adapter(GENERATOR)  # outside an adapter block the flow is the student
        for p in self.ft.policy.trainable() + [p for m in fakes for p in m.trainable()]:
            p.requires_grad_(True)
        ctx.prepare()
        flow.use_network(self.ft.policy.network, adapter=GENERATOR)
        for m in fakes:
            flow.use_network(m.network, adapter=m.name)

        s = job.sampling
        self.shape = flow.latent_shape(s.height, s.width)
        self.student = student_sampling(s, self.cfg.sigmas, self.cfg.eta)
        self.times = flow.time_grid(self.student.num_steps, s.height, s.width, sigmas=self.student.sigmas)
        scale = self.cfg.real_guidance_scale
        self.real_scale = scale if scale is not None else (1.0 if flow.has_guidance_embedding
                                                           else flow.default_guidance_scale)  # fmt: skip
        table = flow.time_grid(1000, s.height, s.width).flip(0)[1:]  # (1000,) ascending training levels
        lo, hi = (round(1000 * f) for f in self.cfg.dm_time_range)
        self.dm_levels = table[lo : min(hi, 999) + 1]
        self.encode = PromptCache(flow, self.ft.prompts)
        self.cadence = t.cadence(progress=("loss_dm", "loss_fake"))
        self.pairs = self._regression_pairs() if self.cfg.regression_weight > 0 else None

    @torch.no_grad()
    def _regression_pairs(self) -> tuple[np.ndarray, Tensor, Tensor]:
        """``regression_pairs`` training-prompt indices ``(N,)``, noises ``(N, C, H, W)`` and the teacher's
        reference-sampler latents from them ``(N, C, H, W)`` (on the CPU), a function of the seed only: every
        process (and a resumed run) makes the same pairs."""
        ctx, s, n = self.ctx, self.ctx.cfg.sampling, self.cfg.regression_pairs
        flow = self.flow
        which = np.random.default_rng([ctx.seed, 4]).integers(len(self.ft.prompts), size=n)
        noise = initial_noise(flow, self.shape, ctx.seed + 1, range(n)).cpu()
        times = flow.time_grid(s.num_steps, s.height, s.width, shift=s.shift, sigmas=s.sigmas)
        scale = resolve_guidance_scale(flow, s)
        out = []
        chunks = range(0, n, 64)
        bar = tqdm(chunks, desc="dmd: teacher pairs", disable=not ctx.accelerator.is_main_process)
        with ctx.accelerator.autocast(), flow.adapter(None):
            for i in bar:
                cond = self.encode([self.ft.prompts[j] for j in which[i : i + 64]]).to(ctx.device)
                traj = sample(flow, cond, times, x_init=noise[i : i + 64].to(ctx.device), guidance_scale=scale,
                              guidance=s.guidance, keep_states=False)  # fmt: skip
                out.append(traj.final.float().cpu())
        return which, noise, torch.cat(out)

    # ------------------------------------------------------------------------------------------------- collect
    @torch.no_grad()
    def collect(self, epoch: int) -> DMDBatch:
        ctx, cfg, flow = self.ctx, self.cfg, self.flow
        rank, device, n = ctx.accelerator.process_index, ctx.device, cfg.batch_size
        rng = np.random.default_rng([ctx.seed, rank, epoch, 1])
        prompts = [self.ft.prompts[i] for i in rng.integers(len(self.ft.prompts), size=n)]
        cond = self.encode(prompts).to(device)
        if cfg.stop == "random":  # the same on every process
            stop = int(np.random.default_rng([ctx.seed, epoch, 2]).integers(cfg.num_steps))
        else:
            stop = cfg.num_steps - 1
        gen = seeded(ctx.seed, rank, epoch, 3)
        x = torch.randn((n, *self.shape), generator=gen).to(device)
        with ctx.accelerator.autocast(), flow.adapter(GENERATOR):
            for i in range(stop):
                t, t_next = float(self.times[i]), float(self.times[i + 1])
                z = torch.randn(x.shape, generator=gen).to(device)
                x = cps_step(x, flow.velocity(x, t, cond), t, t_next, noise_level=cfg.eta, noise=z).x_next
            x0 = x - float(self.times[stop]) * flow.velocity(x, float(self.times[stop]), cond)
        dm_t = self.dm_levels[torch.randint(len(self.dm_levels), (n,), generator=gen)]
        dm_noise = torch.randn((n, *self.shape), generator=gen)
        if cfg.fake_time_sampling == "uniform":
            fake_t = self.dm_levels[torch.randint(len(self.dm_levels), (n,), generator=gen)]
        else:
            fake_t = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=cfg.fake_logit_mean,
                                                           logit_std=cfg.fake_logit_std, generator=gen)  # fmt: skip
        fake_noise = torch.randn((n, *self.shape), generator=gen)
        batch = DMDBatch(cond=cond, stop=stop, x_k=x.float(), x0=x0.float(), dm_t=dm_t.to(device),
                         dm_noise=dm_noise.to(device), fake_t=fake_t.to(device), fake_noise=fake_noise.to(device),
                         metrics={"stop_step": float(stop)})  # fmt: skip
        if self.pairs is not None and self.generator_due(epoch):
            which, noise, target = self.pairs
            pick = np.random.default_rng([ctx.seed, rank, epoch, 5]).integers(len(which), size=n)
            batch.reg_cond = self.encode([self.ft.prompts[j] for j in which[pick]]).to(device)
            batch.reg_noise, batch.reg_target = noise[pick].to(device), target[pick].to(device)
        return batch

    # ------------------------------------------------------------------------------------------------- update
    def generator_due(self, epoch: int) -> bool:
        """Whether ``epoch`` takes a generator step (after every ``generator_every - 1`` fake-score steps)."""
        return (epoch + 1) % self.cfg.generator_every == 0

    def update(self, batch: DMDBatch, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.generator_due(epoch):
            out.update(self.optimize(batch, epoch, [["generator"]], self.loss, [self.ft.policy.name]))
        out.update(self.optimize(batch, epoch, [["fake"]], self.loss, [self.fake_name(batch.stop)]))
        return out

    def fake_name(self, stop: int) -> str:
        """The adapter (and registered module) of the fake score that models step ``stop``'s samples."""
        return self.fake_names[stop if self.cfg.fake_per_step else 0]

    def loss(self, batch: DMDBatch, micro: str) -> dict[str, Tensor]:
        """``micro``: ``generator`` (the distribution-matching loss) or ``fake`` (the fake score's)."""
        if micro == "generator":
            return self.generator_loss(batch)
        return self.fake_loss(batch)

    def generator_loss(self, batch: DMDBatch) -> dict[str, Tensor]:
        """``loss_dm`` of G's clean estimate at the batch's state (gradient through that one step), and with the
        regression loss on ``loss_reg`` of its first clean estimate from the batch's pair noise."""
        flow, s = self.flow, float(self.times[batch.stop])
        with flow.adapter(GENERATOR):
            x = batch.x_k - s * flow.velocity(batch.x_k, s, batch.cond)
        g, scale = self.dm_direction(x.detach(), batch.dm_t, batch.dm_noise, batch.cond, self.fake_name(batch.stop))
        x = x.double()
        out = {"loss_dm": 0.5 * F.mse_loss(x, (x - g).detach()), "dm_scale": scale,
               "dm_direction": g.flatten(1).norm(dim=1)}  # fmt: skip
        if batch.reg_noise is not None:
            s0 = float(self.times[0])
            with flow.adapter(GENERATOR):
                first = batch.reg_noise - s0 * flow.velocity(batch.reg_noise, s0, batch.reg_cond)
            out["loss_reg"] = self.cfg.regression_weight * F.mse_loss(first.float(), batch.reg_target)
        return out

    @torch.no_grad()
    def dm_direction(self, x: Tensor, t: Tensor, noise: Tensor, cond: Cond, fake: str = FAKE) -> tuple[Tensor, Tensor]:
        """The normalised DMD direction ``g`` ``(B, C, H, W)`` float64 at the clean samples ``x`` re-noised to
        ``t`` ``(B,)`` with ``noise``, and the per-sample normaliser ``mean_CHW |x - x0_real|`` ``(B,)``; ``fake``:
        the fake score's adapter."""
        flow = self.flow
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        with flow.adapter(None):
            v_real = guided_velocity(flow, x_t, t, cond, guidance_scale=self.real_scale,
                                     guidance=self.cfg.real_guidance)  # fmt: skip
        with flow.adapter(fake):
            v_fake = flow.velocity(x_t, t, cond)
        tt = tt.double()
        return normalised_dm_direction(x, x_t.double() - tt * v_real.double(), x_t.double() - tt * v_fake.double())

    def fake_loss(self, batch: DMDBatch) -> dict[str, Tensor]:
        """``loss_fake``: flow matching of F on G's detached clean samples."""
        flow = self.flow
        t = batch.fake_t.view(-1, 1, 1, 1)
        x_t = (1 - t) * batch.x0 + t * batch.fake_noise
        with flow.adapter(self.fake_name(batch.stop)):
            v = flow.velocity(x_t, batch.fake_t, batch.cond)
        return {"loss_fake": F.mse_loss(v.float(), batch.fake_noise - batch.x0)}

    # ------------------------------------------------------------------------------------------------- export
    def _export(self, directory: str, state: dict[str, Tensor]) -> None:
        """The student as a diffusers LoRA, with ``student.json`` (how to call the stock pipeline of the base on
        it: ``num_inference_steps``, ``sigmas``, ``guidance_scale``, ``stochastic_sampling``; diffalign's
        ``sampling.sde`` / ``noise_level``; its family and shifted ``times``), ``sigmas.json`` (the shifted times
        without the final 0, what ``diffalign release`` builds the student's scheduler from) and, for a
        re-noising student (``eta = 1``), ``scheduler_config.json``: the base's scheduler with
        ``stochastic_sampling=True``, to load with ``from_pretrained(final)`` in place of the pipeline's."""
        self.flow.save_lora(directory, adapter_name=GENERATOR, state_dict=state)
        renoise = self.student.sde == "cps" and self.student.noise_level == 1
        record = {"family": self.flow.family, "num_inference_steps": self.student.num_steps,
                  "sigmas": self.student.sigmas, "guidance_scale": 1.0, "stochastic_sampling": renoise,
                  "sde": self.student.sde, "noise_level": self.student.noise_level,
                  "times": self.times.tolist()}  # fmt: skip
        if renoise:
            scheduler = self.flow.pipe.scheduler
            type(scheduler).from_config(scheduler.config, stochastic_sampling=True).save_config(directory)
        with open(os.path.join(directory, STUDENT_FILE), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(directory, SIGMAS_FILE), "w") as f:
            json.dump(self.times[:-1].tolist(), f)

    # ------------------------------------------------------------------------------------------------- loop hooks
    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        """The student (its sampler, the generator's EMA) on every evaluation set; before training also the
        teacher with the reference sampler (``sampling``) and with the student's steps (naive, with CFG), each
        into its own folder (``teacher/``, ``teacher_naive/``)."""
        out = self._evaluate(GENERATOR, self.student, self.ctx.output_dir, epoch, tag)
        if tag == "before":
            job = self.ctx.cfg
            naive = replace(self.student, guidance_scale=job.sampling.guidance_scale)
            for name, sampling in (("teacher", job.sampling), ("teacher_naive", naive)):
                found = self._evaluate(None, sampling, os.path.join(job.output_dir, name), epoch, tag)
                out.update({f"{name}/{k}": v for k, v in found.items()})
        return out

    def _evaluate(self, adapter: str | None, sampling: SamplingConfig, folder: str, epoch: int,
                  tag: str) -> dict[str, Any]:  # fmt: skip
        os.makedirs(folder, exist_ok=True)
        view = _EvalView(self.ft, _EvalConfig(output_dir=folder, sampling=sampling))
        with self.flow.adapter(adapter):
            return Evaluator(view).run(epoch, tag)

    def finish(self) -> dict[str, Any]:
        """Plot the curves and write ``comparison.json``: the final student beside the teacher's two samplers."""
        out = self.ctx.output_dir
        if not self.ctx.accelerator.is_main_process:
            return {}
        plot_history(os.path.join(out, "history.jsonl"), os.path.join(out, "curves.png"))
        summary = {}
        for name, path in (("student", "eval_after.json"), ("teacher", "teacher/eval_before.json"),
                           ("teacher_naive", "teacher_naive/eval_before.json")):  # fmt: skip
            if os.path.isfile(os.path.join(out, path)):
                with open(os.path.join(out, path)) as f:
                    summary[name] = json.load(f)
        with open(os.path.join(out, "comparison.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary


@dataclass
class _EvalConfig:
    """The config keys ``Evaluator`` reads."""

    output_dir: str
    sampling: SamplingConfig


class _EvalView:
    """What ``Evaluator`` reads from a fine-tuning setup, with another sampler and output folder."""

    def __init__(self, ft: Finetuning, cfg: _EvalConfig) -> None:
        self.cfg, self.accelerator, self.flow, self.ema = cfg, ft.accelerator, ft.flow, ft.ema
        self.rewards, self.monitors, self.seed, self.eval_sets = ft.rewards, ft.monitors, ft.seed, ft.eval_sets
