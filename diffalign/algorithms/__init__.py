"""Training algorithms, one file each (config + trainer). ``ALGORITHMS``: name -> (job dataclass, trainer)."""

from diffalign.algorithms.dmd import DMDConfig, DMDJob, DMDTrainer
from diffalign.algorithms.flow_grpo import FlowGRPOConfig, FlowGRPOJob, FlowGRPOTrainer, group_advantages
from diffalign.algorithms.raft import RAFTConfig, RAFTJob, RAFTTrainer

ALGORITHMS: dict[str, tuple[type, type]] = {
    "dmd": (DMDJob, DMDTrainer),
    "flow_grpo": (FlowGRPOJob, FlowGRPOTrainer),
    "raft": (RAFTJob, RAFTTrainer),
}

__all__ = ["ALGORITHMS", "DMDConfig", "DMDJob", "DMDTrainer", "FlowGRPOConfig", "FlowGRPOJob", "FlowGRPOTrainer",
           "RAFTConfig", "RAFTJob", "RAFTTrainer", "group_advantages"]  # fmt: skip
