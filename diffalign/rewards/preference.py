"""Pretrained preference rewards: PickScore, HPSv2/v2.1, ImageReward, the LAION aesthetic predictor, CLIP score.

Each reward loads the **upstream checkpoint format** (from a local path, or a Hugging Face Hub repo the way the
upstream project resolves it), re-implements the upstream eval preprocessing as differentiable torch ops
(:mod:`diffalign.rewards.preprocess`), and scores batches ``(B, 3, H, W)`` in [0, 1] with B prompts to ``(B,)``
float32. All of them are differentiable: gradients reach the input images (the reward networks are frozen).
Network sizes come from the checkpoint or its config, so the tests run the same code on tiny random models.

Upstream references (facts collected in ``reference/anchors_steering_rewards.md`` section 5):

* PickScore: Kirstain et al. 2023, "Pick-a-Pic" (arXiv 2305.01569); ``yuvalkirstain/PickScore``.
* HPSv2: Wu et al. 2023, "Human Preference Score v2" (arXiv 2306.09341); ``tgxs002/HPSv2``.
* ImageReward: Xu et al. 2023, "ImageReward" (arXiv 2304.05977); ``THUDM/ImageReward``.
* LAION aesthetic predictor v2: ``christophschuhmann/improved-aesthetic-predictor``.
* CLIP score: Hessel et al. 2021, "CLIPScore" (arXiv 2104.08718).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.pipelines.base import resolve_dtype
from diffalign.rewards.base import Reward
from diffalign.rewards.hub import (
    CheckpointError,
    from_pretrained,
    load_state_dict,
    load_strict,
    resolve_file,
    strip_prefix,
)
from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

log = logging.getLogger("diffalign.rewards")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------- shared pieces
class LinearStackMLP(nn.Module):
    """The MLP head shared by the LAION aesthetic predictor and ImageReward: ``d -> 1024 -> 128 -> 64 -> 16 -> 1``.

    ``relu=False`` is the ``linearMSE`` layout (no nonlinearities; dropout 0.2/0.2/0.1), state-dict keys
    ``layers.{0,2,4,6,7}.{weight,bias}``; ``relu=True`` is the ``reluMSE`` variant of the aesthetic predictor with
    a ReLU after each of the first four linears, keys ``layers.{0,3,6,9,11}``.
    """

    def __init__(self, input_size: int, relu: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        widths = [input_size, 1024, 128, 64, 16]
        drops = [0.2, 0.2, 0.1, None]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if relu:
                layers.append(nn.ReLU())
            if drops[i] is not None:
                layers.append(nn.Dropout(drops[i]))
        layers.append(nn.Linear(16, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, d)`` -> ``(B, 1)``."""
        return self.layers(x)

    @staticmethod
    def from_state_dict(state: dict[str, Tensor], what: str, path: str) -> LinearStackMLP:
        """Build the layout that matches the keys of ``state`` and load it."""
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.weight$", k))})
        if indices == [0, 2, 4, 6, 7]:
            relu = False
        elif indices == [0, 3, 6, 9, 11]:
            relu = True
        else:
            raise CheckpointError(
                f"{what}: {path!r} is not an aesthetic-predictor MLP state dict (expected keys layers.0.weight, "
                f"layers.2.weight, ... layers.7.weight; found linear layers {indices})"
            )
        mlp = LinearStackMLP(int(state["layers.0.weight"].shape[1]), relu=relu)
        load_strict(mlp, {k: v.float() for k, v in state.items()}, what, path)
        return mlp


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: cannot read JSON {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path!r} must hold a JSON object")
    return data


def processor_transform(source: str, what: str) -> ImageTransform:
    """The eval transform described by a transformers ``preprocessor_config.json`` (``CLIPImageProcessor``; or the
    ``image_processor`` entry of a ``processor_config.json`` as transformers 5 writes it): shortest side ->
    ``size``, bicubic (``resample: 3``), floor-rounded center crop, ``image_mean``/``image_std``."""
    try:
        cfg = _read_json(resolve_file(source, "preprocessor_config.json", what), what)
    except FileNotFoundError:  # transformers >= 5 saves a processor as processor_config.json["image_processor"]
        cfg = _read_json(resolve_file(source, "processor_config.json", what), what).get("image_processor", {})
    size = cfg.get("size", 224)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", size)
    crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    resample = {2: "bilinear", 3: "bicubic"}.get(int(cfg.get("resample", 3)))
    if resample is None or not cfg.get("do_resize", True) or not cfg.get("do_center_crop", True):
        raise CheckpointError(f"{what}: unsupported image processor settings in {source!r} (need resize + crop)")
    return ImageTransform(
        size=int(size), crop=int(crop), mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)), interpolation=resample, crop_rounding="floor",
    )  # fmt: skip


class _HFCLIP(nn.Module):
    """A transformers ``CLIPModel`` behind two calls returning projected, L2-normalised features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, S, S)`` normalised pixels -> ``(B, D)`` unit-norm float32 image embeddings."""
        m = self.model
        pooled = m.vision_model(pixel_values=pixel_values.to(m.dtype)).pooler_output
        return nn.functional.normalize(m.visual_projection(pooled).float(), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, D)`` unit-norm float32 text embeddings."""
        m = self.model
        pooled = m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return nn.functional.normalize(m.text_projection(pooled).float(), dim=-1)


def load_hf_clip(model: str, processor: str | None, dtype: str, what: str) -> tuple[_HFCLIP, Any, ImageTransform]:
    """A frozen transformers ``CLIPModel``, its tokenizer and its eval image transform (from ``processor``, default
    the model's own folder/repo)."""
    from transformers import AutoTokenizer, CLIPModel

    processor = processor or model
    clip = from_pretrained(CLIPModel.from_pretrained, model, what, dtype=resolve_dtype(dtype))
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, processor, what)
    return _freeze(_HFCLIP(clip)), tokenizer, processor_transform(processor, what)


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device, padding: str) -> Any:
    return tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt").to(device)


# ---------------------------------------------------------------------------------------------------- PickScore
class PickScoreReward(Reward):
    """PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

    ``score = logit_scale.exp() * cos(text_emb, image_emb)`` as in the upstream README, with ``logit_scale.exp()``
    about 100, so real scores lie around 18-24 (SD3.5-M: ~22.3-22.8). ``scale`` multiplies the result
    (Flow-GRPO / DiffusionNFT use ``scale=1/26``).

    Args:
        model: transformers ``CLIPModel`` folder or Hub id (upstream ``yuvalkirstain/PickScore_v1``).
        processor: folder or Hub id of the processor (tokenizer + ``preprocessor_config.json``), upstream
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        dtype: network dtype (``float32``, ``bfloat16``, ``float16``); the score is computed in float32.
        scale: multiplier of the output.
        max_length: prompt token limit (CLIP: 77; longer prompts are truncated as upstream).

    Preprocessing (``CLIPImageProcessor``): shortest side -> 224 bicubic antialiased, center crop 224 (floor
    offsets), OpenAI mean/std; prompts padded and truncated to 77 tokens.
    """

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: str = "float32",
        scale: float = 1.0,
        max_length: int = 77,
    ) -> None:
        self.clip, self.tokenizer, self.transform = load_hf_clip(model, processor, dtype, self.name)
        self.scale = float(scale)
        self.max_length = max_length

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        device = _device(self.clip)
        img = self.clip.image_features(self.transform(images.to(device)))
        tok = _tokenize(self.tokenizer, prompts, self.max_length, device, "longest")
        txt = self.clip.text_features(tok["input_ids"], tok["attention_mask"])
        logit_scale = self.clip.model.logit_scale.exp().float()
        return self.scale * logit_scale * (img * txt).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------- CLIP score
class CLIPScoreReward(Reward):
    """CLIP score: cosine similarity of CLIP image and prompt embeddings (Hessel et al. 2021).

    Three conventions exist upstream; ``mode`` picks one:

    * ``cosine`` (default): ``cos`` in [-1, 1], typically 0.2-0.35 (DiffusionNFT's ``logits_per_image / 100``,
      FK steering, ImageReward's ``CLIPScore``);
    * ``torchmetrics``: ``max(100 * cos, 0)`` (torchmetrics ``CLIPScore``);
    * ``logit``: ``logit_scale.exp() * cos`` (the raw CLIP logit).

    Args:
        model: transformers ``CLIPModel`` folder or Hub id (default ``openai/clip-vit-large-patch14``).
        processor: tokenizer + image processor source (default: ``model``).
        dtype: network dtype.
        mode: output convention (above).
        max_length: prompt token limit (77).

    Preprocessing: the ``CLIPImageProcessor`` recipe (shortest side -> 224 bicubic, floor center crop, OpenAI
    mean/std).
    """

    name = "clipscore"
    differentiable = True

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        dtype: str = "float32",
        mode: Literal["cosine", "torchmetrics", "logit"] = "cosine",
        max_length: int = 77,
    ) -> None:
        if mode not in ("cosine", "torchmetrics", "logit"):
            raise ValueError(f"clipscore: mode must be 'cosine', 'torchmetrics' or 'logit', got {mode!r}")
        self.clip, self.tokenizer, self.transform = load_hf_clip(model, processor, dtype, self.name)
        self.mode = mode
        self.max_length = max_length

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        device = _device(self.clip)
        img = self.clip.image_features(self.transform(images.to(device)))
        tok = _tokenize(self.tokenizer, prompts, self.max_length, device, "longest")
        cos = (img * self.clip.text_features(tok["input_ids"], tok["attention_mask"])).sum(dim=-1)
        if self.mode == "torchmetrics":
            return (100.0 * cos).clamp_min(0.0)
        if self.mode == "logit":
            return self.clip.model.logit_scale.exp().float() * cos
        return cos


# ------------------------------------------------------------------------------------------------------- HPSv2
#: HPS version -> file in the Hub repo ``xswu/HPSv2`` (``hpsv2/utils.py:hps_version_map``).
HPS_FILES: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def open_clip_model_name(model: str) -> str:
    """An open_clip architecture name; a path to a JSON config (``embed_dim``, ``vision_cfg``, ``text_cfg``) is
    registered with ``open_clip.add_model_config`` under its file stem first (how tests use tiny sizes)."""
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"open_clip model config {model!r} does not exist")
        open_clip.add_model_config(model)
        model = os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r} (see open_clip.list_models(), or a JSON config path)")
    return model


class HPSv2Reward(Reward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

    ``score = cos(image_features, text_features)`` of the normalised embeddings, **without** the logit scale, as
    ``hpsv2.score``; real scores lie around 0.25-0.36 (papers report x100). v2.0 and v2.1 scores are not
    comparable.

    Args:
        version: ``v2.1`` (default) or ``v2.0``; picks the Hub file when ``checkpoint`` is a repo or folder.
        checkpoint: Hub repo (``xswu/HPSv2``), a folder holding the ``HPS_v2*.pt`` file, or the file itself: a
            ``torch.save`` dict whose ``"state_dict"`` is an open_clip CLIP state dict (as ``hpsv2`` loads it).
        model: open_clip architecture (``ViT-H-14``) or a JSON config path (tiny test models).
        dtype: network dtype (upstream runs under CUDA ``amp``; float32 here unless asked).

    Preprocessing (``open_clip.image_transform(224, is_train=False)``): shortest side -> 224 bicubic antialiased,
    center crop 224 (torchvision rounding), OpenAI mean/std; open_clip's tokenizer (77 tokens, truncated).
    """

    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        version: Literal["v2.0", "v2.1"] = "v2.1",
        checkpoint: str = "xswu/HPSv2",
        model: str = "ViT-H-14",
        dtype: str = "float32",
    ) -> None:
        import open_clip

        if version not in HPS_FILES:
            raise ValueError(f"hpsv2: version must be one of {sorted(HPS_FILES)}, got {version!r}")
        path = resolve_file(checkpoint, HPS_FILES[version], self.name)
        name = open_clip_model_name(model)
        raw = load_state_dict(path, self.name)
        state = raw.get("state_dict", raw)
        if not isinstance(state, dict):
            raise CheckpointError(f"hpsv2: {path!r}['state_dict'] is not a state dict")
        state = strip_prefix(state, "module.")
        clip = open_clip.create_model(name, pretrained=None)
        load_strict(clip, state, self.name, path)
        self.model = _freeze(clip.to(resolve_dtype(dtype)))
        self.tokenizer = open_clip.get_tokenizer(name)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.transform = ImageTransform(size=size, crop=size, crop_rounding="round")
        self.version = version

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        device = _device(self.model)
        dtype = next(self.model.parameters()).dtype
        img = self.model.encode_image(self.transform(images.to(device)).to(dtype), normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True).float()
        return (img * txt).sum(dim=-1)


# ------------------------------------------------------------------------------------------------- ImageReward
#: ImageReward v1.0's output normalisation (``ImageReward/ImageReward.py``).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

_VIT = "blip.visual_encoder."
_TXT = "blip.text_encoder."
#: Keys of ``ImageReward.pt`` that the score does not use (BLIP's ITC projections, position-id buffers).
_IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _vit_key_to_hf(key: str) -> str:
    """BLIP/timm ViT key (without ``blip.visual_encoder.``) -> transformers ``BlipVisionModel`` key."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}  # fmt: skip
    if key in fixed:
        return fixed[key]
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if m is None:
        raise KeyError(key)
    rest = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
            "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    module, _, param = m.group(2).rpartition(".")
    if module not in rest:
        raise KeyError(key)
    return f"encoder.layers.{m.group(1)}.{rest[module]}.{param}"


def _vit_key_from_hf(key: str) -> str:
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}  # fmt: skip
    if key in fixed:
        return fixed[key]
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m is None:
        raise KeyError(key)
    rest = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
            "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    return f"blocks.{m.group(1)}.{rest[m.group(2)]}.{m.group(3)}"


class ImageRewardModel(nn.Module):
    """ImageReward v1.0 on transformers' BLIP classes.

    ``visual`` is a ``BlipVisionModel`` (BLIP's timm-style ViT: pre-norm blocks with fused ``qkv``, final LayerNorm
    eps 1e-6, exact GELU), ``text`` a ``BlipTextModel`` built with ``is_decoder=True`` so that every layer has
    BLIP's MED cross-attention, run bidirectionally (``is_decoder=False`` in ``forward``: the upstream
    ``mode='multimodal'`` text encoder), and ``mlp`` the 5-linear head. The upstream state dict maps onto it
    one-to-one (:meth:`load_upstream_state_dict`).
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = LinearStackMLP(text_config.hidden_size)

    @staticmethod
    def configs_from_upstream(
        state: dict[str, Tensor], med_config: dict[str, Any], vision_heads: int | None = None
    ) -> tuple[Any, Any]:
        """``BlipVisionConfig`` inferred from the ViT weights (width, depth, patch, image size, MLP width; heads
        from ``vision_heads`` or width / 64 as in BLIP's base and large ViTs) and ``BlipTextConfig`` from
        ``med_config.json`` (BERT sizes; cross-attention width = the ViT width, as ``BLIP_Pretrain`` sets)."""
        from transformers import BlipTextConfig, BlipVisionConfig

        try:
            width = int(state[_VIT + "cls_token"].shape[-1])
            patch = int(state[_VIT + "patch_embed.proj.weight"].shape[-1])
            grid = round((state[_VIT + "pos_embed"].shape[1] - 1) ** 0.5)
            mlp_width = int(state[_VIT + "blocks.0.mlp.fc1.weight"].shape[0])
        except KeyError as e:
            raise CheckpointError(f"imagereward: checkpoint lacks the BLIP ViT key {e.args[0]!r}") from e
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(_VIT) + r"blocks\.(\d+)\.", k)))
        heads = vision_heads or max(1, width // 64)
        if width % heads:
            raise CheckpointError(f"imagereward: ViT width {width} is not divisible by vision_heads={heads}")
        vision = BlipVisionConfig(
            hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=depth, num_attention_heads=heads,
            image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0,
        )  # fmt: skip
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if k not in med_config]
        if missing:
            raise CheckpointError(f"imagereward: med_config.json lacks {missing}")
        text = BlipTextConfig(
            vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
            num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
            intermediate_size=med_config["intermediate_size"],
            max_position_embeddings=med_config.get("max_position_embeddings", 512),
            layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), hidden_act=med_config.get("hidden_act", "gelu"),
            pad_token_id=med_config.get("pad_token_id", 0), encoder_hidden_size=width, is_decoder=True,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=None, eos_token_id=None,
            sep_token_id=None,
        )  # fmt: skip
        return vision, text

    def load_upstream_state_dict(self, state: dict[str, Tensor], path: str = "ImageReward.pt") -> None:
        """Load an ``ImageReward.pt`` state dict (keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
        ``mlp.layers.*``); BLIP's unused ITC projections are skipped, anything else unknown is an error."""
        mapped: dict[str, Tensor] = {}
        unknown = []
        for key, value in state.items():
            if key.startswith(_IMAGEREWARD_UNUSED):
                continue
            try:
                if key.startswith(_VIT):
                    mapped["visual." + _vit_key_to_hf(key[len(_VIT) :])] = value
                elif key.startswith(_TXT):
                    mapped["text." + key[len(_TXT) :]] = value
                elif key.startswith("mlp."):
                    mapped[key] = value
                else:
                    unknown.append(key)
            except KeyError:
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"imagereward: {path!r} has keys outside the ImageReward layout: {unknown[:5]}")
        load_strict(self, {k: v.float() for k, v in mapped.items()}, "imagereward", path)

    def upstream_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in the ``ImageReward.pt`` layout (inverse of :meth:`load_upstream_state_dict`)."""
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("visual."):
                out[_VIT + _vit_key_from_hf(key[len("visual.") :])] = value
            elif key.startswith("text."):
                out[_TXT + key[len("text.") :]] = value
            else:
                out[key] = value
        return out

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised pixels ``(B, 3, S, S)`` and BERT tokens ``(B, L)`` -> raw (unnormalised) reward ``(B,)``."""
        image_embeds = self.visual(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, is_decoder=False,
        ).last_hidden_state  # fmt: skip
        return self.mlp(out[:, 0, :].float()).squeeze(-1)


def blip_tokenizer(source: str, what: str = "imagereward") -> Any:
    """BLIP's tokenizer: ``BertTokenizer`` (``bert-base-uncased``) plus ``[DEC]`` as bos and ``[ENC]`` as an
    additional special token (``BLIP/models/blip.py:init_tokenizer``), 30524 tokens for the real vocabulary."""
    from transformers import BertTokenizer

    tok = from_pretrained(BertTokenizer.from_pretrained, source, what)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(Reward):
    """ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L + a BERT text encoder cross-attending to the image, whose
    ``[CLS]`` feature feeds a linear MLP.

    Output ``(r - 0.16717) / 1.03334`` (the upstream normalisation): roughly standard-normal over generated
    images, typically -2..+2 (SD3.5-M ~0.85-1.5).

    Args:
        checkpoint: Hub repo (``THUDM/ImageReward``), a folder with ``ImageReward.pt`` (+ ``med_config.json``), or
            the ``.pt`` file: a plain state dict with keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
            ``mlp.layers.*`` (upstream ``ImageReward.load``).
        med_config: the BERT config JSON (default: ``med_config.json`` next to the checkpoint / in the repo).
        tokenizer: ``BertTokenizer`` source (``bert-base-uncased``); ``[DEC]``/``[ENC]`` are added as upstream.
        vision_heads: attention heads of the ViT (not recoverable from weights; default width / 64: 16 for ViT-L).
        max_length: prompt token limit (upstream 35: longer prompts are truncated).
        dtype: network dtype.

    Preprocessing: ``Resize(224, bicubic) -> CenterCrop(224)`` (torchvision), OpenAI CLIP mean/std; prompt padded
    to and truncated at 35 BERT tokens, ``[CLS]`` first as in ``ImageReward.score``. The image size is read from
    the ViT's position embeddings.
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        med_config: str | None = None,
        tokenizer: str = "bert-base-uncased",
        vision_heads: int | None = None,
        max_length: int = 35,
        dtype: str = "float32",
    ) -> None:
        path = resolve_file(checkpoint, "ImageReward.pt", self.name)
        if med_config is None:
            source = os.path.dirname(path) if os.path.isfile(checkpoint) else checkpoint
            med_config = resolve_file(source, "med_config.json", self.name)
        med = _read_json(resolve_file(med_config, None, self.name), self.name)
        state = strip_prefix(load_state_dict(path, self.name), "module.")
        vision_cfg, text_cfg = ImageRewardModel.configs_from_upstream(state, med, vision_heads)
        model = ImageRewardModel(vision_cfg, text_cfg)
        model.load_upstream_state_dict(state, path)
        self.tokenizer = blip_tokenizer(tokenizer, self.name)
        if len(self.tokenizer) > text_cfg.vocab_size:
            raise CheckpointError(
                f"imagereward: tokenizer has {len(self.tokenizer)} tokens but the text encoder only "
                f"{text_cfg.vocab_size} embeddings (wrong tokenizer or med_config?)"
            )
        self.model = _freeze(model.to(resolve_dtype(dtype)))
        self.transform = ImageTransform(size=vision_cfg.image_size, crop=vision_cfg.image_size, crop_rounding="round")
        self.max_length = max_length

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        device = _device(self.model)
        dtype = next(self.model.parameters()).dtype
        tok = _tokenize(self.tokenizer, prompts, self.max_length, device, "max_length")
        raw = self.model(self.transform(images.to(device)).to(dtype), tok["input_ids"], tok["attention_mask"])
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


# -------------------------------------------------------------------------------------------------- aesthetic
class AestheticReward(Reward):
    """LAION improved aesthetic predictor ("v2", ``christophschuhmann/improved-aesthetic-predictor``): the
    L2-normalised CLIP ViT-L/14 image embedding fed to the 5-linear MLP trained with MSE on 1-10 ratings.

    Output: predicted mean rating, ~1-10 (most generated images 5-7; SD3.5-M ~5.4-6.6). Prompts are ignored.

    Args:
        checkpoint: the MLP state dict: a ``.pth`` path (``sac+logos+ava1-l14-linearMSE.pth``, keys
            ``layers.{0,2,4,6,7}.*``; the ``reluMSE`` variants are recognised from their keys), a folder, or a Hub
            repo. Default: ``trl-lib/ddpo-aesthetic-predictor`` (the copy TRL's DDPO example downloads).
        filename: the file inside a folder/repo.
        clip_model: the CLIP image tower: a transformers ``CLIPModel`` folder or Hub id. Upstream uses OpenAI's
            ``clip.load("ViT-L/14")``; ``openai/clip-vit-large-patch14`` holds the same weights.
        dtype: CLIP dtype (the MLP runs in float32).

    Preprocessing (OpenAI CLIP's ``_transform``): shortest side -> 224 bicubic antialiased, center crop 224
    (torchvision rounding), OpenAI mean/std.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        checkpoint: str = "trl-lib/ddpo-aesthetic-predictor",
        filename: str = "aesthetic-model.pth",
        clip_model: str = "openai/clip-vit-large-patch14",
        dtype: str = "float32",
    ) -> None:
        from transformers import CLIPModel

        path = resolve_file(checkpoint, filename, self.name)
        self.mlp = _freeze(LinearStackMLP.from_state_dict(load_state_dict(path, self.name), self.name, path))
        clip = from_pretrained(CLIPModel.from_pretrained, clip_model, self.name, dtype=resolve_dtype(dtype))
        dim = clip.config.projection_dim
        if dim != self.mlp.input_size:
            raise CheckpointError(
                f"aesthetic: the MLP in {path!r} takes {self.mlp.input_size}-d embeddings but CLIP {clip_model!r} "
                f"projects to {dim}"
            )
        self.clip = _freeze(_HFCLIP(clip))
        size = clip.config.vision_config.image_size
        self.transform = ImageTransform(size=size, crop=size, crop_rounding="round")

    def score(self, images: Tensor, prompts: list[str], **meta: Any) -> Tensor:
        emb = self.clip.image_features(self.transform(images.to(_device(self.clip))))  # L2-normalised, float32
        return self.mlp(emb).squeeze(-1)


__all__: Sequence[str] = [
    "HPS_FILES",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "AestheticReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "ImageRewardModel",
    "ImageRewardReward",
    "LinearStackMLP",
    "PickScoreReward",
    "blip_tokenizer",
    "load_hf_clip",
    "open_clip_model_name",
    "processor_transform",
]
