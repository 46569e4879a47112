"""Configs: dataclasses are the schema, YAML files are instances, ``key=value`` strings override.

This is the only module that imports OmegaConf. ``load_config(Schema, path, overrides)`` returns a plain, typed
dataclass instance; an unknown key, a wrong type, a value outside a ``Literal`` or a missing mandatory value is a
``ConfigError`` naming the key, raised before any work starts. Every job file has a top-level ``kind`` that
says which schema it is an instance of.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal, TypeVar

import torch
import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the message names the offending key."""


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def read_kind(path: str | os.PathLike) -> str:
    """The ``kind`` key of a job file (which schema it instantiates)."""
    kind = _read_yaml(path).get("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{os.fspath(path)}: missing top-level key 'kind' (e.g. kind: sample)")
    return kind


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a text file; ``FileNotFoundError`` / ``ValueError`` when missing or empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r} has no prompts")
    return prompts


def _parse_overrides(overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. sampling.num_steps=20)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {e}") from e


def load_config(
    schema: type[T], source: str | os.PathLike | dict[str, Any] | None = None, overrides: list[str] = ()
) -> T:
    """Build a ``schema`` instance from a YAML file or dict, then ``key=value`` overrides (dotted keys)."""
    if not is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass")
    data = {} if source is None else (dict(source) if isinstance(source, dict) else _read_yaml(source))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data), _parse_overrides(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': {first_line}" if key else f"config error: {first_line}") from e
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # raised by a schema's __post_init__ checks
        raise ConfigError(str(e)) from e


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (what ``show-config`` prints and every run writes beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config to ``path`` atomically."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(config))
    os.replace(tmp, path)


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device`` (a bad name is a
    ``ConfigError`` naming the config ``key``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"config key '{key}': {e}") from e


# ---------------------------------------------------------------------------------------------- shared sections
@dataclass(kw_only=True)
class ModelConfig:
    """Which pipeline to load and how.

    Attributes:
        family: ``sd3`` (SD3/SD3.5), ``flux`` (FLUX.1), ``flux2`` (FLUX.2).
        path: hub id (``stabilityai/stable-diffusion-3.5-medium``) or local diffusers folder.
        dtype: the network's dtype (step maths always run in float32).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        lora: optional folder (or file) with a LoRA in diffusers' format to load on top.
        max_sequence_length: text-encoder length for T5/Qwen prompts (None = the pipeline's default).
    """

    family: Literal["sd3", "flux", "flux2"] = "sd3"
    path: str = MISSING
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    lora: str | None = None
    max_sequence_length: int | None = None


@dataclass(kw_only=True)
class SamplingConfig:
    """How to sample.

    Attributes:
        num_steps: denoising steps T.
        height, width: image size in pixels (multiples of the family's factor: 16 for SD3/FLUX.1).
        guidance_scale: classifier-free guidance scale (1 = none; null = the family default: SD3 4.5).
        guidance: embedded guidance of guidance-distilled checkpoints (FLUX.1-dev; null = 3.5).
        shift: static time shift (null = the checkpoint's own schedule).
        sde: ``ode`` (deterministic Euler), or a stochastic step: ``flow_sde``, ``cps``, ``dance``.
        noise_level: the stochastic step's noise scale.
    """

    num_steps: int = 28
    height: int = 512
    width: int = 512
    guidance_scale: float | None = None
    guidance: float | None = None
    shift: float | None = None
    sde: Literal["ode", "flow_sde", "cps", "dance"] = "ode"
    noise_level: float = 0.7

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"config key 'sampling.num_steps': must be >= 1, got {self.num_steps}")
        if self.height < 1 or self.width < 1:
            raise ConfigError("config keys 'sampling.height'/'sampling.width': must be positive")
        if self.guidance_scale is not None and self.guidance_scale < 1:
            raise ConfigError(f"config key 'sampling.guidance_scale': must be >= 1, got {self.guidance_scale}")
        if self.sde != "ode" and self.noise_level <= 0:
            raise ConfigError(f"config key 'sampling.noise_level': must be > 0 for sde={self.sde}")


@dataclass(kw_only=True)
class SampleJob:
    """``diffalign sample``: generate images for a prompt file.

    Attributes:
        seed: base seed; image ``k`` of prompt ``i`` is reproducible from it.
        batch_size: prompts per sampler call.
        images_per_prompt: samples drawn for each prompt.
    """

    kind: Literal["sample"] = "sample"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    batch_size: int = 8
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"config key 'batch_size': must be >= 1, got {self.batch_size}")
        if self.images_per_prompt < 1:
            raise ConfigError(f"config key 'images_per_prompt': must be >= 1, got {self.images_per_prompt}")
