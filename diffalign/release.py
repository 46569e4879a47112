"""Turn a training run folder into a diffusers-loadable release with a model card, and push it to the Hub.

``diffalign release RUN_DIR --out DIR`` reads the run folder only through its files:

- ``config.yaml``: the run's resolved config (``algorithm``, ``model.family``, ``model.path``, ``rewards``,
  ``monitors``, ``sampling``, ``eval_prompts``, ...);
- ``final/``: the trained weights, either a LoRA in diffusers' format (``pytorch_lora_weights.safetensors``) or a
  whole transformer (``config.json`` + ``diffusion_pytorch_model*.safetensors``); a few-step student also leaves
  its sampling schedule there, as a ``scheduler_config.json`` (a diffusers scheduler config) and/or a
  ``sigmas.json`` (the list of times it is evaluated at, from 1 = noise toward 0, without the final 0);
- ``eval_before.json`` / ``eval_after.json``, ``grids/before.png`` / ``grids/after.png`` and ``curves.png`` when
  the run wrote them.

What the release folder holds:

- a LoRA run: ``pytorch_lora_weights.safetensors`` (loaded with ``pipe.load_lora_weights(folder)`` on the stock
  pipeline of the base model);
- a LoRA run with ``merge=True``, or a full fine-tuning run: the whole pipeline (``model_index.json`` and one
  folder per component, loaded with ``DiffusionPipeline.from_pretrained(folder)``), the LoRA fused into the
  transformer (``fuse_lora`` then ``unload_lora_weights``) or the trained transformer in place of the base's;
- the student's scheduler as ``scheduler/scheduler_config.json``. With a ``sigmas.json`` the scheduler is set up
  to use the given times as they are (static shift 1, no dynamic shift, no Karras/exponential/beta remapping):
  stock diffusers would otherwise shift custom sigmas once more; ``sigmas.json`` is copied beside it and the
  card's snippet passes ``sigmas=`` to the pipeline;
- ``README.md``, the model card (``huggingface_hub.ModelCard``), with ``images/`` (the evaluation grids and the
  reward curves);
- with ``space=True``, ``space/``: a ready Gradio Space (``app.py``, ``requirements.txt``, ``README.md``).

The folder is built in a temporary folder beside ``out`` and renamed into place, so ``out`` is either absent or
complete. ``push=True`` checks everything the upload needs (a token, the network, the card's metadata) before it
writes anything remote, then calls ``HfApi.create_repo`` and ``HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("diffalign.release")

LORA_FILE = "pytorch_lora_weights.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
SIGMAS_FILE = "sigmas.json"
#: A DMD student's sampling record, beside its LoRA in ``final/`` (written by ``algorithms.dmd``).
STUDENT_FILE = "student.json"
BUILTIN_PREFIX = "builtin:"
PROJECT_LICENSE = "apache-2.0"  # the license of diffalign and of the models it ships (``builtin:``)

#: Licenses of the bases the project has recipes for: hub id -> (license, license_name, license_link).
BASE_LICENSES: dict[str, tuple[str, str | None, str | None]] = {
    **{
        f"stabilityai/stable-diffusion-3.5-{size}": (
            "other", "stabilityai-ai-community",
            f"https://huggingface.co/stabilityai/stable-diffusion-3.5-{size}/blob/main/LICENSE.md",
        )
        for size in ("medium", "large", "large-turbo")
    },
    "black-forest-labs/FLUX.1-dev": (
        "other", "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    ),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
    "black-forest-labs/FLUX.2-klein-4B": ("apache-2.0", None, None),
}  # fmt: skip

#: Sampling-schedule options of diffusers' flow-matching schedulers that would move custom sigmas.
_SCHEDULE_AS_GIVEN = {
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}


class ReleaseError(ValueError):
    """A run folder, an option or the environment that a release cannot go ahead with (reported in one line)."""


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class RunInfo:
    """What a release needs from a run folder (read by :func:`read_run`).

    Attributes:
        run_dir: the run folder; ``final``: its ``final/`` folder.
        config: the parsed ``config.yaml``; ``config_text``: its text, verbatim.
        family, base: ``model.family`` and ``model.path`` (hub id, local folder or ``builtin:NAME``).
        algorithm: the config's ``algorithm`` (registry name).
        kind: ``"lora"`` or ``"full"`` (a whole transformer in ``final/``).
        scheduler_config: the student's scheduler config (``final/scheduler_config.json``), or None.
        sigmas: the student's times (``final/sigmas.json``), or None.
        guidance_scale: the student's own CFG scale (``final/student.json``, a DMD student's 1), in place of
            the run's ``sampling.guidance_scale`` (its teacher's), or None.
        eval_before, eval_after: the held-out evaluation summaries, or None.
        images: release name -> source file, for the images the card shows.
    """

    run_dir: str
    final: str
    config: dict[str, Any]
    config_text: str
    family: str
    base: str
    algorithm: str
    kind: str
    scheduler_config: dict[str, Any] | None = None
    sigmas: list[float] | None = None
    guidance_scale: float | None = None
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    images: dict[str, str] = field(default_factory=dict)

    def section(self, key: str) -> dict[str, Any]:
        value = self.config.get(key)
        return value if isinstance(value, dict) else {}


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReleaseError(f"cannot read {what} {path!r}: {e}") from e


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    """Read and check a run folder: ``config.yaml`` with ``model.family`` and ``model.path``, and trained weights
    in ``final/`` (a diffusers LoRA or a transformer folder). Raises :class:`ReleaseError` naming what is missing."""
    import yaml

    run_dir = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    if not os.path.isdir(run_dir):
        raise ReleaseError(f"run folder {run_dir!r} does not exist")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ReleaseError(f"{run_dir!r} is not a run folder: it has no config.yaml")
    with open(config_path) as f:
        config_text = f.read()
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as e:
        raise ReleaseError(f"cannot parse {config_path!r}: {e}") from e
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not model.get("family") or not model.get("path"):
        raise ReleaseError(f"{config_path!r} names no base model (config keys 'model.family' and 'model.path')")
    final = os.path.join(run_dir, "final")
    if os.path.isfile(os.path.join(final, LORA_FILE)):
        kind = "lora"
        _check_lora_file(os.path.join(final, LORA_FILE))
    elif os.path.isfile(os.path.join(final, "config.json")) and any(
        n.startswith("diffusion_pytorch_model") and n.endswith((".safetensors", ".safetensors.index.json"))
        for n in os.listdir(final)
    ):
        kind = "full"
    else:
        raise ReleaseError(f"{run_dir!r} has no final weights: expected final/{LORA_FILE} (a LoRA run) or "
                           "final/config.json with diffusion_pytorch_model*.safetensors (full fine-tuning); "
                           "a run writes them when its last epoch ends")  # fmt: skip
    info = RunInfo(run_dir=run_dir, final=final, config=config, config_text=config_text, family=str(model["family"]),
                   base=str(model["path"]), algorithm=str(config.get("algorithm", "unknown")), kind=kind)  # fmt: skip
    scheduler_path = os.path.join(final, SCHEDULER_FILE)
    if os.path.isfile(scheduler_path):
        info.scheduler_config = _read_json(scheduler_path, "the scheduler config")
    sigmas_path = os.path.join(final, SIGMAS_FILE)
    if os.path.isfile(sigmas_path):
        info.sigmas = _check_sigmas(_read_json(sigmas_path, "the sigmas"), sigmas_path)
    student_path = os.path.join(final, STUDENT_FILE)
    if os.path.isfile(student_path):
        info.guidance_scale = float(_read_json(student_path, "the student record")["guidance_scale"])
    for tag in ("before", "after"):
        path = os.path.join(run_dir, f"eval_{tag}.json")
        if os.path.isfile(path):
            setattr(info, f"eval_{tag}", _read_json(path, "the evaluation"))
    for name, source in (("after.png", "grids/after.png"), ("before.png", "grids/before.png"),
                         ("curves.png", "curves.png")):  # fmt: skip
        if os.path.isfile(os.path.join(run_dir, source)):
            info.images[name] = os.path.join(run_dir, source)
    return info


def _check_lora_file(path: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
    except (OSError, SafetensorError) as e:
        raise ReleaseError(f"the LoRA {path!r} is not a readable safetensors file: {e}") from e
    if not any("lora" in k for k in keys):
        raise ReleaseError(f"{path!r} holds no LoRA weights (no 'lora' tensor among its {len(keys)} tensors)")


def _check_sigmas(value: Any, path: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int | float) for s in value):
        raise ReleaseError(f"{path!r} must hold a non-empty JSON list of times in (0, 1]")
    sigmas = [float(s) for s in value]
    if not all(0 < s <= 1 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ReleaseError(f"{path!r}: times must decrease within (0, 1] (1 = noise; the final 0 is implied), "
                           f"got {sigmas}")  # fmt: skip
    return sigmas


# ----------------------------------------------------------------------------------------------------- the base
def is_hub_id(path: str) -> bool:
    """Whether ``path`` names a Hub repository (``org/name``) rather than a local folder or a built-in model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith(BUILTIN_PREFIX) or path.startswith((".", "/", "~")) or os.path.exists(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return path.count("/") == 1


def base_folder(base: str) -> str:
    """The base model as something ``DiffusionPipeline.from_pretrained`` loads here: a built-in model's folder, a
    local pipeline folder, or a hub id that is cached (or can be downloaded). Raises :class:`ReleaseError`."""
    if base.startswith(BUILTIN_PREFIX):
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", base[len(BUILTIN_PREFIX) :])
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ReleaseError(f"the base model {base!r} (config key 'model.path') is not a built-in model")
        return folder
    if is_hub_id(base):
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(base, "model_index.json")
        if not isinstance(cached, str) and constants.is_offline_mode():
            raise ReleaseError(f"the base model {base!r} (config key 'model.path') is not in the local Hugging Face "
                               "cache and HF_HUB_OFFLINE is set, so it cannot be downloaded")  # fmt: skip
        return base
    folder = os.path.abspath(os.path.expanduser(base))
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ReleaseError(f"the base model {base!r} (config key 'model.path') cannot be found: no diffusers "
                           f"pipeline folder (model_index.json) at {folder!r}, and it is not a hub id")  # fmt: skip
    return folder


def base_license(base: str) -> tuple[str | None, str | None, str | None]:
    """``(license, license_name, license_link)`` of the base model when known: the project's own for a built-in
    model, a known hub base's, or the one its cached model card states; ``(None, None, None)`` otherwise."""
    if base.startswith(BUILTIN_PREFIX):
        return PROJECT_LICENSE, None, None
    if base in BASE_LICENSES:
        return BASE_LICENSES[base]
    if is_hub_id(base):
        from huggingface_hub import ModelCard, try_to_load_from_cache

        cached = try_to_load_from_cache(base, "README.md")
        if isinstance(cached, str):
            data = ModelCard.load(cached, ignore_metadata_errors=True).data
            link = data.get("license_link")
            if link and not link.startswith("http"):
                link = f"https://huggingface.co/{base}/blob/main/{link}"
            return data.get("license"), data.get("license_name"), link
    return None, None, None


def _scheduler_source_config(base: str) -> dict[str, Any]:
    """The base pipeline's scheduler config (its ``scheduler/scheduler_config.json``)."""
    folder = base_folder(base)
    if is_hub_id(folder):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(folder, "scheduler/scheduler_config.json")
    else:
        path = os.path.join(folder, "scheduler", SCHEDULER_FILE)
    return _read_json(path, "the base model's scheduler config")


def student_scheduler_config(info: RunInfo) -> dict[str, Any] | None:
    """The scheduler config a release ships, or None when the run keeps the base's schedule: the student's own
    config, and with ``sigmas.json`` one that uses the given times as they are (see the module docstring)."""
    if info.scheduler_config is None and info.sigmas is None:
        return None
    config = dict(info.scheduler_config or _scheduler_source_config(info.base))
    if info.sigmas is not None:
        if "FlowMatch" not in str(config.get("_class_name", "")):
            raise ReleaseError(f"{SIGMAS_FILE} needs a flow-matching scheduler, but the scheduler is a "
                               f"{config.get('_class_name')}")  # fmt: skip
        config.update({k: v for k, v in _SCHEDULE_AS_GIVEN.items() if k in config or k == "shift"})
    return config


# ----------------------------------------------------------------------------------------------------- checks
def check_repo_id(repo_id: str) -> None:
    """Raise :class:`ReleaseError` unless ``repo_id`` is a valid Hub model id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ReleaseError(f"--repo-id {repo_id!r} is not a valid Hugging Face repo id: {e}") from e


def hub_token() -> str:
    """The Hub token for an upload (``HF_TOKEN``, or the one ``hf auth login`` saved), checked against the Hub.

    Raises :class:`ReleaseError` saying what is missing (no token, offline mode, no network, a rejected token)
    before anything remote is written."""
    from huggingface_hub import HfApi, constants, get_token

    token = get_token()
    if not token:
        raise ReleaseError("--push needs a Hugging Face token: set HF_TOKEN or run 'hf auth login' "
                           "(nothing was written)")  # fmt: skip
    if constants.is_offline_mode():
        raise ReleaseError("--push needs the network, but HF_HUB_OFFLINE is set (nothing was written)")
    try:
        user = HfApi().whoami(token=token)
    except Exception as e:  # any failure here (no network, DNS, a rejected token) means no upload can be made
        raise ReleaseError(f"--push cannot reach the Hub with this token ({type(e).__name__}: {e}); "
                           "check the network and the token (nothing was written)") from e  # fmt: skip
    log.info("uploading as %s", user.get("name", "?"))
    return token


def check_out(out: str, force: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``force``."""
    if os.path.isfile(out):
        raise ReleaseError(f"--out {out!r} is a file")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ReleaseError(f"--out {out!r} exists and is not empty; choose another folder or pass --force to "
                           "replace it")  # fmt: skip
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ReleaseError(f"--out {out!r}: cannot write in {parent!r}")


# ----------------------------------------------------------------------------------------------------- release
def release(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    merge: bool = False,
    push: bool = False,
    private: bool = False,
    space: bool = False,
    force: bool = False,
) -> str:
    """Write the release of ``run_dir`` to ``out`` (see the module docstring) and optionally push it.

    Args:
        run_dir: the training run folder.
        out: the release folder to create (must not exist, or be empty, unless ``force``).
        repo_id: the Hub repository (``namespace/name``) the card's snippet loads from and ``push`` uploads to;
            without it the snippet loads the local folder.
        base_model: the Hub id of the base model, for the card's ``base_model`` when the run's ``model.path`` is
            a local folder holding a Hub model (a hub id ``model.path`` is used as it is).
        merge: release the whole pipeline with the LoRA fused in, instead of the LoRA alone.
        push: upload to ``repo_id`` (token from ``HF_TOKEN`` or a saved login).
        private: create the Hub repository as private.
        space: also write a Gradio Space into ``out/space``.
        force: replace a non-empty ``out``.

    Returns:
        The release folder's absolute path.
    """
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    info = read_run(run_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    if push and repo_id is None:
        raise ReleaseError("--push needs --repo-id (the Hub repository to create or update)")
    if base_model is not None and not is_hub_id(base_model):
        raise ReleaseError(f"--base-model {base_model!r} is not a Hub model id (namespace/name)")
    if os.path.commonpath([out, info.run_dir]) in (out, info.run_dir):
        raise ReleaseError(f"--out {out!r} must lie outside the run folder {info.run_dir!r}, and not contain it")
    check_out(out, force)
    whole_pipeline = merge or info.kind == "full"
    if whole_pipeline:
        base_folder(info.base)
    scheduler = student_scheduler_config(info)
    token = hub_token() if push else None

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        if whole_pipeline:
            _write_pipeline(info, tmp, scheduler)
        else:
            shutil.copy2(os.path.join(info.final, LORA_FILE), os.path.join(tmp, LORA_FILE))
            if scheduler is not None:
                _write_scheduler(scheduler, os.path.join(tmp, "scheduler"))
        if info.sigmas is not None:
            with open(os.path.join(tmp, SIGMAS_FILE), "w") as f:
                json.dump(info.sigmas, f)
        if info.images:
            os.makedirs(os.path.join(tmp, "images"))
            for name, source in info.images.items():
                shutil.copyfile(source, os.path.join(tmp, "images", name))
        model_ref = repo_id or out
        title = (repo_id or os.path.basename(out)).split("/")[-1]
        card = build_card(info, model_ref=model_ref, merged=whole_pipeline, base_model=base_model,
                          scheduler=scheduler, title=title)  # fmt: skip
        card.save(os.path.join(tmp, "README.md"))
        if space:
            write_space(info, os.path.join(tmp, "space"), model_ref=model_ref, merged=whole_pipeline, title=title)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the release to %s", out)
    if push:
        upload(out, repo_id, token=token, private=private)
    return out


def _publish(tmp: str, out: str) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing an old ``out``), with the umask's folder mode."""
    from diffalign.files import umask

    mode = 0o777 & ~umask()
    for folder, _, _ in os.walk(tmp):
        os.chmod(folder, mode)
    for folder, _, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask())
    old = None
    if os.path.exists(out):
        old = f"{tmp}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def _write_scheduler(config: dict[str, Any], folder: str) -> None:
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ReleaseError(f"the scheduler config names {name!r}, which is not a diffusers scheduler")
    cls.from_config(config).save_pretrained(folder)


def _write_pipeline(info: RunInfo, folder: str, scheduler: dict[str, Any] | None) -> None:
    """Save the whole pipeline: the base with the run's LoRA fused in, or with the run's transformer."""
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    from diffalign.files import respect_umask

    dtype = getattr(torch, str(info.section("model").get("dtype", "float32")), torch.float32)
    base = base_folder(info.base)
    if info.kind == "full":
        name = _read_json(os.path.join(info.final, "config.json"), "the transformer config").get("_class_name")
        cls = getattr(diffusers, str(name), None)
        if cls is None:
            raise ReleaseError(f"final/config.json names {name!r}, which is not a diffusers model class")
        transformer = cls.from_pretrained(info.final, dtype=dtype)
        pipe = DiffusionPipeline.from_pretrained(base, transformer=transformer, dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype)
        pipe.load_lora_weights(info.final)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    respect_umask(folder)


# ----------------------------------------------------------------------------------------------------- the card
def algorithm_reference(name: str) -> tuple[str, list[str]]:
    """The first paragraph of the algorithm's module docstring and the arXiv ids it cites (empty when the
    algorithm is not registered here)."""
    import importlib
    import inspect

    try:
        entry = importlib.import_module("diffalign.algorithms").ALGORITHMS[name]
    except (ImportError, KeyError):
        return "", []
    classes = entry if isinstance(entry, tuple) else (entry,)
    module = inspect.getmodule(classes[-1])
    doc = (module.__doc__ or "") if module is not None else ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph, list(dict.fromkeys(re.findall(r"arXiv[:\s]*(\d{4}\.\d{4,5})", paragraph)))


def example_prompt(info: RunInfo) -> str:
    """A held-out prompt of the run for the card's snippet: the first of ``eval_prompts`` (or ``prompts``)."""
    for key in ("eval_prompts", "prompts"):
        source = str(info.config.get(key) or "")
        if source.startswith("world:"):
            from diffalign.world.prompts import split_prompts

            return split_prompts(source.removeprefix("world:").partition(":")[0])[0].text
        if source and os.path.isfile(source):
            with open(source) as f:
                lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            if lines:
                return lines[0]
    return "a photo of a cat"


def _py(text: str) -> str:
    """A Python string literal in double quotes (the snippet's one quoting style)."""
    return json.dumps(text)


def _call_arguments(info: RunInfo, prompt: str) -> list[str]:
    sampling, model = info.section("sampling"), info.section("model")
    args = [_py(prompt)]
    if info.sigmas is not None:
        args.append(f"sigmas={info.sigmas!r}")
    elif sampling.get("num_steps") is not None:
        args.append(f"num_inference_steps={sampling['num_steps']}")
    if info.guidance_scale is not None:
        sampling = {**sampling, "guidance_scale": info.guidance_scale}
    args += [f"{k}={sampling[k]}" for k in ("guidance_scale", "height", "width") if sampling.get(k) is not None]
    if model.get("max_sequence_length") is not None:
        args.append(f"max_sequence_length={model['max_sequence_length']}")
    args.append("generator=torch.Generator(device).manual_seed(0)")
    return args


def snippet(
    info: RunInfo, model_ref: str, merged: bool, scheduler: dict[str, Any] | None, hub_base: str | None
) -> str:
    """Python that loads the release with stock diffusers and generates one image (``model_ref``: the Hub repo id
    or the local release folder; ``hub_base``: the base's Hub id when known)."""
    dtype = str(info.section("model").get("dtype", "float32"))
    lines = ["import torch", "from diffusers import DiffusionPipeline"]
    if merged:
        load = f"DiffusionPipeline.from_pretrained({_py(model_ref)}, dtype=torch.{dtype})"
    else:
        base = hub_base or info.base
        if base.startswith(BUILTIN_PREFIX):
            lines.append("from diffalign.pipelines import resolve_model_path  # the base model ships with diffalign")
            base_expr = f"resolve_model_path({_py(base)})"
        else:
            base_expr = _py(base if is_hub_id(base) else os.path.abspath(os.path.expanduser(base)))
        load = f"DiffusionPipeline.from_pretrained({base_expr}, dtype=torch.{dtype})"
    if scheduler is not None and not merged:
        lines.insert(1, f"from diffusers import {scheduler['_class_name']}")
    lines += ["", 'device = "cuda" if torch.cuda.is_available() else "cpu"', f"pipe = {load}.to(device)"]
    if not merged:
        lines.append(f"pipe.load_lora_weights({_py(model_ref)})")
        if scheduler is not None:
            lines.append(f"pipe.scheduler = {scheduler['_class_name']}.from_pretrained({_py(model_ref)}, "
                         'subfolder="scheduler")')  # fmt: skip
    call = ",\n    ".join(_call_arguments(info, example_prompt(info)))
    lines += [f"image = pipe(\n    {call},\n).images[0]", 'image.save("sample.png")']
    return "\n".join(lines)


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluation_table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """A markdown table of every numeric key of the evaluations, before -> after (``epoch`` goes in the header)."""
    rows = [k for k in {**(before or {}), **(after or {})} if k != "epoch"]
    rows = [k for k in rows if any(isinstance((d or {}).get(k), int | float) and not isinstance((d or {}).get(k), bool)
                                   for d in (before, after))]  # fmt: skip
    if not rows:
        return ""
    b_epoch, a_epoch = (before or {}).get("epoch", "?"), (after or {}).get("epoch", "?")
    lines = [f"| metric | before (epoch {b_epoch}) | after (epoch {a_epoch}) |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {_number((before or {}).get(k))} | {_number((after or {}).get(k))} |" for k in rows]
    return "\n".join(lines)


def _reward_lines(rewards: Any) -> list[str]:
    lines = []
    for r in rewards if isinstance(rewards, list) else []:
        if not isinstance(r, dict):
            continue
        label = f" (as `{r['label']}`)" if r.get("label") else ""
        args = f", args `{json.dumps(r['args'])}`" if r.get("args") else ""
        lines.append(f"- `{r.get('name')}`{label}: weight {r.get('weight', 1.0)}{args}")
    return lines


def build_card(
    info: RunInfo,
    *,
    model_ref: str,
    merged: bool,
    base_model: str | None,
    scheduler: dict[str, Any] | None,
    title: str,
) -> Any:
    """The release's ``huggingface_hub.ModelCard`` (metadata and markdown, see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = base_model or (info.base if is_hub_id(info.base) else None)
    license_, license_name, license_link = base_license(hub_base or info.base)
    tags = ["diffusers", "text-to-image", "diffalign", info.algorithm.replace("_", "-"), info.family]
    if not merged:
        tags += ["lora", "template:sd-lora"]
    prompt = example_prompt(info)
    extra: dict[str, Any] = {}
    if hub_base:
        extra.update(base_model=hub_base, base_model_relation="finetune" if merged else "adapter")
    if "after.png" in info.images:
        extra["widget"] = [{"text": prompt, "output": {"url": "images/after.png"}}]
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=license_,
                         license_name=license_name, license_link=license_link, tags=tags, model_name=title,
                         **extra)  # fmt: skip

    description, papers = algorithm_reference(info.algorithm)
    papers_text = f" ({', '.join(f'[arXiv:{p}](https://arxiv.org/abs/{p})' for p in papers)})" if papers else ""
    trained = f"trained with **{info.algorithm}**{papers_text} by diffalign on the rewards below"
    base = f"`{hub_base or info.base}`"
    if not merged:
        intro = f"A LoRA for {base}, {trained}."
    elif info.kind == "lora":
        intro = f"The {base} pipeline with a LoRA fused into its transformer, {trained}."
    else:
        intro = f"The {base} pipeline with its whole transformer fine-tuned, {trained}."
    needs = " and diffalign (the base model ships with it)" if not merged and not hub_base and info.base.startswith(
        BUILTIN_PREFIX) else ""  # fmt: skip
    parts = [f"# {title}", "", intro, "", "## Use it", "", f"With diffusers >= 0.42{needs}:", "", "```python",
             snippet(info, model_ref, merged, scheduler, hub_base), "```", ""]  # fmt: skip
    if info.sigmas is not None:
        parts += [f"This is a {len(info.sigmas)}-step model: its scheduler (`scheduler/`) takes the times "
                  f"`{info.sigmas}` as they are (no further shift), passed as `sigmas=` above.", ""]  # fmt: skip
    elif scheduler is not None:
        parts += ["The model comes with its own scheduler config (`scheduler/`), used as above.", ""]
    if info.section("sampling").get("shift") is not None:
        parts += [f"The run's evaluation sampled with a static time shift of {info.section('sampling')['shift']} "
                  "(diffalign's `sampling.shift`); the snippet uses the scheduler's own schedule.", ""]  # fmt: skip

    lora, train, sampling = info.section("lora"), info.section("train"), info.section("sampling")
    parts += ["## Training", ""]
    if description:
        parts += [f"**Algorithm** (`{info.algorithm}`): {description}", ""]
    parts.append(f"- Base model: `{info.base}` (family `{info.family}`)"
                 + (f", the Hub model `{hub_base}`" if hub_base and hub_base != info.base else ""))  # fmt: skip
    if info.kind == "lora":
        parts.append(f"- LoRA rank {lora.get('rank', '?')}, alpha {lora.get('alpha', '?')}"
                     + (", fused into the released transformer" if merged else ""))  # fmt: skip
    else:
        parts.append("- Full fine-tuning of the transformer")
    if train.get("epochs") is not None:
        parts.append(f"- {train['epochs']} epochs on the prompts `{info.config.get('prompts')}`")
    parts += ["", "**Rewards** (optimised):", "", *(_reward_lines(info.config.get("rewards")) or ["- none recorded"])]
    monitors = _reward_lines(info.config.get("monitors"))
    if monitors:
        parts += ["", "**Monitors** (logged on the evaluation images, never optimised):", "", *monitors]
    table = evaluation_table(info.eval_before, info.eval_after)
    if table:
        parts += ["", "## Evaluation", "",
                  f"Held-out prompts `{info.config.get('eval_prompts')}`, "
                  f"{train.get('eval_images_per_prompt', '?')} image(s) per prompt, ODE sampling with "
                  f"{sampling.get('num_steps', '?')} steps, guidance {sampling.get('guidance_scale', '?')}, "
                  f"{sampling.get('height', '?')}x{sampling.get('width', '?')} px, before and after training:",
                  "", table]  # fmt: skip
    for name, caption in (("after.png", "Samples after training (held-out prompts)"),
                          ("before.png", "The same prompts and noise before training"),
                          ("curves.png", "Reward curves")):  # fmt: skip
        if name in info.images:
            parts += ["", f"{caption}:", "", f"![{caption.lower()}](images/{name})"]
    parts += ["", "## Training config", "", "The run's resolved config (`config.yaml`):", "", "```yaml",
              info.config_text.rstrip(), "```", "", "## License", ""]  # fmt: skip
    if license_:
        link = f": {license_link}" if license_link else "."
        parts.append(f"`{license_name or license_}`, the license of the base model{link}")
    else:
        parts.append(f"The license of the base model `{info.base}` applies.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts) + "\n")


# ----------------------------------------------------------------------------------------------------- space
SPACE_APP = '''"""A Gradio Space for {title}: prompt in, images out, with inference-time steering (diffalign)."""

{imports}from diffalign.demo import build_app, serve

{locate}
demo = build_app(
    {model},
    lora={lora},
    family={family},
    reward={reward},
    steps={steps},
    guidance_scale={guidance_scale},
    height={height},
    width={width},
    max_sequence_length={max_sequence_length},
    title={title_literal},
)

if __name__ == "__main__":
    serve(demo)
'''


def _literal(value: Any) -> str:
    return _py(value) if isinstance(value, str) else repr(value)


def write_space(info: RunInfo, folder: str, *, model_ref: str, merged: bool, title: str) -> None:
    """Write a Gradio Space (``app.py``, ``requirements.txt``, ``README.md``) that serves the release with
    ``diffalign.demo``. It loads the release from ``model_ref`` when that is a Hub id, else from the folder above
    ``space/`` (then it runs where the release folder is, e.g. ``python OUT/space/app.py``, not on the Hub)."""
    os.makedirs(folder)
    on_hub = is_hub_id(model_ref)
    if on_hub:
        imports = "from huggingface_hub import snapshot_download\n\n"
        locate = f"release = snapshot_download({_py(model_ref)})"
    else:
        imports = "import os\n\n"
        locate = "release = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the release folder"
        log.info("the Space loads the release from the folder above it; give --repo-id for one that runs on the Hub")
    sampling, model = info.section("sampling"), info.section("model")
    rewards = info.config.get("rewards") or [{}]
    app = SPACE_APP.format(
        title=title, imports=imports, locate=locate, model="release" if merged else _literal(info.base),
        lora="None" if merged else "release", family=_literal(info.family),
        reward=_literal(rewards[0].get("name", "world")), steps=_literal(sampling.get("num_steps")),
        guidance_scale=_literal(sampling.get("guidance_scale")), height=_literal(sampling.get("height")),
        width=_literal(sampling.get("width")), max_sequence_length=_literal(model.get("max_sequence_length")),
        title_literal=_literal(title),
    )  # fmt: skip
    with open(os.path.join(folder, "app.py"), "w") as f:
        f.write(app)
    with open(os.path.join(folder, "requirements.txt"), "w") as f:
        f.write("# diffalign with its demo extra (gradio): pin the version or source this model was released with\n"
                "diffalign[demo]\n")  # fmt: skip
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(title=title[:30], sdk="gradio", app_file="app.py", tags=["diffalign", "text-to-image"],
                         **({"models": [model_ref]} if on_hub else {}))  # fmt: skip
    name = f"[{title}](https://huggingface.co/{model_ref})" if on_hub else f"`{title}`"
    body = (f"A demo of {name}: a prompt in, images out, with inference-time steering (best-of-N, SMC, DTS, DTS*, "
            "Doob) under an NFE budget.\n")  # fmt: skip
    SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(os.path.join(folder, "README.md"))


# ----------------------------------------------------------------------------------------------------- upload
def upload(folder: str, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload the release ``folder`` to it, the card's metadata checked by the
    Hub first; returns the repo URL. ``space/`` is not uploaded to the model repo (it is a Space of its own)."""
    from huggingface_hub import HfApi, ModelCard

    token = token or hub_token()
    card = ModelCard.load(os.path.join(folder, "README.md"))
    try:
        card.validate()
    except Exception as e:  # the Hub rejects the metadata (or cannot be asked): nothing remote is written yet
        raise ReleaseError(f"the Hub does not accept the model card's metadata: {e}") from e
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Release with diffalign",
                      ignore_patterns=["space/*"])  # fmt: skip
    log.info("uploaded %s to %s", folder, url)
    if os.path.isdir(os.path.join(folder, "space")):
        log.info("the Space is in %s; upload it with: hf upload SPACE_ID %s --repo-type space",
                 os.path.join(folder, "space"), os.path.join(folder, "space"))  # fmt: skip
    return str(url)
