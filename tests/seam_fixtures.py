"""A toy trainer with two registered modules on one tiny SD3 transformer, for the trainer-seam tests (in process
and under ``accelerate launch``): a generator LoRA ``gen`` and a critic LoRA ``fake``, with the teacher being the
transformer with both adapters off, updated in alternating phases (two critic steps, then one generator step),
as a distillation trainer would be.

Both phases are flow matching on fixed random latents (the same on every process, so a 2-process run takes the
same steps as one process); the generator's loss also pulls its velocity toward the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.pipelines import wrap_pipeline
from diffalign.pipelines.tiny import build_tiny
from diffalign.training.loop import TrainContext
from diffalign.training.trainer import Batch, Cadence, Trainer, seeded

PROMPTS = ["a red circle", "a blue square"]


@dataclass(kw_only=True)
class ToyTrain:
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


@dataclass(kw_only=True)
class ToyJob:
    output_dir: str
    seed: int = 0
    epochs: int = 3
    fake_steps: int = 2
    train: ToyTrain = field(default_factory=ToyTrain)


@dataclass(kw_only=True)
class ToyBatch(Batch):
    x0: Tensor  # (B, 4, 8, 8)
    noise: Tensor  # (B, 4, 8, 8)
    t: Tensor  # (B,)


class TwoAdapterTrainer(Trainer):
    """``generator`` (adapter ``gen``, EMA, exported as ``final/``) and ``fake_score`` (adapter ``fake``, no EMA,
    exported as ``final/fake_score``)."""

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        job: ToyJob = ctx.cfg
        self.job = job
        self.flow = wrap_pipeline(build_tiny("sd3"), max_sequence_length=16)
        self.flow.pipe.to(ctx.device)
        transformer = self.flow.transformer
        for name in ("gen", "fake"):
            self.flow.add_lora(rank=2, alpha=4, adapter_name=name)
        params = dict(transformer.named_parameters())
        gen = [params[n] for n in params if ".gen." in n]
        fake = [params[n] for n in params if ".fake." in n]
        gen_opt = torch.optim.AdamW(gen, lr=2e-2, weight_decay=0.0)
        fake_opt = torch.optim.AdamW(fake, lr=2e-2, weight_decay=0.0)
        # decaying rates that do not depend on the run's length (a run resumed with more epochs continues them)
        gen_sched = torch.optim.lr_scheduler.LambdaLR(gen_opt, lambda k: 1 / (1 + 0.2 * k))
        fake_sched = torch.optim.lr_scheduler.LambdaLR(fake_opt, lambda k: 1 / (1 + 0.1 * k))
        ctx.register("generator", transformer, gen_opt, gen_sched, grad_clip=1.0, ema_decay=0.5,
                     export=self._exporter("gen"), export_dir="final")  # fmt: skip
        ctx.register("fake_score", transformer, fake_opt, fake_sched, grad_clip=1.0, export=self._exporter("fake"))
        ctx.prepare()
        for module, adapter in (("generator", "gen"), ("fake_score", "fake")):
            self.flow.use_network(ctx.modules[module].network, adapter=adapter)
        self.cond = self.flow.encode_prompt(PROMPTS * 2)
        self.cadence = Cadence(epochs=job.epochs, checkpoint_every=1, keep_checkpoints=None)

    def _exporter(self, adapter: str):
        def export(directory: str, state: dict[str, Tensor]) -> None:
            self.flow.save_lora(directory, adapter_name=adapter, state_dict=state)

        return export

    def collect(self, epoch: int) -> ToyBatch:
        g = seeded(self.ctx.seed, epoch, 5)
        shape = (1 + self.job.fake_steps, len(self.cond), 4, 8, 8)
        x0 = torch.randn(shape, generator=g).clamp(-2, 2)
        noise, t = torch.randn(shape, generator=g), torch.rand(shape[:2], generator=g)
        return ToyBatch(x0=x0.to(self.ctx.device), noise=noise.to(self.ctx.device), t=t.to(self.ctx.device))

    def update(self, batch: ToyBatch, epoch: int) -> dict[str, float]:
        critic = [[("fake", k + 1)] for k in range(self.job.fake_steps)]
        fake = self.optimize(batch, epoch, critic, self.loss, ["fake_score"])
        gen = self.optimize(batch, epoch, [[("gen", 0)]], self.loss, ["generator"])
        return {**{f"fake/{k}": v for k, v in fake.items()}, **{f"gen/{k}": v for k, v in gen.items()}}

    def loss(self, batch: ToyBatch, micro: tuple[str, int]) -> dict[str, Tensor]:
        adapter, k = micro
        x0, noise, t = batch.x0[k], batch.noise[k], batch.t[k]
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with self.flow.adapter(adapter):
            v = self.flow.velocity(x_t, t, self.cond)
        terms = {"loss_fm": F.mse_loss(v, noise - x0)}
        if adapter == "gen":
            with torch.no_grad(), self.flow.adapter(None):
                teacher = self.flow.velocity(x_t, t, self.cond)
            terms["loss_teacher"] = 0.1 * F.mse_loss(v, teacher)
        return terms
