"""Run by ``accelerate launch --multi_gpu --num_processes 2`` from test_distributed.py: one Flow-GRPO epoch on a
tiny model, then every rank dumps its trained weights, rewards, advantages and group ids."""

import os
import sys

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
from diffalign.config import load_config
from diffalign.training.loop import TrainContext


def main(config: str, out: str) -> None:
    job = load_config(FlowGRPOJob, config)
    acc = Accelerator(cpu=True)
    trainer = FlowGRPOTrainer(TrainContext(job, acc))
    batch = trainer.collect(0)
    trainer.update(batch, 0)
    _, groups, _ = trainer.epoch_prompts(0)
    state = {f"lora.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trainer.flow.transformer).items()}
    state.update(rewards=batch.rewards.cpu(), advantages=batch.advantages.cpu(), groups=groups,
                 world=torch.tensor(acc.num_processes))  # fmt: skip
    save_file(state, os.path.join(out, f"rank{acc.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
