"""Training algorithms, one file each (config + trainer). ``ALGORITHMS``: name -> (job dataclass, trainer)."""

from diffalign.algorithms.flow_grpo import FlowGRPOConfig, FlowGRPOJob, FlowGRPOTrainer, group_advantages

ALGORITHMS: dict[str, tuple[type, type]] = {
    "flow_grpo": (FlowGRPOJob, FlowGRPOTrainer),
}

__all__ = ["ALGORITHMS", "FlowGRPOConfig", "FlowGRPOJob", "FlowGRPOTrainer", "group_advantages"]
