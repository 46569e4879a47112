"""Model-family adapters: the only place that knows diffusers' timestep scale, latent packing, guidance embedding
and VAE normalisation. ``FAMILIES`` is the registry (family name -> adapter class)."""

from __future__ import annotations

import os

import torch

from diffalign.pipelines.base import FlowModel, check_images, resolve_dtype
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
    "check_images",
    "get_family",
    "load_flow_model",
    "resolve_model_path",
    "resolve_dtype",
    "wrap_pipeline",
]
