"""Whole tensors out of, and into, parameters that may be sharded (FSDP2 ``DTensor``), so that checkpoints, the EMA
and exports are the same files with or without sharding.

On a sharded tensor these functions are collectives: every process must call them, in the same order. On a plain
tensor (one process, DDP) they are plain copies.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def reshard(module: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back into its sharded state. FSDP2 keeps the root unit's gathered
    parameters registered after a forward pass that no backward followed, and state-dict code must see the
    sharded parameters (the ones the optimizer holds). A no-op without FSDP."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor behind ``value`` (all-gathered if it is a ``DTensor`` shard), detached."""
    value = value.detach()
    return value.full_tensor() if isinstance(value, DTensor) else value


@torch.no_grad()
def copy_full_(target: Tensor, full: Tensor) -> None:
    """Copy the whole tensor ``full`` into ``target`` in place; a sharded ``target`` keeps only its own shard
    (every process passes the same ``full``, so nothing is communicated)."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(full.shape)} vs parameter {tuple(target.shape)}")
    full = full.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(full)


def full_parameters(module: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Parameters ``names`` of ``module`` as whole CPU tensors (a collective when they are sharded)."""
    params = dict(module.named_parameters())
    return {name: full_tensor(params[name]).cpu().contiguous() for name in names}


def load_full_parameters_(module: torch.nn.Module, state: dict[str, Tensor], names: list[str]) -> None:
    """Copy whole tensors ``state[name]`` into parameters ``names`` of ``module`` (``KeyError`` naming the first
    missing or unexpected key)."""
    missing, unexpected = [n for n in names if n not in state], [k for k in state if k not in set(names)]
    if missing or unexpected:
        raise KeyError(f"trained state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    params = dict(module.named_parameters())
    for name in names:
        copy_full_(params[name], state[name])
