"""Where reward checkpoints come from: a local file or folder, or a Hugging Face Hub repository.

One rule for every reward: an existing local path is used as is; otherwise a string of the form ``owner/name`` is
a Hub repository, resolved through ``huggingface_hub`` (its cache; nothing is fetched while ``HF_HUB_OFFLINE=1``).
Every failure is a ``FileNotFoundError`` or a ``CheckpointError`` whose message names the reward, the source and
the file, and says what to do. Weights are read with ``safetensors`` or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".txt")


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used: corrupt, wrong format, or the wrong architecture."""


def is_hub_id(source: str) -> bool:
    """``owner/name`` (or a legacy un-namespaced id such as ``bert-base-uncased``) that is not an existing local
    path and does not look like a file name."""
    return bool(_HUB_ID.match(source)) and not os.path.exists(source) and not source.lower().endswith(_FILE_SUFFIXES)


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    prefix = "HF_HUB_OFFLINE is set, so nothing can be downloaded. " if offline else ""
    return f"{prefix}Download it beforehand (huggingface-cli download ...) or pass a local path."


def resolve_file(source: str, filename: str | None, what: str) -> str:
    """Path of a checkpoint file.

    Args:
        source: a local file, a local folder (``filename`` is looked up in it) or a Hub repo id ``owner/name``.
        filename: the file inside a folder or repository (ignored when ``source`` is a file).
        what: the reward's name, for error messages.

    Raises:
        FileNotFoundError: the path does not exist, or the Hub file is neither cached nor downloadable.
    """
    source = os.path.expanduser(os.fspath(source))
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        if filename is None:
            raise FileNotFoundError(f"{what}: {source!r} is a folder; name the checkpoint file inside it")
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: checkpoint file {filename!r} not found in folder {source!r}")
        return path
    if is_hub_id(source) and filename is not None:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(source, filename)
        except Exception as e:  # offline, missing repo/file, network: all end the same way for the user
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"{what}: cannot get {filename!r} from the Hugging Face Hub repo {source!r} ({reason}). "
                + _offline_hint()
            ) from e
    raise FileNotFoundError(f"{what}: checkpoint path {source!r} does not exist")


def from_pretrained(loader: Callable[..., T], source: str, what: str, **kwargs: Any) -> T:
    """``loader(source, **kwargs)`` (a transformers ``from_pretrained``) with a clear error when ``source`` is neither
    a local folder nor a cached/downloadable Hub repo."""
    source = os.path.expanduser(os.fspath(source))
    if not os.path.isdir(source) and not is_hub_id(source):
        raise FileNotFoundError(f"{what}: model folder {source!r} does not exist (and is not a Hub repo id)")
    try:
        return loader(source, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "folder" if os.path.isdir(source) else "Hugging Face Hub repo"
        hint = "" if os.path.isdir(source) else " " + _offline_hint()
        raise FileNotFoundError(f"{what}: cannot load from {where} {source!r}: {first}.{hint}") from e


def load_state_dict(path: str, what: str) -> dict[str, Any]:
    """Read a weights file: ``.safetensors`` with safetensors, anything else with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is corrupt, truncated, pickles arbitrary objects, or is not a dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/EOF errors from torch.load, SafetensorError from safetensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what}: cannot read weights file {path!r} (corrupt or not a weights file): {first}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path!r} holds a {type(state).__name__}, expected a state dict")
    return state


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. the ``module.`` of a DDP-saved checkpoint)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_strict(module: torch.nn.Module, state: dict[str, Tensor], what: str, path: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names missing/unexpected keys and shape
    mismatches (a checkpoint of another architecture or size)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(
            f"{what}: weights in {path!r} do not fit the configured architecture: {'; '.join(parts)}"
        )
    module.load_state_dict(state, strict=True)
