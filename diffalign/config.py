"""Configs: dataclasses are the schema, YAML files are instances, ``key=value`` strings override.

This is the only module that imports OmegaConf. ``load_config(Schema, path, overrides)`` returns a plain, typed
dataclass instance; an unknown key, a wrong type, a value outside a ``Literal`` or a missing mandatory value is a
``ConfigError`` naming the key, raised before any work starts. Every job file has a top-level ``kind`` that
says which schema it is an instance of.

Overrides address list entries by index (``rewards.1.args.path=...``); a whole list is replaced with YAML
(``'rewards=[{name: world}]'``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal, TypeVar

import torch
import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the message names the offending key."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans and floats: only ``true`` / ``false`` are booleans, so that
    ``mixed_precision: no`` stays the string ``"no"`` instead of YAML 1.1's ``False`` (boolean fields still
    accept yes / no through the schema), and ``1e-3`` is a float, not a string."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),  # fmt: skip
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_Loader) or {}
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
    """Non-empty, stripped lines of a text file; ``FileNotFoundError`` / ``ConfigError`` when missing or empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path!r} has no prompts")
    return prompts


def _apply_override(config: Any, item: str) -> None:
    """Set one ``key=value`` on the merged config; list entries are addressed by index (``rewards.1.weight``)."""
    key, sep, raw = item.partition("=")
    key = re.sub(r"\[(\w+)\]", r".\1", key.strip())  # rewards[1].weight -> rewards.1.weight
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. sampling.num_steps=20)")
    parts = key.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        node = OmegaConf.select(config, parent, default=None)
        if not isinstance(node, ListConfig):
            continue
        here = f"{parent}.{parts[depth]}"
        if not parts[depth].isdigit():
            raise ConfigError(f"config key '{here}': {parent!r} is a list; address an entry by its index "
                              f"(e.g. {parent}.0)")  # fmt: skip
        if int(parts[depth]) >= len(node):
            raise ConfigError(f"config key '{here}': {parent!r} has {len(node)} entries (indices 0 to "
                              f"{len(node) - 1}); to add or remove entries give the whole list, e.g. "
                              f"'{parent}=[...]'")  # fmt: skip
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # numbers, booleans, null, lists, mappings
        if isinstance(value, dict | list):
            value = OmegaConf.create(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse the value: {str(e).splitlines()[0]}") from e
    # a whole mapping for a name -> value table (e.g. eval_sets) replaces it, as a whole list replaces a list;
    # for a section of the schema (e.g. model) it sets the keys it names
    node = OmegaConf.select(config, key, default=None)
    table = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
    for depth in range(1, len(parts)):  # a new entry of a table (eval_sets.extra.prompts=...) is added whole
        parent = OmegaConf.select(config, ".".join(parts[:depth]), default=None)
        if isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict and parts[depth] not in parent:
            for name in reversed(parts[depth:]):
                value = {name: value}
            key, table = ".".join(parts[:depth]), False
            break
    OmegaConf.update(config, key, value, merge=not table)


def load_config(
    schema: type[T], source: str | os.PathLike | dict[str, Any] | None = None, overrides: list[str] = ()
) -> T:
    """Build a ``schema`` instance from a YAML file or dict, then ``key=value`` overrides (dotted keys)."""
    if not is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass")
    data = {} if source is None else (dict(source) if isinstance(source, dict) else _read_yaml(source))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        for item in overrides:
            _apply_override(merged, item)
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


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str, key: str = "model.device") -> torch.device | None:
    """``name`` parsed (None for ``auto``); ``ConfigError`` naming ``key`` unless it is ``auto`` or a device of one of
    :data:`DEVICE_TYPES` (``cuda:1``...). Whether this machine has it is :func:`resolve_device`'s check."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"config key '{key}': unknown device {name!r}; expected auto, cpu, cuda, cuda:N, mps or xpu")
    return device


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must be a device this machine has (``ConfigError``
    naming ``key`` otherwise)."""
    device = check_device(name, key)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = getattr(torch, device.type) if device.type != "mps" else torch.backends.mps
    if device.type != "cpu" and not backend.is_available():
        raise ConfigError(f"config key '{key}': {name!r} is not available on this machine (use auto or cpu)")
    if device.type in ("cuda", "xpu") and device.index is not None and device.index >= backend.device_count():
        raise ConfigError(f"config key '{key}': {name!r} asked for, but this machine has {backend.device_count()} "
                          f"{device.type} device(s)")  # fmt: skip
    return device


def check_output_dir(path: str | os.PathLike, name: str) -> None:
    """Raise ``ConfigError`` (starting with ``name``, e.g. ``config key 'output_dir'``) unless ``path`` is a writable
    folder or can be created as one. Creates nothing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{name}: {path!r} exists and is not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{name}: cannot create {path!r}, because {existing!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{name}: cannot write in {existing!r} ({e.strerror}); choose another folder") from e


#: Attention backends of diffusers' dispatcher that run on a CPU (the others need CUDA or another accelerator).
CPU_ATTENTION_BACKENDS = ("native", "_native_math", "flex")


def check_attention_backend(name: str, key: str = "model.attention_backend") -> None:
    """``ConfigError`` naming ``key`` unless ``name`` is a backend of diffusers' attention dispatcher whose package is
    installed (``flash`` needs ``flash-attn``, ``sage`` ``sageattention``, ``xformers`` ``xformers``, ...)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = sorted(b.value for b in AttentionBackendName)
    if name not in names:
        raise ConfigError(f"config key '{key}': unknown attention backend {name!r}; diffusers knows "
                          f"{', '.join(names)}")  # fmt: skip
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as e:
        raise ConfigError(f"config key '{key}': attention backend {name!r} is not installed: {e}") from e


def check_compiler(key: str = "model.compile") -> None:
    """``ConfigError`` naming ``key`` unless ``torch.compile`` can run here: TorchDynamo supports this Python and
    a C++ compiler (which inductor needs for CPU kernels and for its wrapper code) is on the ``PATH``."""
    import shutil

    import torch._dynamo
    from torch._inductor import config as inductor

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"config key '{key}': torch.compile does not support this Python or platform; set "
                          f"{key}=false")  # fmt: skip
    compilers = [c for c in inductor.cpp.cxx if c] if isinstance(inductor.cpp.cxx, tuple) else [inductor.cpp.cxx]
    if not any(shutil.which(c) for c in compilers + ["g++", "clang++"]):
        raise ConfigError(f"config key '{key}': torch.compile needs a C++ compiler (g++ or clang++) on the PATH; "
                          f"install one or set {key}=false")  # fmt: skip


def check_sigmas(sigmas: list[float], key: str, *, final_zero: bool) -> None:
    """``ConfigError`` naming ``key`` unless ``sigmas`` strictly decrease within [0, 1], start above 0 and (with
    ``final_zero``) end at exactly 0, or (without) stay above 0."""
    values = [float(s) for s in sigmas]
    if len(values) < (2 if final_zero else 1):
        raise ConfigError(f"config key '{key}': needs at least {2 if final_zero else 1} values, got {values}")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError(f"config key '{key}': must strictly decrease, got {values}")
    if values[0] > 1 or values[-1] < 0:
        raise ConfigError(f"config key '{key}': times must lie in [0, 1], got {values}")
    if final_zero and values[-1] != 0:
        raise ConfigError(f"config key '{key}': must decrease to exactly 0 (the clean sample), got {values}")
    if not final_zero and values[-1] <= 0:
        raise ConfigError(f"config key '{key}': must stay above 0 (the final 0 is implied), got {values}")


# ---------------------------------------------------------------------------------------------- shared sections
@dataclass(kw_only=True)
class ModelConfig:
    """Which pipeline to load and how.

    Attributes:
        family: ``sd3`` (SD3/SD3.5), ``flux`` (FLUX.1), ``flux2`` (FLUX.2).
        path: hub id (``stabilityai/stable-diffusion-3.5-medium``) or local diffusers folder.
        dtype: the dtype the weights are loaded in (step maths and log-probs always run in float32).
        autocast: ``bfloat16`` / ``float16``: the transformer's forward runs under ``torch.autocast`` in that dtype
            (weights stay in ``dtype``; the velocity comes back float32; text encoders and VAE are untouched);
            ``none``: it runs in ``dtype``; ``auto``: bf16 where the device runs it natively (a GPU, a CPU with AMX /
            AVX-512 bf16), none elsewhere. bf16 pays only there: an AVX2-only CPU emulates it, about 5x slower than
            float32 (see docs/speed.md).
        compile: ``torch.compile`` the transformer (in place: parameter names, LoRA and checkpoints unchanged).
            Compiled kernels are cached on disk (``TORCHINDUCTOR_CACHE_DIR``, default
            ``~/.cache/diffalign/inductor``), so a second run with the same shapes compiles much faster.
        attention_backend: diffusers' attention dispatcher backend of the transformer (``native`` = PyTorch SDPA;
            ``_native_math``, ``flex``, and with CUDA ``flash``, ``_flash_3``, ``sage``, ``xformers``, ... when
            their package is installed).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        lora: optional folder (or file) with a LoRA in diffusers' format to load on top.
        max_sequence_length: text-encoder length for T5/Qwen prompts (None = the pipeline's default).
    """

    family: Literal["sd3", "flux", "flux2"] = "sd3"
    path: str = MISSING
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    autocast: Literal["none", "auto", "bfloat16", "float16"] = "none"
    compile: bool = False
    attention_backend: str = "native"
    device: str = "auto"
    lora: str | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        check_device(self.device, "model.device")
        check_attention_backend(self.attention_backend, "model.attention_backend")
        if self.compile:
            check_compiler("model.compile")


@dataclass(kw_only=True)
class SamplingConfig:
    """How to sample.

    Attributes:
        num_steps: denoising steps T.
        height, width: image size in pixels (multiples of the family's factor: 16 for SD3/FLUX.1).
        guidance_scale: classifier-free guidance scale (1 = none; null = the family default: SD3 4.5).
        guidance: embedded guidance of guidance-distilled checkpoints (FLUX.1-dev; null = 3.5).
        shift: static time shift (null = the checkpoint's own schedule).
        sigmas: ``num_steps`` step times in (0, 1], strictly decreasing, in place of the uniform grid that the
            checkpoint's scheduler shifts (the stock pipelines' ``sigmas`` argument; a few-step student's list);
            null = the uniform grid.
        sde: ``ode`` (deterministic Euler), or a stochastic step: ``flow_sde``, ``cps``, ``dance``.
        noise_level: the stochastic step's noise scale.
    """

    num_steps: int = 28
    height: int = 512
    width: int = 512
    guidance_scale: float | None = None
    guidance: float | None = None
    shift: float | None = None
    sigmas: list[float] | None = None
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
        if self.sigmas is not None:
            check_sigmas(self.sigmas, "sampling.sigmas", final_zero=False)
            if len(self.sigmas) != self.num_steps:
                raise ConfigError(f"config key 'sampling.sigmas': {len(self.sigmas)} sigmas for num_steps "
                                  f"{self.num_steps}; give one per step")  # fmt: skip
            if self.shift is not None:
                raise ConfigError("config key 'sampling.sigmas': give either sigmas or shift, not both")


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
