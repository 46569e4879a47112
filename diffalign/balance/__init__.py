"""Several rewards, one update: per-reward advantages (``advantages``), the min-norm QP (``qp``) and the MARBLE
gradient balancer (``balancer``)."""

from diffalign.balance.advantages import Advantages, normalise_per_group, reward_advantages, reward_table
from diffalign.balance.balancer import (
    BalanceConfig,
    BalanceReport,
    GradientBalancer,
    MarbleSolution,
    marble_solution,
    reward_losses,
    update_cosines,
    update_norm_sq,
)
from diffalign.balance.qp import BalanceError, MinNormSolution, invalid_rows, min_norm_weights

__all__ = [
    "Advantages",
    "BalanceConfig",
    "BalanceError",
    "BalanceReport",
    "GradientBalancer",
    "MarbleSolution",
    "MinNormSolution",
    "invalid_rows",
    "marble_solution",
    "min_norm_weights",
    "normalise_per_group",
    "reward_advantages",
    "reward_losses",
    "reward_table",
    "update_cosines",
    "update_norm_sq",
]
