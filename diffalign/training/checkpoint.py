"""Atomic, pickle-free checkpoints: ``save_checkpoint`` writes a folder, ``load_checkpoint`` restores it.

Layout of ``run_dir/checkpoints/step-000123/``:

- ``modules/<name>.safetensors``: state dicts of the trained modules and their EMAs (safetensors);
- ``optimizers/<name>.pt``, ``schedulers/<name>.pt``: each trained module's optimizer / LR-scheduler state dict
  (tensors and plain Python values, loaded with ``torch.load(weights_only=True)``);
- ``rng.safetensors``: torch CPU (and CUDA) generator states and any named ``torch.Generator`` states;
- ``state.json``: step and any small JSON-able extras.

A checkpoint is written into a temporary folder and renamed into place only when complete, so a crash never
leaves a half-written ``step-*`` folder; ``latest_checkpoint`` ignores temporary folders and folders without
``state.json``. Loading a corrupt checkpoint raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffalign.files import respect_umask

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer | dict[str, Any]] | None = None,
    schedulers: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = 3,
) -> str:
    """Write ``directory/step-{step:06d}`` atomically; keep the ``keep`` newest checkpoints. Returns its path.

    ``optimizers`` maps a name to an optimizer or an optimizer state dict already gathered (as the training
    loop does under FSDP); ``schedulers`` a name to an LR scheduler."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"step-{step:06d}")
    tmp = os.path.join(directory, f".tmp-step-{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "modules"))
    for name, module in modules.items():
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(_untie(state), os.path.join(tmp, "modules", f"{name}.safetensors"))
    for folder, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
        if objects:
            os.makedirs(os.path.join(tmp, folder))
        for name, obj in (objects or {}).items():
            state = obj if isinstance(obj, dict) else obj.state_dict()
            torch.save(state, os.path.join(tmp, folder, f"{name}.pt"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    for name, gen in (generators or {}).items():
        rng[f"gen_{name}"] = _generator_state(gen)
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "extra": extra or {}}, f, indent=1)
    respect_umask(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each key its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def list_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(directory, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(
    path: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns ``{"step": ..., "extra": ...}``."""
    path = os.fspath(path)
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        for name, module in modules.items():
            file = os.path.join(path, "modules", f"{name}.safetensors")
            module.load_state_dict(load_file(file, device=str(next(module.parameters()).device)))
        for folder, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
            for name, obj in (objects or {}).items():
                obj.load_state_dict(torch.load(os.path.join(path, folder, f"{name}.pt"), weights_only=True))
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, KeyError, EOFError) as e:
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    for name, gen in (generators or {}).items():
        key = f"gen_{name}"
        if key not in rng:
            raise CheckpointError(f"checkpoint {path!r} has no state for generator {name!r}")
        gen.set_state(rng[key])
    return state
