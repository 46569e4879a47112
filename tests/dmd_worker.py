"""Run by ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) from test_distributed.py: DMD2 under
DDP, each rank writing what it trained (both adapters) and what it drew (the stop steps, a fingerprint of its
samples) to ``OUT/rank<i>.safetensors``.

    python dmd_worker.py CONFIG OUT [key=value ...]
"""

import os
import sys

import torch
from safetensors.torch import save_file
from train_worker import accelerator_for

from diffalign.algorithms.dmd import DMDBatch, DMDJob, DMDTrainer
from diffalign.config import load_config
from diffalign.training.loop import run_training


class RecordingDMD(DMDTrainer):
    """DMD2 that remembers each epoch's stop step and sample fingerprint and writes them with its adapters'
    weights after the last update."""

    out = ""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.stops: list[int] = []
        self.fingerprints: list[float] = []

    def collect(self, epoch: int) -> DMDBatch:
        batch = super().collect(epoch)
        self.stops.append(batch.stop)
        self.fingerprints.append(float(batch.x0.sum()))
        return batch

    def update(self, batch: DMDBatch, epoch: int) -> dict[str, float]:
        out = super().update(batch, epoch)
        # the trained weights after the last update (the loop loads the EMA into the network when it ends)
        self.trained = {
            n: p.detach().cpu().clone() for n, p in self.flow.transformer.named_parameters() if "lora_" in n
        }
        return out

    def finish(self):
        rank = self.ctx.accelerator.process_index
        state = dict(self.trained)
        state["stops"] = torch.tensor(self.stops)
        state["fingerprints"] = torch.tensor(self.fingerprints, dtype=torch.float64)
        save_file(state, os.path.join(self.out, f"rank{rank}.safetensors"))
        return super().finish()


def main(config: str, out: str, overrides: list[str]) -> None:
    job = load_config(DMDJob, config, overrides)
    RecordingDMD.out = out
    run_training(job, RecordingDMD, accelerator_for("ddp", job.output_dir))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
