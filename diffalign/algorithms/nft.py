"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117), on the shared loop.

Per epoch (``collect``):

1. Draw ``prompts_per_epoch`` prompts (the same draw on every process) and repeat each ``group_size`` times; the
   samples are permuted and split over processes.
2. Roll out with the **old policy** (a second LoRA adapter, ``old``) and a deterministic Euler ODE of ``num_steps``
   steps, CFG-free by default (``guidance_scale`` 1). Only the clean latents ``x0`` are kept.
3. Score them with the ``RewardSet``; advantages per prompt with a global std (``balance``, see
   ``diffalign.balance.wiring``). Each sample trains at a random ``int(num_steps * timestep_fraction)`` of the
   sampler's own times (9 of 10).

Loss at a stored ``x0`` and a training time ``t`` (fresh noise ``eps``, ``x_t = (1 - t) x0 + t eps``)::

    v_old = v_old(x_t, t)   (no grad),   v = v_theta(x_t, t),   D = v - v_old
    v+ = v_old + beta D = (1 - beta) v_old + beta v,      v- = v_old - beta D = (1 + beta) v_old - beta v
    x0+- = x_t - t v+-,     w+- = max(mean_CHW |x0+- - x0|, 1e-5)             (detached, float64)
    r = clip(clip(A, +-c) / (2c) + 1/2, 0, 1)                                  c = adv_clip_max
    L = c mean_batch[(r mean_CHW(x0+ - x0)^2 / w+ + (1 - r) mean_CHW(x0- - x0)^2 / w-) / beta]
        + kl_beta mean((v - v_ref)^2)

where ``v_ref`` is the base model (the adapters off). ``r`` is the optimality probability of the sample: it pulls
the implicit positive policy ``v+`` toward the sample's ``x0`` when the sample is better than its prompt's average
and the negative one ``v-`` when it is worse.

**On-policy identity** (``v = v_old``, so ``x0+ = x0- = x0_hat`` and ``x0_hat - x0 = t (v_old - u)`` with the flow
target ``u = eps - x0``): with no advantage clipped, ``2r - 1 = A / c`` and

    dL_i / dv = -(2 t^2 A_i / (D_el w_i)) (u - v_old),      w_i = t mean_CHW |u - v_old|

(``D_el`` elements per sample): exactly the gradient of the advantage-weighted flow-matching loss
``mean_batch[A_i t^2 / w_i mean_CHW (v - u)^2]`` (weights detached), independent of ``beta`` and zero when
``A = 0``. Away from on-policy the ``r = 1/2`` part is a trust region pulling ``v`` toward ``v_old``.

**Old policy.** After each epoch's optimizer steps, ``theta_old <- d theta_old + (1 - d) theta`` with
``d = min(decay_uprate (n - decay_flat), decay_cap)`` (0 while ``n < decay_flat``), ``n`` the optimizer steps
taken; at the start ``theta_old = theta``. Evaluation and export use the trainer's EMA (``train.ema_decay``), a
separate average.

Defaults, with the anchors' values (``NVlabs/DiffusionNFT`` ``config/nft.py``, ``scripts/train_nft_sd3.py``) in
brackets; where this toolkit's small world differs it says so:

- ``num_steps`` 10 rollout steps [10; 25 for multi-reward], the toolkit's deterministic Euler ODE [DPM-Solver-2,
  deterministic; the loss is solver-agnostic], ``guidance_scale`` 1 [1, CFG-free];
- ``timestep_fraction`` 0.99 [0.99: 9 of 10 of the sampler's shifted times per sample];
- ``beta`` 1.0 [1.0; 0.1 for OCR and multi-reward], ``kl_beta`` 1e-4 [1e-4], ``adv_clip_max`` 5 [5];
- ``decay_uprate`` 0.001, ``decay_cap`` 0.5, ``decay_flat`` 0 [decay_type 1; MARBLE raises the cap to 0.95; OCR
  uses 0.0075 / 0.999 / 75];
- ``updates_per_epoch`` 1 [1: gradient accumulation over the whole epoch], ``global_std`` true [true];
- ``prompts_per_epoch`` 16 x ``group_size`` 8 [48 x 24 on 8 GPUs]; LoRA r32/alpha64, AdamW lr 3e-4, wd 1e-4,
  clip 1 (``RunSection``) [the same]; evaluation EMA 0.9 [0.9, every step with warm-up].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffalign.balance.balancer import BalanceConfig
from diffalign.balance.wiring import RewardBalance
from diffalign.config import ConfigError
from diffalign.sampling.sampler import guided_velocity, sample
from diffalign.training.finetuning import Finetuning, RunSection
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Trainer, derive_layout, seeded
from diffalign.types import Cond

log = logging.getLogger("diffalign.nft")

#: floor of the adaptive weights ``w+-`` [1e-5], so that the loss stays finite when ``x0+- == x0``.
WEIGHT_FLOOR = 1e-5
#: the name of the rollout policy's LoRA adapter.
OLD_ADAPTER = "old"


@dataclass(kw_only=True)
class NFTConfig:
    """DiffusionNFT settings (the anchors' values in the module docstring).

    Attributes:
        prompts_per_epoch: distinct prompts per epoch, over all processes.
        group_size: samples per prompt (advantages are relative to the prompt's mean).
        batch_size: samples per forward pass on one process, in rollouts and training.
        num_steps: rollout ODE steps; their times (without the final 0) are the training times.
        shift: static time shift of the rollout grid (null: the checkpoint's schedule).
        guidance_scale: CFG scale of rollouts and of the training forward passes (1: CFG-free).
        timestep_fraction: fraction of the rollout times each sample trains at (a random subset per sample).
        beta: strength of the implicit policies ``v+- = v_old +- beta (v - v_old)``.
        kl_beta: weight of ``mean (v - v_ref)^2`` to the base model (0: none).
        adv_clip_max: advantages are clipped to +-this before the map to ``r`` in [0, 1].
        global_std: normalise advantages by the std over the whole epoch instead of per prompt.
        updates_per_epoch: optimizer steps per epoch.
        decay_uprate, decay_cap, decay_flat: the old policy's decay schedule (module docstring).
    """

    prompts_per_epoch: int = 16
    group_size: int = 8
    batch_size: int = 8
    num_steps: int = 10
    shift: float | None = None
    guidance_scale: float = 1.0
    timestep_fraction: float = 0.99
    beta: float = 1.0
    kl_beta: float = 1e-4
    adv_clip_max: float = 5.0
    global_std: bool = True
    updates_per_epoch: int = 1
    decay_uprate: float = 0.001
    decay_cap: float = 0.5
    decay_flat: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key 'nft.{key}': {why}")

        if self.group_size < 2:
            raise bad("group_size", f"advantages need at least 2 samples per prompt, got {self.group_size}")
        for key in ("prompts_per_epoch", "batch_size", "num_steps", "updates_per_epoch"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if (self.prompts_per_epoch * self.group_size) % self.batch_size:
            raise bad("batch_size", f"prompts_per_epoch x group_size = {self.prompts_per_epoch * self.group_size} "
                                    f"samples are not a multiple of it ({self.batch_size})")  # fmt: skip
        if self.guidance_scale < 1:
            raise bad("guidance_scale", f"must be >= 1, got {self.guidance_scale}")
        if not 0 < self.timestep_fraction <= 1:
            raise bad("timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        if self.beta <= 0:
            raise bad("beta", f"must be > 0 (the implicit policies are v_old +- beta (v - v_old)), got {self.beta}")
        if self.kl_beta < 0 or self.adv_clip_max <= 0:
            raise bad("kl_beta/adv_clip_max", "need kl_beta >= 0 and adv_clip_max > 0")
        if self.decay_uprate < 0 or not 0 <= self.decay_cap < 1 or self.decay_flat < 0:
            raise bad("decay_uprate/decay_cap/decay_flat", "need uprate >= 0, 0 <= cap < 1, flat >= 0")

    def decay(self, steps: int) -> float:
        """The old policy's decay ``d`` after ``steps`` optimizer steps."""
        if steps < self.decay_flat:
            return 0.0
        return min(self.decay_uprate * (steps - self.decay_flat), self.decay_cap)

    @property
    def train_times(self) -> int:
        """Training times per sample."""
        return max(1, int(self.num_steps * self.timestep_fraction))


@dataclass(kw_only=True)
class NFTJob(RunSection):
    """``diffalign train`` with ``algorithm: nft``."""

    kind: Literal["train"] = "train"
    algorithm: Literal["nft"] = "nft"
    nft: NFTConfig = field(default_factory=NFTConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


# ----------------------------------------------------------------------------------------------------- the loss
def optimality_weight(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """``r = clip(clip(A, +-c) / (2c) + 1/2, 0, 1)``: -c -> 0, 0 -> 1/2, +c -> 1 (``(B,)`` in, ``(B,)`` out)."""
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (a / (2 * adv_clip_max) + 0.5).clamp(0.0, 1.0)


def implicit_errors(
    v: Tensor, v_old: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """The adaptively weighted x0-errors of the implicit positive and negative policies.

    Args:
        v: ``(B, C, H, W)`` the trained velocity (with grad); ``v_old``: the old policy's (no grad).
        x0: ``(B, C, H, W)`` the stored clean latents; ``x_t``: their noised versions at ``t`` ``(B,)``.
        beta: the implicit policies' strength.

    Returns:
        ``(B,)`` each: ``mean_CHW (x0+ - x0)^2 / w+`` and ``mean_CHW (x0- - x0)^2 / w-`` (module docstring).
    """
    v, v_old, x0, x_t = v.float(), v_old.float().detach(), x0.float(), x_t.float()
    t = t.float().view(-1, *([1] * (x0.ndim - 1)))
    dims = tuple(range(1, x0.ndim))
    delta = v - v_old
    errors = []
    for sign in (1.0, -1.0):
        x0_hat = x_t - t * (v_old + sign * beta * delta)
        diff = x0_hat - x0
        with torch.no_grad():
            w = diff.detach().double().abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR)
        errors.append((diff**2).mean(dim=dims) / w.to(diff.dtype))
    return errors[0], errors[1]


def nft_policy_loss(
    positive: Tensor, negative: Tensor, advantages: Tensor, beta: float, adv_clip_max: float
) -> Tensor:
    """``(B,)`` per-sample policy loss ``c (r e+ + (1 - r) e-) / beta`` of the ``implicit_errors`` ``e+-``."""
    r = optimality_weight(advantages, adv_clip_max)
    return adv_clip_max * (r * positive + (1 - r) * negative) / beta


# ----------------------------------------------------------------------------------------------------- trainer
@dataclass(kw_only=True)
class NFTBatch(Batch):
    """One epoch's rollouts on this process (local batch ``N`` first).

    Attributes:
        x0: ``(N, C, H, W)`` clean latents of the old policy's ODE rollouts.
        times: ``(T + 1,)`` the rollout grid; ``train_steps``: ``(N, S)`` long, the grid indices each sample trains at.
        prompts: N prompts; ``cond``, ``uncond``: their conditioning and the empty prompt's (None without CFG).
        advantages: ``(N,)`` combined advantages (None for ``balance.method=marble``).
        reward_advantages: ``(N, K)`` per-reward advantages, NaN where a reward abstains (None when unused).
        rewards: ``(N, K)`` the reward table.
    """

    x0: Tensor
    times: Tensor
    train_steps: Tensor
    prompts: list[str]
    cond: Cond
    uncond: Cond | None
    advantages: Tensor | None
    reward_advantages: Tensor | None
    rewards: Tensor


@dataclass(frozen=True)
class NFTMicro:
    """One micro-batch: samples ``rows`` at column ``column`` of ``train_steps``, within an optimizer step over
    ``step_rows`` samples; ``epoch`` and ``step`` seed its noise."""

    rows: Tensor
    column: int
    step_rows: int
    epoch: int
    step: int


class NFTTrainer(Trainer):
    """DiffusionNFT over the shared loop (see the module docstring)."""

    name = "nft"

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        self.cfg: NFTConfig = ctx.cfg.nft
        if ctx.cfg.lora.rank == 0:
            raise ConfigError("config key 'lora.rank': nft keeps its rollout (old) policy as a second LoRA adapter; "
                              "full fine-tuning (rank 0) is not supported")  # fmt: skip
        acc = ctx.accelerator
        if acc.is_fsdp2:
            raise ConfigError("nft: the old policy is a second LoRA adapter updated in place, not supported under "
                              "FSDP2 sharding; run it with one process or DDP")  # fmt: skip
        self.ft = Finetuning(ctx, self.cfg.updates_per_epoch)
        self.flow = self.ft.flow
        total = self.cfg.prompts_per_epoch * self.cfg.group_size
        self.local = derive_layout(total, acc.num_processes, self.cfg.batch_size, "nft.prompts_per_epoch")
        s = ctx.cfg.sampling
        self.times = self.flow.time_grid(self.cfg.num_steps, s.height, s.width, shift=self.cfg.shift)
        self.shape = self.flow.latent_shape(s.height, s.width)
        self.pairs = self._add_old_adapter()
        ctx.states.update({f"old_policy/{name}": old for name, (old, _) in self.pairs.items()})
        ctx.prepare()
        self.flow.use_network(self.ft.policy.network)
        self.balance = RewardBalance(ctx.cfg.balance, self.ft.rewards, self.ft.policy, acc, ctx.states,
                                     global_std=self.cfg.global_std)  # fmt: skip
        self.cadence = ctx.cfg.train.cadence(progress=("reward_mean",))
        log.info("nft layout: %d prompts x %d samples = %d per epoch over %d processes -> %d per process, %d train "
                 "times per sample, %d optimizer steps per epoch, balance %s", self.cfg.prompts_per_epoch,
                 self.cfg.group_size, total, acc.num_processes, self.local, self.cfg.train_times,
                 self.cfg.updates_per_epoch, ctx.cfg.balance.method)  # fmt: skip

    def _add_old_adapter(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Add the ``old`` LoRA adapter, a frozen copy of the trained ``default`` one; returns, by the trained
        parameter's name, ``(old parameter, trained parameter)``."""
        lora = self.ctx.cfg.lora
        transformer = self.flow.transformer
        self.flow.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                           adapter_name=OLD_ADAPTER)  # fmt: skip
        transformer.set_adapter("default")
        params = dict(transformer.named_parameters())
        pairs = {}
        for name in self.ft.policy.parameters:
            old_name = name.replace(".default.", f".{OLD_ADAPTER}.")
            if old_name == name or old_name not in params:
                raise RuntimeError(f"no old-adapter parameter for the trained LoRA parameter {name!r}")
            old, current = params[old_name], params[name]
            old.requires_grad_(False)
            current.requires_grad_(True)
            with torch.no_grad():
                old.copy_(current)
            pairs[name] = (old, current)
        return pairs

    @torch.no_grad()
    def update_old_policy(self) -> float:
        """``theta_old <- d theta_old + (1 - d) theta`` at the current optimizer step count; returns ``d``."""
        d = self.cfg.decay(self.ft.policy.steps)
        for old, current in self.pairs.values():
            old.mul_(d).add_(current.detach(), alpha=1 - d)
        return d

    # ------------------------------------------------------------------------------------------------- collect
    def epoch_prompts(self, epoch: int) -> tuple[list[str], Tensor]:
        """All ``P x K`` prompts of the epoch in their shuffled global order and their group ids."""
        prompts = self.ft.prompts
        rng = np.random.default_rng([self.ctx.seed, epoch, 7])
        chosen = rng.choice(len(prompts), size=self.cfg.prompts_per_epoch,
                            replace=self.cfg.prompts_per_epoch > len(prompts))  # fmt: skip
        groups = np.repeat(np.arange(self.cfg.prompts_per_epoch), self.cfg.group_size)
        groups = groups[rng.permutation(len(groups))]
        return [prompts[chosen[g]] for g in groups], torch.from_numpy(groups)

    @torch.no_grad()
    def collect(self, epoch: int) -> NFTBatch:
        ctx, acc, cfg, flow = self.ctx, self.ctx.accelerator, self.cfg, self.flow
        all_prompts, all_groups = self.epoch_prompts(epoch)
        start = acc.process_index * self.local
        prompts = all_prompts[start : start + self.local]
        cond = flow.encode_prompt(prompts)
        uncond = flow.empty_cond(len(prompts)) if cfg.guidance_scale != 1 else None
        latents, tables = [], []
        for b in range(0, self.local, cfg.batch_size):
            rows = list(range(b, b + cfg.batch_size))
            gen = seeded(ctx.seed, epoch, acc.process_index, b, 1)
            x_init = torch.randn((len(rows), *self.shape), generator=gen).to(flow.device)
            with acc.autocast(), flow.adapter(OLD_ADAPTER):
                traj = sample(flow, cond.index(rows), self.times, x_init=x_init, guidance_scale=cfg.guidance_scale,
                              uncond=None if uncond is None else uncond.index(rows), keep_states=False)  # fmt: skip
            x0 = traj.final.float()
            out = self.ft.rewards(flow.decode_latents(x0), [prompts[r] for r in rows])
            latents.append(x0)
            tables.append(torch.stack([out.components[n] for n in self.balance.names], dim=1))
        x0, table = torch.cat(latents), torch.cat(tables)
        gathered = acc.gather(table).cpu()  # process-major = the global order of epoch_prompts
        combined, columns = self.balance.advantages(gathered, all_groups)
        mine = slice(start, start + self.local)
        g = seeded(ctx.seed, epoch, acc.process_index, 3)
        pick = torch.stack([torch.randperm(cfg.num_steps, generator=g)[: cfg.train_times] for _ in range(self.local)])
        total = torch.nansum(gathered * torch.tensor(self.balance.weights), dim=1)
        metrics = {"reward_mean": float(total.mean()), **self.balance.reward_metrics(gathered)}
        return NFTBatch(x0=x0, times=self.times, train_steps=pick, prompts=prompts, cond=cond, uncond=uncond,
                        advantages=None if combined is None else combined[mine].to(flow.device),
                        reward_advantages=None if columns is None else columns[mine].to(flow.device),
                        rewards=table, metrics=metrics)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- update
    def split(self, batch: NFTBatch, epoch: int) -> list[list[NFTMicro]]:
        """Shuffle this process's samples into ``updates_per_epoch`` optimizer steps; each step's micro-batches
        are its ``batch_size`` chunks at every training-time column."""
        n = batch.x0.shape[0]
        order = torch.randperm(n, generator=seeded(self.ctx.seed, epoch, self.ctx.accelerator.process_index, 11))
        return [
            [NFTMicro(rows, j, chunk.numel(), epoch, i) for rows in chunk.split(self.cfg.batch_size)
             for j in range(batch.train_steps.shape[1])]
            for i, chunk in enumerate(order.chunk(self.cfg.updates_per_epoch))
        ]  # fmt: skip

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond | None) -> Tensor:
        """The (guided, with ``guidance_scale`` > 1) velocity of whichever adapter is active."""
        return guided_velocity(self.flow, x_t, t, cond, guidance_scale=self.cfg.guidance_scale, uncond=uncond)

    def forward(self, batch: NFTBatch, micro: NFTMicro) -> dict[str, Tensor]:
        """The shared forward pass of a micro-batch: ``x0``, ``t`` ``(B,)``, ``x_t``, ``v`` (with grad), ``v_old``
        and, with a KL, ``v_ref``."""
        rows, flow = micro.rows, self.flow
        x0 = batch.x0[rows]
        t = batch.times[batch.train_steps[rows, micro.column]].to(flow.device)
        gen = seeded(self.ctx.seed, self.ctx.accelerator.process_index, micro.epoch, micro.step, micro.column,
                     int(rows[0]), 5)  # fmt: skip
        noise = torch.randn(x0.shape, generator=gen).to(flow.device)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        cond = batch.cond.index(rows)
        uncond = None if batch.uncond is None else batch.uncond.index(rows)
        out = {"x0": x0, "t": t, "x_t": x_t, "noise": noise}
        with torch.no_grad(), flow.adapter(OLD_ADAPTER):
            out["v_old"] = self.velocity(x_t, t, cond, uncond).float()
        out["v"] = self.velocity(x_t, t, cond, uncond).float()
        if self.cfg.kl_beta > 0:
            with torch.no_grad(), flow.adapter(None):
                out["v_ref"] = self.velocity(x_t, t, cond, uncond).float()
        return out

    def loss(self, batch: NFTBatch, micro: NFTMicro) -> dict[str, Tensor]:
        """The module docstring's loss at samples ``micro.rows`` and their training time ``micro.column``, weighted
        by the micro-batch's share of its optimizer step's (sample, time) pairs: ``loss_policy`` (or the per-reward
        losses the balancer takes), ``loss_kl``; diagnostics ``delta`` ``(B,)`` (``mean |v - v_old|``) and ``r``."""
        cfg, rows = self.cfg, micro.rows
        f = self.forward(batch, micro)
        positive, negative = implicit_errors(f["v"], f["v_old"], f["x0"], f["x_t"], f["t"], cfg.beta)

        def per_sample(advantages: Tensor) -> Tensor:
            return nft_policy_loss(positive, negative, advantages, cfg.beta, cfg.adv_clip_max)

        share = rows.numel() / micro.step_rows / batch.train_steps.shape[1]
        combined = None if batch.advantages is None else batch.advantages[rows]
        columns = None if batch.reward_advantages is None else batch.reward_advantages[rows]
        terms = self.balance.policy_terms(per_sample, combined, columns, share)
        if cfg.kl_beta > 0:
            terms["loss_kl"] = share * cfg.kl_beta * ((f["v"] - f["v_ref"]) ** 2).mean()
        terms["delta"] = (f["v"] - f["v_old"]).detach().abs().flatten(1).mean(dim=1)
        if combined is not None:
            terms["r"] = optimality_weight(combined, cfg.adv_clip_max)
        return terms

    def micro_sync(self, index: int, micros: int) -> bool:
        return self.balance.begin_micro(index, micros)

    def backward(self, terms: dict[str, Tensor], epoch: int) -> None:
        self.balance.backward(terms, epoch, super().backward)

    def update(self, batch: NFTBatch, epoch: int) -> dict[str, float]:
        """The epoch's optimizer steps (with the balancer's state restored before and stored after), then the old
        policy's soft update; logs ``old_decay``."""
        self.balance.restore()
        out = super().update(batch, epoch)
        out.update(self.balance.epoch_metrics())
        self.balance.store()
        out["old_decay"] = self.update_old_policy()
        return out

    # ------------------------------------------------------------------------------------------------- loop hooks
    def evaluate(self, epoch: int, tag: str) -> dict[str, Any]:
        return self.ft.evaluator.run(epoch, tag)

    def finish(self) -> dict[str, Any]:
        return self.ft.finish()
