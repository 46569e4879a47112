"""Exponential moving average of a module's trainable parameters, checkpointable as a plain tensor dict."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from diffalign.training.sharding import copy_full_, full_tensor, reshard


class EMA:
    """Shadow copies ``s <- d s + (1 - d) p`` of the trainable parameters of ``module`` (or of the parameters
    named ``parameters``, e.g. one of several LoRA adapters).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (n = number of updates), so
    early shadows are not dominated by the random initialisation. Build it after sharding (FSDP2): the shadows
    then are shards like the parameters; ``state_dict`` (a collective there) returns whole tensors and
    ``load_state_dict`` takes them.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999, parameters: Sequence[str] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.num_updates = 0
        named = set(parameters) if parameters is not None else None
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters()
                       if (p.requires_grad if named is None else n in named)}  # fmt: skip
        if named is not None and len(self.shadow) != len(named):
            missing = sorted(named - set(self.shadow))
            raise KeyError(f"EMA: the module has no parameters {missing[:3]}")

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        reshard(self.module)
        for n, p in self.module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the shadow weights into the module (for evaluation or export)."""
        reshard(self.module)
        params = dict(self.module.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in backup.items():
                    params[n].copy_(value)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the module's trainable parameters with the shadow weights."""
        reshard(self.module)
        params = dict(self.module.named_parameters())
        for n, value in self.shadow.items():
            params[n].copy_(value.to(params[n].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{n}": full_tensor(v) for n, v in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.shadow if f"shadow.{n}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]!r}")
        for n in self.shadow:
            copy_full_(self.shadow[n], state[f"shadow.{n}"])
        self.num_updates = int(state["num_updates"])
