"""The FlowModel adapter: one diffusers pipeline's components behind diffalign's conventions.

Everything that differs between model families (the transformer's timestep scale, latent packing, the guidance
embedding, the VAE's shift/scale or batch-norm statistics, how prompts are encoded) lives in a subclass in this
package. Outside ``pipelines/`` code sees only:

- ``velocity(x_t, t, cond, guidance=None) -> v``: ``x_t`` ``(B, C, H, W)`` float, ``t`` ``(B,)`` or a float in
  [0, 1] (1 = noise), ``v`` ``(B, C, H, W)`` float32 with ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``;
- ``encode_prompt(prompts) -> Cond`` and ``empty_cond(batch)`` (the unconditional prompt for CFG);
- ``encode_images(images) -> latents`` and ``decode_latents(latents) -> images`` with images ``(B, 3, H, W)``
  float in [0, 1];
- ``time_grid(num_steps, height, width) -> (T+1,)`` float32 times from 1 down to 0;
- ``adapter(name)``: a context in which the transformer runs with one peft LoRA adapter active (or, with
  ``None``, with every adapter disabled: the base model, e.g. a reference or a teacher).

Speed settings (``model.autocast``, ``model.compile``, ``model.attention_backend``) are set on the adapter with
``set_autocast``, ``compile`` and ``set_attention_backend``; none of them changes the float32 step maths.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import Tensor

from diffalign.files import respect_umask
from diffalign.types import Cond

log = logging.getLogger("diffalign.pipelines")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device``: a CUDA GPU with bf16 support, or a CPU with AMX or AVX-512
    bf16 instructions. Elsewhere (an AVX2-only CPU) torch emulates them, about 5x slower than float32
    (docs/speed.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for anything else."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def batch_times(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Broadcast a time (float, 0-d or ``(B,)`` tensor) to a ``(B,)`` float32 tensor on ``device``."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"time has shape {tuple(t.shape)}, expected () or ({batch},)")
    return t


def local_folder(path: str | os.PathLike) -> str | None:
    """The local pipeline folder ``path`` names, or None for a hub id (``org/name`` that is not a local path).

    Raises ``FileNotFoundError`` for a local path that does not exist or holds no ``model_index.json``.
    """
    path = os.path.expanduser(os.fspath(path))
    if len(path.split("/")) == 2 and not path.startswith((".", "/")) and not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (nor is it a hub id 'org/name')")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder (no model_index.json)")
    return path


def vae_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per VAE latent cell along each side, derived from the VAE config as diffusers' pipelines do."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


class SizeLimits(NamedTuple):
    """Image sizes a checkpoint can produce, in pixels.

    Attributes:
        multiple: height and width must be multiples of this (VAE factor times patch/packing size).
        largest: the largest height or width (a learned position table's extent), or None when unbounded.
        native: the size the transformer was configured for (``sample_size`` in pixels), or None if unknown.
        why_multiple, why_largest: how ``multiple`` and ``largest`` follow from the configs (for error messages).
    """

    multiple: int
    largest: int | None = None
    native: int | None = None
    why_multiple: str = ""
    why_largest: str = ""


class FlowModel(ABC):
    """Base adapter. Subclasses set the class attributes and implement the abstract methods.

    Attributes:
        family: registry name (``"sd3"``, ``"flux"``, ``"flux2"``).
        pipeline_classes: the stock diffusers pipelines whose components this adapter accepts.
        lora_target_modules: default LoRA targets for this family's transformer (attention projections).
        default_guidance_scale: the family's usual CFG scale (true CFG), or the distilled guidance value for
            guidance-embedded checkpoints.
        pipe: the wrapped pipeline; its components are used in place, never copied.
        nfe: running count of per-sample transformer evaluations (rows pushed through the transformer).
    """

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[type[DiffusionPipeline], ...]]
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_guidance_scale: ClassVar[float] = 1.0

    def __init__(self, pipe: DiffusionPipeline, max_sequence_length: int | None = None) -> None:
        if not isinstance(pipe, self.pipeline_classes):
            expected = " or ".join(c.__name__ for c in self.pipeline_classes)
            raise TypeError(f"the {self.family!r} family needs a {expected}, got a {type(pipe).__name__}")
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.nfe = 0
        self.autocast: torch.dtype | None = None
        self.attention_backend = "native"
        self._network: torch.nn.Module | None = None
        self._adapter_networks: dict[str, torch.nn.Module] = {}
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
                module.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        **kwargs,
    ) -> FlowModel:
        """Load the family's stock pipeline from a hub id or a local folder, in ``dtype``, onto ``device``.

        A local path must exist and hold a ``model_index.json``; anything else is treated as a hub id (which
        fails with the hub's own message when offline).
        """
        path = local_folder(path) or os.fspath(path)
        pipe = DiffusionPipeline.from_pretrained(path, dtype=resolve_dtype(dtype), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), max_sequence_length=max_sequence_length)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def network(self) -> torch.nn.Module:
        """The module ``velocity`` calls: the transformer, or the wrapper set by ``use_network`` (e.g. the DDP
        module returned by ``accelerator.prepare``, so gradients are synchronised)."""
        return self.transformer if self._network is None else self._network

    def use_network(self, module: torch.nn.Module | None, adapter: str | None = None) -> None:
        """Route ``velocity`` through ``module`` (a wrapper of this transformer), or back to the bare one (None).

        With ``adapter``, ``module`` is instead the wrapper to call while that LoRA adapter is active in an
        :meth:`adapter` block (e.g. one DDP wrapper per trained adapter, so that each synchronises its own
        gradients); ``module=None`` forgets it."""
        if adapter is None:
            self._network = module
        elif module is None:
            self._adapter_networks.pop(adapter, None)
        else:
            self._adapter_networks[adapter] = module

    @contextlib.contextmanager
    def using(self, module: torch.nn.Module | None) -> Iterator[None]:
        """Route ``velocity`` through ``module`` (None: the bare transformer) inside the block, then back."""
        previous = self._network
        self._network = module
        try:
            yield
        finally:
            self._network = previous

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the flow with one LoRA adapter of the transformer inside the block.

        ``name``: that peft adapter alone is active (through the wrapper given to ``use_network(..., adapter=name)``
        if any, else the bare transformer). ``None``: every adapter is disabled, so the flow is the base model
        (the reference of a KL penalty, the teacher of a distillation). The previous adapter state and routing
        are restored on exit, so blocks nest.

        Which parameters require gradients is left as it was (peft's switches would freeze every adapter but the
        active one): an adapter's parameters get gradients from the forward passes run in its block, so several
        adapters can be trained in alternation, each with its own optimizer.
        """
        transformer = self.transformer
        config = getattr(transformer, "peft_config", None)
        if not config:
            raise ValueError(f"the {self.family} transformer has no LoRA adapter (add one with add_lora)")
        if name is not None and name not in config:
            raise ValueError(f"no LoRA adapter named {name!r} on the transformer; it has {sorted(config)}")
        layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
        was_enabled, was_active = not layers[0].disable_adapters, transformer.active_adapters()
        previous = self._network
        if name is None:
            self._network = None
            transformer.disable_adapters()
        else:
            self._network = self._adapter_networks.get(name)
            if was_active != [name]:
                transformer.set_adapter(name)
            if not was_enabled:
                transformer.enable_adapters()
        _restore_flags(flags)
        try:
            yield
        finally:
            if transformer.active_adapters() != was_active:
                transformer.set_adapter(was_active)
            if was_enabled:
                transformer.enable_adapters()
            else:
                transformer.disable_adapters()
            _restore_flags(flags)
            self._network = previous

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side of the ``(B, C, H, W)`` latents this adapter exposes."""
        return self.pipe.vae_scale_factor

    @classmethod
    @abstractmethod
    def size_limits(cls, transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> SizeLimits:
        """The image sizes a checkpoint with these component configs can produce (read without its weights)."""

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor times patch/packing size)."""
        return self.size_limits(self.transformer.config, self.pipe.vae.config).multiple

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels C of the ``(B, C, H, W)`` latents this adapter exposes."""

    @property
    def has_guidance_embedding(self) -> bool:
        """True for guidance-distilled checkpoints whose transformer embeds the guidance scale."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H', W')`` of the latents for an image of ``height x width`` pixels; checks that the checkpoint can
        produce that size."""
        problem = size_problem(self.size_limits(self.transformer.config, self.pipe.vae.config), height, width)
        if problem:
            raise ValueError(f"{self.family} model: {problem}")
        f = self.spatial_factor
        return self.latent_channels, height // f, width // f

    # ----------------------------------------------------------------------------------------------- prompts
    @abstractmethod
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """Encode ``B`` prompts with the frozen text encoders -> ``Cond`` in the model dtype."""

    def empty_cond(self, batch: int) -> Cond:
        """The unconditional (empty-prompt) conditioning repeated ``batch`` times, as the stock pipelines use."""
        if not hasattr(self, "_empty"):
            self._empty = self.encode_prompt([""])
        return self._empty.index([0] * batch)

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of strings")
        return list(prompts)

    # ----------------------------------------------------------------------------------------------- velocity
    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Cond, guidance: float | None = None) -> Tensor:
        """Predicted velocity ``v = eps - x0`` at ``(x_t, t)``: ``(B, C, H, W)`` float32.

        Args:
            x_t: ``(B, C, H, W)`` latents (any float dtype; cast to the model dtype for the network).
            t: time in [0, 1], a float or ``(B,)``.
            cond: conditioning with batch B.
            guidance: the embedded guidance value of guidance-distilled checkpoints (FLUX.1-dev); None takes
                the family default. Must be None for models without a guidance embedding.
        """
        if x_t.ndim != 4:
            raise ValueError(f"x_t must be (B, C, H, W), got shape {tuple(x_t.shape)}")
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"cond has batch {len(cond)} but x_t has batch {x_t.shape[0]}")
        if x_t.shape[1] != self.latent_channels:
            raise ValueError(
                f"x_t has {x_t.shape[1]} channels, the {self.family} model expects {self.latent_channels}"
            )
        if guidance is not None and not self.has_guidance_embedding:
            raise ValueError(f"this {self.family} checkpoint has no guidance embedding; use CFG (guidance_scale)")
        t = batch_times(t, x_t.shape[0], x_t.device)
        self.nfe += x_t.shape[0]
        if self.autocast is None:
            return self._velocity(x_t, t, cond, guidance).float()
        with torch.autocast(x_t.device.type, dtype=self.autocast):
            v = self._velocity(x_t, t, cond, guidance)
        return v.float()

    @abstractmethod
    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """The family's transformer call on validated inputs; ``t`` is ``(B,)`` float32 in [0, 1]."""

    # ----------------------------------------------------------------------------------------------- speed
    def set_autocast(self, dtype: str | torch.dtype | None) -> None:
        """Run the transformer's forward under ``torch.autocast`` in ``dtype`` (``"bfloat16"``, ``"float16"``), or in
        its own dtype (None / ``"none"``); ``"auto"`` is bf16 where ``native_bf16`` says the device has it and none
        elsewhere. ``velocity`` still returns float32, so step maths and log-probs stay float32; gradients reach the
        (float32) trained weights through autocast's casts. bf16 on a device without native bf16 is logged as a
        warning: it runs, several times slower than float32."""
        if dtype == "auto":
            dtype = torch.bfloat16 if native_bf16(self.device) else None
        self.autocast = None if dtype in (None, "none") else resolve_dtype(dtype)
        if self.autocast == torch.bfloat16 and not native_bf16(self.device):
            log.warning(
                "model.autocast=bfloat16 on a %s without native bf16 (%s): torch emulates it, several times slower "
                "than float32; use model.autocast=auto or none", self.device.type,
                torch.backends.cpu.get_cpu_capability() if self.device.type == "cpu" else "no bf16 support",
            )  # fmt: skip

    def set_attention_backend(self, name: str) -> None:
        """Route the transformer's attention through diffusers' dispatcher backend ``name`` (``native``,
        ``_native_math``, ``flex``, ``flash``, ``sage``, ``xformers``, ...). The name is checked by
        ``config.check_attention_backend`` and against the device here."""
        from diffalign.config import CPU_ATTENTION_BACKENDS, ConfigError, check_attention_backend

        check_attention_backend(name)
        if self.device.type == "cpu" and name not in CPU_ATTENTION_BACKENDS:
            raise ConfigError(f"config key 'model.attention_backend': {name!r} does not run on a CPU; use one of "
                              f"{', '.join(CPU_ATTENTION_BACKENDS)}")  # fmt: skip
        self._use_dispatcher()
        self.transformer.set_attention_backend(name)
        self.attention_backend = name

    def _use_dispatcher(self) -> None:
        """Make every attention processor of the transformer call diffusers' dispatcher (a family whose stock
        processors call SDPA directly replaces them in its override, then calls this check): a processor that
        ignores the backend would be a silent slow path."""
        processors = [getattr(m, "processor", None) for m in self.transformer.modules()]
        stock = {type(p).__name__ for p in processors if p is not None and not hasattr(p, "_attention_backend")}
        if stock:
            raise ValueError(f"the {self.family} transformer's attention processors {sorted(stock)} do not go "
                             f"through diffusers' attention dispatcher: no backend can apply")  # fmt: skip

    def compile(self, cache_dir: str | os.PathLike | None = None) -> None:
        """``torch.compile`` the transformer in place (``nn.Module.compile``: the same module, parameters and
        names, so LoRA adapters, EMA, checkpoints and DDP wrappers work as before; compilation happens at the
        first forward, after any LoRA has been attached).

        Inductor caches compiled graphs and kernels on disk under ``TORCHINDUCTOR_CACHE_DIR``; unless the
        environment sets it to a folder of its own, that is ``cache_dir`` or ``~/.cache/diffalign/inductor``,
        which outlives torch's default under ``/tmp``.
        """
        from diffalign.config import ConfigError, check_compiler

        check_compiler()
        if self.device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                raise ConfigError("config key 'model.compile': torch.compile on CUDA needs triton (pip install "
                                  "triton), or set model.compile=false")  # fmt: skip
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # importing inductor writes its /tmp default into the environment, so that value counts as unset
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
            folder = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffalign", "inductor")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(os.fspath(folder))
        self.transformer.compile()

    # ----------------------------------------------------------------------------------------------- codec
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> latents ``(B, C, H', W')`` float32 (sampled from the VAE
        posterior with ``generator``, or its mode when ``generator`` is None)."""
        check_images(images)
        self.latent_shape(images.shape[2], images.shape[3])
        return self._encode(images, generator).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, H', W')`` -> images ``(B, 3, H, W)`` float32 in [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, H, W), got {tuple(latents.shape)}")
        return ((self._decode(latents).float() + 1) / 2).clamp(0, 1)

    @abstractmethod
    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Images in [0, 1] -> this adapter's latents."""

    @abstractmethod
    def _decode(self, latents: Tensor) -> Tensor:
        """This adapter's latents -> images in [-1, 1] (the VAE's output range)."""

    def _vae_posterior(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        return dist.mode() if generator is None else dist.sample(generator)

    # ----------------------------------------------------------------------------------------------- time grid
    def time_grid(
        self, num_steps: int, height: int, width: int, shift: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> Tensor:  # fmt: skip
        """``(num_steps + 1,)`` float32 times from ~1 down to exactly 0.

        With ``shift=None`` this is the checkpoint's own schedule, computed by its diffusers scheduler exactly
        as the stock pipeline does (SD3: static shift; FLUX.1/FLUX.2: resolution-dependent dynamic shift). A
        float ``shift`` instead applies the static SD3 shift ``s t / (1 + (s - 1) t)`` to the uniform grid
        ``linspace(1, 1/T, T)``. ``sigmas`` (``num_steps`` decreasing values in (0, 1], e.g. a few-step
        student's) replace that uniform grid: the stock pipeline's ``sigmas`` argument, which its scheduler
        shifts as it shifts its own grid.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.latent_shape(height, width)
        if sigmas is not None:
            if len(sigmas) != num_steps:
                raise ValueError(f"{len(sigmas)} sigmas given for {num_steps} steps")
            if shift is not None:
                raise ValueError("give either sigmas or shift, not both")
            scheduler = copy.deepcopy(self.pipe.scheduler)
            self._set_timesteps(scheduler, num_steps, height, width, sigmas=[float(s) for s in sigmas])
            return scheduler.sigmas.detach().float().cpu()
        if shift is not None:
            if shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}")
            u = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
            shifted = (shift * u / (1 + (shift - 1) * u)).float()
            return torch.cat([shifted, torch.zeros(1)])
        scheduler = copy.deepcopy(self.pipe.scheduler)
        self._set_timesteps(scheduler, num_steps, height, width)
        return scheduler.sigmas.detach().float().cpu()

    @abstractmethod
    def _set_timesteps(
        self, scheduler, num_steps: int, height: int, width: int, sigmas: list[float] | None = None
    ) -> None:
        """Call ``scheduler.set_timesteps`` exactly as the stock pipeline does for this image size (given
        ``sigmas``: as it does when called with them)."""

    # ----------------------------------------------------------------------------------------------- LoRA
    def add_lora(
        self,
        rank: int = 32,
        alpha: float = 64.0,
        target_modules: Sequence[str] | None = None,
        adapter_name: str = "default",
        init: str = "gaussian",
        dropout: float = 0.0,
    ) -> LoraConfig:
        """Attach a peft LoRA adapter to the transformer (base weights frozen, LoRA weights trainable)."""
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=init,
            lora_dropout=dropout,
            target_modules=list(target_modules or self.lora_target_modules),
        )
        self.transformer.add_adapter(config, adapter_name=adapter_name)
        self.transformer.set_adapter(adapter_name)
        return config

    def save_lora(
        self, directory: str | os.PathLike, adapter_name: str = "default", state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with the peft config
        as metadata), loadable by ``pipe.load_lora_weights(directory)`` on the stock pipeline. ``state_dict``:
        the transformer's LoRA parameters as whole tensors by parameter name, when the live ones are sharded."""
        if adapter_name not in getattr(self.transformer, "peft_config", {}):
            raise ValueError(f"no LoRA adapter named {adapter_name!r} on the transformer")
        state = get_peft_model_state_dict(self.transformer, state_dict=state_dict, adapter_name=adapter_name)
        metadata = self.transformer.peft_config[adapter_name].to_dict()
        type(self.pipe).save_lora_weights(
            str(directory),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )
        respect_umask(os.path.join(directory, LORA_WEIGHT_NAME_SAFE))

    def save_transformer(self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the transformer as a diffusers model folder (``config.json`` + safetensors shards), loadable by
        its class's ``from_pretrained``. ``state_dict``: its whole state as full tensors, when the live one is
        sharded."""
        directory = os.fspath(directory)
        self.transformer.save_config(directory)
        state = self.transformer.state_dict() if state_dict is None else state_dict
        save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")

    def load_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a LoRA saved in diffusers' format (by ``save_lora`` or any diffusers trainer) and activate it."""
        path = os.fspath(directory)
        if not os.path.exists(path):
            raise FileNotFoundError(f"LoRA path {path!r} does not exist")
        self.pipe.load_lora_weights(path, adapter_name=adapter_name)
        self.transformer.set_adapter(adapter_name)


def size_problem(limits: SizeLimits, height: int, width: int) -> str | None:
    """Why ``height x width`` pixels cannot be produced under ``limits`` (one sentence), or None when it can."""
    if height <= 0 or width <= 0 or height % limits.multiple or width % limits.multiple:
        return (f"height and width must be positive multiples of {limits.multiple} ({limits.why_multiple}), "
                f"got {height}x{width}")  # fmt: skip
    if limits.largest is not None and max(height, width) > limits.largest:
        native = f"; it was built for {limits.native}x{limits.native}" if limits.native else ""
        return (f"{height}x{width} is larger than it can produce: at most {limits.largest} pixels a side "
                f"({limits.why_largest}){native}")  # fmt: skip
    return None


def _restore_flags(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        if p.requires_grad != flag:
            p.requires_grad_(flag)


def check_images(images: Tensor) -> None:
    """Raise a clear error unless ``images`` is a float ``(B, 3, H, W)`` tensor with values in [0, 1]."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("images must be a float tensor (B, 3, H, W) in [0, 1]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")
