"""Model-family adapters: the only place that knows diffusers' timestep scale, latent packing, guidance embedding
and VAE normalisation. ``FAMILIES`` is the registry (family name -> adapter class)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from diffalign.config import ConfigError, ModelConfig, resolve_device
from diffalign.pipelines.base import FlowModel, SizeLimits, check_images, local_folder, resolve_dtype, size_problem
from diffalign.pipelines.flux import FluxFlowModel
from diffalign.pipelines.flux2 import Flux2FlowModel
from diffalign.pipelines.sd3 import SD3FlowModel

FAMILIES: dict[str, type[FlowModel]] = {
    "sd3": SD3FlowModel,
    "flux": FluxFlowModel,
    "flux2": Flux2FlowModel,
}


def get_family(name: str) -> type[FlowModel]:
    """The adapter class registered as ``name``; a clear error naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


BUILTIN_PREFIX = "builtin:"


def resolve_model_path(path: str | os.PathLike) -> str:
    """``"builtin:NAME"`` -> the folder of a model shipped inside the package (``diffalign/assets/NAME``)."""
    path = os.fspath(path)
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no built-in model {name!r} (looked in {folder})")
    return folder


def load_flow_model(
    family: str,
    path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    lora: str | os.PathLike | None = None,
    max_sequence_length: int | None = None,
) -> FlowModel:
    """Load a pipeline of ``family`` from a hub id, a folder or ``builtin:NAME`` and wrap it; optionally load a
    LoRA in diffusers' format."""
    flow = get_family(family).from_pretrained(
        resolve_model_path(path), dtype=dtype, device=device, max_sequence_length=max_sequence_length
    )
    if lora:
        flow.load_lora(lora)
    return flow


def load_model(cfg: ModelConfig, device: str | torch.device | None = None) -> FlowModel:
    """The flow model a ``model`` config section describes, with its speed settings (autocast, attention backend,
    compile) applied; ``device`` overrides ``cfg.device`` (e.g. the accelerator's device for ``auto``)."""
    flow = load_flow_model(
        cfg.family, cfg.path, dtype=cfg.dtype, device=resolve_device(cfg.device) if device is None else device,
        lora=cfg.lora, max_sequence_length=cfg.max_sequence_length,
    )  # fmt: skip
    flow.set_autocast(cfg.autocast)
    if cfg.attention_backend != "native":
        flow.set_attention_backend(cfg.attention_backend)
    if cfg.compile:
        flow.compile()
    return flow


def _component_config(path: str, name: str) -> dict[str, Any] | None:
    """The JSON file ``name`` of the pipeline at ``path`` (a local folder, or a hub id whose files are in the local
    cache), or None when it is not available without a download."""
    folder = local_folder(path)
    if folder is None:
        from huggingface_hub import try_to_load_from_cache

        file = try_to_load_from_cache(path, name)
        file = file if isinstance(file, str) else None
    else:
        file = os.path.join(folder, name)
    if file is None or not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def check_pretrained(
    family: str, path: str | os.PathLike, height: int | None = None, width: int | None = None
) -> None:
    """Check from its config files alone (no weights are read) that ``path`` holds a pipeline of ``family`` and,
    given a size, that it can produce ``height x width`` images.

    Raises ``ConfigError`` naming ``model.family`` or ``sampling.height``/``sampling.width``, and
    ``FileNotFoundError`` for a missing local path. A hub id whose configs are not in the local cache is not
    checked here (loading it fetches and checks them).
    """
    cls = get_family(family)
    folder = resolve_model_path(path)
    index = _component_config(folder, "model_index.json")
    if index is None:
        return
    expected = [c.__name__ for c in cls.pipeline_classes]
    if index.get("_class_name") not in expected:
        raise ConfigError(f"config key 'model.family': the {family!r} family needs a {' or '.join(expected)}, "
                          f"but {os.fspath(path)!r} holds a {index.get('_class_name')}")  # fmt: skip
    if height is None or width is None:
        return
    transformer = _component_config(folder, "transformer/config.json")
    vae = _component_config(folder, "vae/config.json")
    if transformer is None or vae is None:
        return
    problem = size_problem(cls.size_limits(transformer, vae), height, width)
    if problem:
        raise ConfigError(f"config keys 'sampling.height'/'sampling.width': the model {os.fspath(path)!r}: {problem}")


def wrap_pipeline(pipe, max_sequence_length: int | None = None) -> FlowModel:
    """Wrap an already-built diffusers pipeline with the adapter of its family."""
    for cls in FAMILIES.values():
        if isinstance(pipe, cls.pipeline_classes):
            return cls(pipe, max_sequence_length=max_sequence_length)
    raise TypeError(f"no diffalign adapter for {type(pipe).__name__}")


__all__ = [
    "FAMILIES",
    "FlowModel",
    "FluxFlowModel",
    "Flux2FlowModel",
    "SD3FlowModel",
    "SizeLimits",
    "check_images",
    "check_pretrained",
    "get_family",
    "load_flow_model",
    "load_model",
    "resolve_model_path",
    "resolve_dtype",
    "wrap_pipeline",
]
