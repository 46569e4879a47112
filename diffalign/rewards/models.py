"""Trainable reward models and the rewards that wrap them.

* :class:`PreferenceModel`: an image-text backbone (:class:`ImageTextBackbone`: an ``open_clip.CLIP`` or a
  transformers ``CLIPModel`` of any size, built from a config or initialised from a pretrained folder) plus a
  head on the (image, text) embeddings; trained with a Bradley-Terry loss on pairwise preferences (Bradley &
  Terry 1952; as PickScore / ImageReward / HPS train theirs) or by regression on ratings. Its score is a real
  number whose differences are log-odds of preference.
* :class:`ArtifactModel`: a small CNN classifying artifact-free vs artifact-containing images; the reward is
  ``P(no artifact)`` in [0, 1], meant as a regulariser added to another reward (Hong et al. 2026,
  arXiv 2601.03468, who use a prompted VLM for the same role).
* :class:`MultiAspectModel`: one image-text backbone with ``K`` named heads (e.g. ``alignment``, ``aesthetics``,
  ``artifacts``), each a probability in [0, 1].

All three are saved with ``save_pretrained(folder)``: ``config.json`` (the architecture and preprocessing, plus
``"model_type"``), ``model.safetensors`` and, for text models, ``tokenizer/``; ``load_reward_model(folder)`` or
``<Class>.from_pretrained(folder)`` restores them exactly. Images enter as ``(B, 3, H, W)`` float in [0, 1];
preprocessing is differentiable, so every wrapped reward is.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.files import respect_umask
from diffalign.pipelines.base import check_images, resolve_dtype
from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.hub import CheckpointError, is_hub_id, load_state_dict, load_strict
from diffalign.rewards.preprocess import ImageTransform, resize

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def world_tokenizer(max_length: int = 16) -> Any:
    """A real ``CLIPTokenizer`` whose merges make every world word one token (unknown text falls back to bytes)."""
    from diffalign.pipelines.tokenizers import clip_tokenizer
    from diffalign.world.prompts import world_words

    return clip_tokenizer(world_words(), max_length=max_length)


def open_clip_config_dict(
    image_size: int = 64,
    vision: str = "resnet",
    vision_width: int = 16,
    vision_layers: int = 1,
    patch_size: int = 8,
    text_width: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    embed_dim: int = 64,
    max_length: int = 16,
) -> dict[str, Any]:
    """An open_clip model config (as in open_clip's JSON files) for a small CLIP trained from scratch.

    ``vision="resnet"`` gives open_clip's ModifiedResNet (CLIP's RN towers: conv stem, 4 bottleneck stages of
    ``vision_layers`` blocks, attention pooling), which learns far faster from scratch on small data than a ViT;
    ``vision="vit"`` a ViT with ``patch_size`` patches.
    """
    if vision == "resnet":
        vision_cfg = {"image_size": image_size, "layers": [vision_layers] * 4, "width": vision_width,
                      "head_width": 32}  # fmt: skip
    elif vision == "vit":
        vision_cfg = {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                      "head_width": vision_width // heads, "patch_size": patch_size}  # fmt: skip
    else:
        raise ValueError(f"vision must be 'resnet' or 'vit', got {vision!r}")
    text_cfg = {"context_length": max_length, "vocab_size": 49408, "width": text_width, "heads": heads,
                "layers": text_layers}  # fmt: skip
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def clip_config_dict(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 64,
    vision_layers: int = 3,
    text_width: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    embed_dim: int = 64,
    max_length: int = 16,
) -> dict[str, Any]:
    """A ``CLIPConfig`` (as a dict) for a small CLIP trained from scratch; ids follow :func:`world_tokenizer`
    (0 = start, 1 = end/padding)."""
    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=max_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)  # fmt: skip
    return {"text_config": text, "vision_config": vision, "projection_dim": embed_dim}


def _mlp(d_in: int, hidden: int, d_out: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out))  # fmt: skip


# -------------------------------------------------------------------------------------------- save / load
class RewardModel(nn.Module, metaclass=ABCMeta):
    """Base of the trainable reward models: ``config()`` (JSON-able constructor kwargs) + safetensors weights."""

    model_type: ClassVar[str] = "reward_model"
    tokenizer: Any = None

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this architecture."""

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` and (if any) ``tokenizer/`` as the folder ``directory``.

        The folder is written beside it under a temporary name and then renamed into place (replacing an older
        saved model; a folder holding other files is refused), so an interrupted save never leaves a half-written
        model where a complete one is expected."""
        from safetensors.torch import save_file

        directory = os.path.abspath(os.fspath(directory)).rstrip(os.sep)
        if (
            os.path.isdir(directory)
            and os.listdir(directory)
            and not os.path.isfile(os.path.join(directory, CONFIG_NAME))
        ):
            raise FileExistsError(f"{directory!r} holds other files and no saved model ({CONFIG_NAME}); "
                                  "save into an empty or new folder")  # fmt: skip
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = os.path.join(os.path.dirname(directory), f".tmp-{os.path.basename(directory)}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        cfg = {"model_type": self.model_type, "format_version": FORMAT_VERSION, **self.config()}
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=1)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        respect_umask(tmp)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> RewardModel:
        """Load a folder written by :meth:`save_pretrained` (or a Hub repo holding one)."""
        directory = resolve_model_dir(os.fspath(source), cls.model_type)
        cfg = read_model_config(directory)
        if cls is not RewardModel and cfg["model_type"] != cls.model_type:
            raise CheckpointError(f"{directory!r} holds a {cfg['model_type']!r} model, not a {cls.model_type!r}")
        model_cls = MODEL_TYPES[cfg["model_type"]]
        kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "format_version")}
        tok_dir = os.path.join(directory, TOKENIZER_DIR)
        if os.path.isdir(tok_dir):
            from transformers import AutoTokenizer

            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(tok_dir)
        try:
            model = model_cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/{CONFIG_NAME}: invalid model config: {e}") from e
        path = os.path.join(directory, WEIGHTS_NAME)
        load_strict(model, load_state_dict(path, model.model_type), model.model_type, path)
        return model.eval()


def resolve_model_dir(source: str, what: str) -> str:
    """A local model folder, ``builtin:NAME`` (shipped in ``diffalign/assets``), or the snapshot of a Hub repo
    (clear error offline)."""
    from diffalign.pipelines import resolve_model_path

    source = resolve_model_path(os.path.expanduser(source))
    if os.path.isdir(source):
        return source
    if is_hub_id(source):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source)
        except Exception as e:
            raise FileNotFoundError(f"{what}: cannot get Hub repo {source!r}: {str(e).splitlines()[0]}") from e
    raise FileNotFoundError(f"{what}: model folder {source!r} does not exist")


def read_model_config(directory: str) -> dict[str, Any]:
    """``config.json`` of a saved reward model, validated."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a saved reward model (no {CONFIG_NAME})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") not in MODEL_TYPES:
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{path}: unknown model_type {kind!r}; expected one of {sorted(MODEL_TYPES)}")
    if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {cfg['format_version']} is newer than this diffalign")
    return cfg


def load_reward_model(source: str | os.PathLike) -> RewardModel:
    """Any saved reward model (dispatch on ``config.json``'s ``model_type``)."""
    return RewardModel.from_pretrained(source)


# ------------------------------------------------------------------------------------------- the backbones
class ImageTextBackbone(nn.Module, metaclass=ABCMeta):
    """A dual image/text encoder: ``embed(images, prompts)`` -> unit-norm ``(B, D)`` image and text embeddings.

    Two implementations, chosen by ``config["type"]``: ``transformers`` (a ``CLIPModel`` of any size, built from a
    ``CLIPConfig`` dict, with a transformers tokenizer saved beside it) and ``open_clip`` (an ``open_clip.CLIP`` built
    from a model config dict: ViT or ModifiedResNet image tower; open_clip's BPE tokenizer, bundled, no files).
    """

    embed_dim: int

    @staticmethod
    def build(config: dict[str, Any], tokenizer: Any = None) -> ImageTextBackbone:
        """The backbone described by ``config`` (``{"type": "transformers" | "open_clip", ...}``)."""
        kind = config.get("type")
        kwargs = {k: v for k, v in config.items() if k != "type"}
        if kind == "transformers":
            return HFCLIPBackbone(tokenizer=tokenizer, **kwargs)
        if kind == "open_clip":
            return OpenCLIPBackbone(**kwargs)
        raise ValueError(f"unknown backbone type {kind!r}; expected 'transformers' or 'open_clip'")

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able description (``build`` inverts it)."""

    @property
    @abstractmethod
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learned log temperature (scalar parameter)."""

    @abstractmethod
    def encode(self, pixels: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Preprocessed pixels and prompts -> unnormalised image and text embeddings."""

    def embed(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Images ``(B, 3, H, W)`` in [0, 1] + ``B`` prompts -> unit-norm float32 ``(B, D)`` image and text
        embeddings (differentiable in the images)."""
        pixels = self.transform(images.to(self.logit_scale.device).float())
        img, txt = self.encode(pixels, prompts)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def _transform(transform: dict[str, Any]) -> ImageTransform:
    return ImageTransform(**{k: tuple(v) if isinstance(v, list) else v for k, v in transform.items()})


class HFCLIPBackbone(ImageTextBackbone):
    """transformers ``CLIPModel`` built from ``clip_config`` (a ``CLIPConfig`` dict) + its tokenizer."""

    def __init__(self, clip_config: dict[str, Any], transform: dict[str, Any], tokenizer: Any, max_length: int):
        from transformers import CLIPConfig, CLIPModel

        super().__init__()
        if tokenizer is None:
            raise ValueError("a transformers CLIP backbone needs a tokenizer")
        self.clip = CLIPModel(CLIPConfig.from_dict(dict(clip_config)))
        self.transform = _transform(transform)
        self._transform_cfg = dict(transform)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.embed_dim = self.clip.config.projection_dim

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def config(self) -> dict[str, Any]:
        return {"type": "transformers", "clip_config": self.clip.config.to_dict(), "transform": self._transform_cfg,
                "max_length": self.max_length}  # fmt: skip

    def encode(self, pixels: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        clip = self.clip
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(pixels.device)  # fmt: skip
        img = clip.visual_projection(clip.vision_model(pixel_values=pixels.to(clip.dtype)).pooler_output)
        txt = clip.text_projection(clip.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                                   .pooler_output)  # fmt: skip
        return img, txt


class OpenCLIPBackbone(ImageTextBackbone):
    """``open_clip.CLIP(**model_config)`` (``embed_dim``, ``vision_cfg``, ``text_cfg`` as in open_clip's JSON
    configs; ``vision_cfg.layers`` a list of 4 ints gives the ModifiedResNet tower) + open_clip's tokenizer."""

    def __init__(self, model_config: dict[str, Any], transform: dict[str, Any]) -> None:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        super().__init__()
        cfg = dict(model_config)
        self.model = open_clip.CLIP(**cfg)
        self._model_config = cfg
        self.transform = _transform(transform)
        self._transform_cfg = dict(transform)
        context = int(cfg.get("text_cfg", {}).get("context_length", 77))
        self.tokenizer_fn = SimpleTokenizer(context_length=context)
        self.embed_dim = int(cfg["embed_dim"])

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def config(self) -> dict[str, Any]:
        return {"type": "open_clip", "model_config": self._model_config, "transform": self._transform_cfg}

    def encode(self, pixels: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        dtype = self.logit_scale.dtype
        img = self.model.encode_image(pixels.to(dtype))
        txt = self.model.encode_text(self.tokenizer_fn(list(prompts)).to(pixels.device))
        return img, txt


def _fused(img: Tensor, txt: Tensor) -> Tensor:
    """``[i, t, i * t]``: ``(B, 3D)``."""
    return torch.cat([img, txt, img * txt], dim=-1)


def _apply_head(head: nn.Module, features: Tensor) -> Tensor:
    """A head on float32 features, in the head's own dtype; ``(B, F)`` -> ``(B,)`` float32."""
    return head(features.to(next(head.parameters()).dtype)).squeeze(-1).float()


# ----------------------------------------------------------------------------------------- preference model
class PreferenceModel(RewardModel):
    """Image-text preference model: ``s(x, c)`` from an image-text backbone and a head.

    Heads: ``mlp`` (an MLP on ``[i, t, i * t]`` of the unit-norm embeddings) or ``cosine``
    (``logit_scale.exp() * cos(i, t)``, PickScore's form).

    Args:
        backbone: :class:`ImageTextBackbone` config (``{"type": "open_clip" | "transformers", ...}``).
        tokenizer: a transformers tokenizer for a ``transformers`` backbone (saved in ``tokenizer/``).
        head: ``mlp`` or ``cosine``.
        head_hidden: hidden width of the MLP head.
    """

    model_type = "preference"

    def __init__(self, backbone: dict[str, Any], tokenizer: Any = None, head: str = "mlp", head_hidden: int = 128):
        super().__init__()
        if head not in ("mlp", "cosine"):
            raise ValueError(f"head must be 'mlp' or 'cosine', got {head!r}")
        self.backbone = ImageTextBackbone.build(backbone, tokenizer)
        self.tokenizer = tokenizer
        self.head_type = head
        self.head_hidden = int(head_hidden)
        self.head = _mlp(3 * self.backbone.embed_dim, head_hidden) if head == "mlp" else None

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.config(), "head": self.head_type, "head_hidden": self.head_hidden}

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] and ``B`` prompts -> preference scores ``(B,)`` float32."""
        img, txt = self.backbone.embed(images, prompts)
        if self.head is None:
            return self.backbone.logit_scale.exp().float() * (img * txt).sum(-1)
        return _apply_head(self.head, _fused(img, txt))


# ------------------------------------------------------------------------------------------- artifact model
class ArtifactModel(RewardModel):
    """A small CNN that detects artifacts: ``forward`` gives the logit of "this image has an artifact".

    Architecture: a full-resolution 3x3 conv (high-frequency patterns survive), then stride-2 stages of
    ``conv3x3(s=2) -> GroupNorm -> GELU -> conv3x3 -> GELU``, then global average and max pooling and a linear
    layer. Images are resized (bilinear, antialiased) to ``image_size`` and mapped to [-1, 1].

    Args:
        channels: widths of the stages (the first is the full-resolution conv).
        image_size: input side in pixels.
    """

    model_type = "artifact"

    def __init__(self, channels: Sequence[int] = (16, 32, 64), image_size: int = 64) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        self.channels, self.image_size = channels, int(image_size)
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.GELU()]
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU()]  # fmt: skip
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * channels[-1], 1)

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "image_size": self.image_size}

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> artifact logits ``(B,)`` float32."""
        weight = self.classifier.weight
        x = images.to(weight.device).float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = resize(x, (self.image_size, self.image_size), "bilinear", antialias=True)
        h = self.features((2 * x - 1).to(weight.dtype))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.classifier(pooled).squeeze(-1).float()

    def p_clean(self, images: Tensor) -> Tensor:
        """``P(no artifact)`` ``(B,)`` in [0, 1]."""
        return torch.sigmoid(-self.forward(images))


# ------------------------------------------------------------------------------------------ multi-aspect model
class MultiAspectModel(RewardModel):
    """One image-text backbone, ``K`` named heads; every aspect is a probability in [0, 1] (higher is better).

    Args:
        backbone, tokenizer: the backbone (as :class:`PreferenceModel`).
        aspects: head names, e.g. ``["alignment", "aesthetics", "artifacts"]``.
        head_hidden: hidden width of each head's MLP (on ``[i, t, i * t]``).
    """

    model_type = "multi_aspect"

    def __init__(
        self,
        backbone: dict[str, Any],
        tokenizer: Any = None,
        aspects: Sequence[str] = ("alignment", "aesthetics", "artifacts"),
        head_hidden: int = 128,
    ) -> None:
        super().__init__()
        aspects = [str(a) for a in aspects]
        if not aspects or len(set(aspects)) != len(aspects):
            raise ValueError(f"aspects must be non-empty and unique, got {aspects}")
        self.backbone = ImageTextBackbone.build(backbone, tokenizer)
        self.tokenizer = tokenizer
        self.aspects = aspects
        self.head_hidden = int(head_hidden)
        self.heads = nn.ModuleDict({a: _mlp(3 * self.backbone.embed_dim, head_hidden) for a in aspects})

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.config(), "aspects": self.aspects, "head_hidden": self.head_hidden}

    def forward(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Images ``(B, 3, H, W)`` in [0, 1] and ``B`` prompts -> aspect name -> logits ``(B,)`` float32."""
        fused = _fused(*self.backbone.embed(images, prompts))
        return {a: _apply_head(head, fused) for a, head in self.heads.items()}

    def probabilities(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Aspect name -> ``(B,)`` in [0, 1]."""
        return {a: torch.sigmoid(v) for a, v in self.forward(images, prompts).items()}


MODEL_TYPES: dict[str, type[RewardModel]] = {
    "preference": PreferenceModel,
    "artifact": ArtifactModel,
    "multi_aspect": MultiAspectModel,
}


# ------------------------------------------------------------------------------------------------- rewards
def _load_frozen(path: str, expected: type[RewardModel], dtype: str) -> RewardModel:
    model = expected.from_pretrained(path)
    model.requires_grad_(False)
    return model.to(resolve_dtype(dtype)).eval()


class PreferenceModelReward(Reward):
    """A trained :class:`PreferenceModel` as a reward: the raw Bradley-Terry score (unbounded; a difference of
    1 between two images means preference odds of e:1), or the regression output for a model trained on ratings.

    Args:
        path: folder written by ``save_pretrained`` (or a Hub repo holding one).
        dtype: network dtype.
    """

    name = "preference_model"
    differentiable = True

    def __init__(self, path: str, dtype: str = "float32") -> None:
        self.model = _load_frozen(path, PreferenceModel, dtype)

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        return self.model(images, prompts)


class ArtifactReward(Reward):
    """``P(no artifact)`` in [0, 1] from a trained :class:`ArtifactModel` (prompts are ignored): a regulariser
    against reward hacking, to be added to another reward (Hong et al. 2026, arXiv 2601.03468).

    Args:
        path: folder written by ``save_pretrained`` (or a Hub repo holding one); the default
            ``builtin:world-artifact`` is the small CNN shipped for the embedded world
            (``configs/rewards/train_artifact_world.yaml``; held-out accuracy in its ``metrics.json``).
        dtype: network dtype.
    """

    name = "artifact"
    differentiable = True

    def __init__(self, path: str = "builtin:world-artifact", dtype: str = "float32") -> None:
        self.model = _load_frozen(path, ArtifactModel, dtype)

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        return self.model.p_clean(images)


class MultiAspectReward(Reward):
    """One aspect of a trained :class:`MultiAspectModel` (a probability in [0, 1]); :meth:`all_aspects` returns
    every aspect from one forward pass.

    Args:
        path: folder written by ``save_pretrained`` (or a Hub repo holding one).
        aspect: the aspect :meth:`score` returns (default: the model's first).
        dtype: network dtype.
    """

    name = "multi_aspect"
    differentiable = True

    def __init__(self, path: str, aspect: str | None = None, dtype: str = "float32") -> None:
        self.model = _load_frozen(path, MultiAspectModel, dtype)
        self.aspect = aspect or self.model.aspects[0]
        if self.aspect not in self.model.aspects:
            raise ValueError(f"multi_aspect: unknown aspect {self.aspect!r}; the model has {self.model.aspects}")

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        return torch.sigmoid(self.model(images, prompts)[self.aspect])

    def all_aspects(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Every aspect: name -> ``(B,)`` float32 in [0, 1] on ``images.device`` (inputs validated as in
        ``__call__``; differentiable when ``images`` requires grad)."""
        check_images(images)
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: need one prompt per image ({images.shape[0]} images)")
        ctx = torch.enable_grad() if images.requires_grad else torch.no_grad()
        with ctx:
            out = {a: v.to(images.device) for a, v in self.model.probabilities(images, list(prompts)).items()}
        for aspect, value in out.items():
            if not torch.isfinite(value.detach()).all():
                raise RewardError(f"reward {self.name!r} aspect {aspect!r} returned non-finite values")
        return out
