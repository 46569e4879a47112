"""Training algorithms, one file each (config + trainer). ``ALGORITHMS``: name -> (job dataclass, trainer)."""

from diffalign.algorithms.dmd import DMDConfig, DMDJob, DMDTrainer
from diffalign.algorithms.flow_grpo import FlowGRPOConfig, FlowGRPOJob, FlowGRPOTrainer, group_advantages
from diffalign.algorithms.nft import NFTConfig, NFTJob, NFTTrainer
from diffalign.algorithms.raft import RAFTConfig, RAFTJob, RAFTTrainer
from diffalign.algorithms.rtdmd import RTDMDConfig, RTDMDJob, RTDMDTrainer

ALGORITHMS: dict[str, tuple[type, type]] = {
    "dmd": (DMDJob, DMDTrainer),
    "flow_grpo": (FlowGRPOJob, FlowGRPOTrainer),
    "nft": (NFTJob, NFTTrainer),
    "raft": (RAFTJob, RAFTTrainer),
    "rtdmd": (RTDMDJob, RTDMDTrainer),
}

__all__ = [
    "ALGORITHMS",
    "DMDConfig",
    "DMDJob",
    "DMDTrainer",
    "FlowGRPOConfig",
    "FlowGRPOJob",
    "FlowGRPOTrainer",
    "NFTConfig",
    "NFTJob",
    "NFTTrainer",
    "RAFTConfig",
    "RAFTJob",
    "RAFTTrainer",
    "RTDMDConfig",
    "RTDMDJob",
    "RTDMDTrainer",
    "group_advantages",
]
