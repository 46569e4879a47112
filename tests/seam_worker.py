"""Run by ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) from test_distributed.py: the toy
two-adapter trainer of ``seam_fixtures`` (two registered modules on one transformer, alternating phases) through
the whole training loop under DDP or FSDP2.

    python seam_worker.py {ddp,fsdp} OUTPUT_DIR [key=value ...]
"""

import sys

from seam_fixtures import ToyJob, TwoAdapterTrainer
from train_worker import accelerator_for

from diffalign.config import load_config
from diffalign.training.loop import run_training

if __name__ == "__main__":
    mode, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    job = load_config(ToyJob, {"output_dir": out}, overrides)
    run_training(job, TwoAdapterTrainer, accelerator_for(mode, out))
