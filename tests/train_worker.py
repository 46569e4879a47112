"""Run by ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) from test_distributed.py: the whole
training loop (``run_training``) under DDP or under FSDP2.

accelerate picks FSDP only when a GPU backend is present, while torch's FSDP2 (``fully_shard``) itself runs on
CPU with gloo. For ``fsdp`` the worker therefore sets the distributed type and the plugin (from the shipped
``configs/accelerate/fsdp.yaml``) that ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets on
GPUs; ``Accelerator.prepare`` then shards the transformer with accelerate's own FSDP2 code.

    python train_worker.py {ddp,fsdp} CONFIG [key=value ...]
"""

import os
import sys

import yaml
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
from diffalign.config import load_config
from diffalign.training.loop import run_training

SHIPPED_FSDP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "fsdp.yaml")


def accelerator_for(mode: str, project_dir: str) -> Accelerator:
    """A CPU accelerator for this process, set up for ``ddp`` or (as the shipped config does) ``fsdp``."""
    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=project_dir)
    if mode == "fsdp":
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        # the shipped sharded setup: configs/accelerate/fsdp.yaml's fsdp_config, as `accelerate launch` reads it
        # (the launcher passes it on as FSDP_* environment variables, which the plugin reads)
        with open(SHIPPED_FSDP_CONFIG) as f:
            for key, value in yaml.safe_load(f)["fsdp_config"].items():
                os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    assert acc.distributed_type == (DistributedType.FSDP if mode == "fsdp" else DistributedType.MULTI_CPU)
    return acc


def main(mode: str, config: str, overrides: list[str]) -> None:
    job = load_config(FlowGRPOJob, config, overrides)
    run_training(job, FlowGRPOTrainer, accelerator_for(mode, job.output_dir))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
