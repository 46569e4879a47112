"""Pretrained preference rewards on tiny random checkpoints saved in the upstream formats.

Each checkpoint is written the way the upstream project ships it (transformers ``save_pretrained`` folders for
PickScore / CLIP score, an open_clip ``{"state_dict": ...}`` ``.pt`` for HPSv2, ``ImageReward.pt`` +
``med_config.json`` + a BERT tokenizer for ImageReward, the ``layers.N.*`` MLP ``.pth`` for the aesthetic
predictor) and loaded through the same code path as a real one. Preprocessing is compared with the reference ops
(torchvision / open_clip / transformers' PIL image processor) on fixed images.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import REWARDS, RewardError, build_reward
from diffalign.rewards.hub import CheckpointError
from diffalign.rewards.preference import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    ImageRewardModel,
    ImageRewardReward,
    LinearStackMLP,
    PickScoreReward,
)
from diffalign.rewards.preprocess import ImageTransform

PROMPTS = ["a photo of a red circle", "a photo of two blue squares and a very long tail " * 6, "circles"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(seed: int = 0, shape: tuple[int, int] = (40, 50), batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *shape, generator=g)


def _fixed_image(height: int, width: int) -> tuple[Image.Image, torch.Tensor]:
    """A smooth random image with a sharp square (an 8-bit PIL image and the same values as a float tensor)."""
    rng = np.random.default_rng(1)
    coarse = torch.from_numpy(rng.random((1, 3, height // 6 + 2, width // 6 + 2)).astype(np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    x[:, height // 3 : height // 2, width // 4 : width // 2] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    array = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255.0


def _check_scores_and_grad(reward, shape=(40, 50)) -> torch.Tensor:
    images = _images(shape=shape).requires_grad_()
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    return scores.detach()


def _assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 8-bit resampling rounding: normalised units (1/255 in pixel units is ~0.015 here)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours - ref).abs()
    assert float(diff.max()) < 0.03, float(diff.max())
    assert float(diff.mean()) < 0.01, float(diff.mean())


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """A tiny ``CLIPModel`` + tokenizer + ``preprocessor_config.json`` folder (the PickScore_v1 / laion layout)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffalign.pipelines.tiny import clip_tokenizer

    path = str(tmp_path_factory.mktemp("clip"))
    tok = clip_tokenizer(["a", "photo", "of", "red", "blue", "circle", "circles", "square", "squares"])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


TINY_VIT_H = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory) -> tuple[str, str]:
    """(folder with ``HPS_v2.1_compressed.pt``, tiny ViT-H-14-layout open_clip JSON config)."""
    import open_clip

    root = tmp_path_factory.mktemp("hps")
    config = root / "tiny-ViT-H-14.json"
    config.write_text(json.dumps(TINY_VIT_H))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-ViT-H-14", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return str(root), str(config)


def upstream_imagereward_keys(vit_depth: int, text_layers: int) -> set[str]:
    """The ``ImageReward.pt`` key set, written out from the upstream modules (BLIP ``vit.py`` VisionTransformer,
    ``med.py`` BertModel with cross-attention and no pooler, ``ImageReward.py`` MLP, ``BLIP_Pretrain`` ITC
    projections)."""
    wb = ("weight", "bias")
    keys = {f"blip.visual_encoder.{k}" for k in ("cls_token", "pos_embed")}
    keys |= {f"blip.visual_encoder.{m}.{p}" for m in ("patch_embed.proj", "norm") for p in wb}
    for i in range(vit_depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blip.visual_encoder.blocks.{i}.{m}.{p}" for p in wb}
    t = "blip.text_encoder."
    keys |= {t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight"}
    keys |= {f"{t}embeddings.LayerNorm.{p}" for p in wb}
    for i in range(text_layers):
        for att in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{t}encoder.layer.{i}.{att}.{m}.{p}" for p in wb}
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys |= {f"{t}encoder.layer.{i}.{m}.{p}" for p in wb}
    keys |= {f"blip.{m}.{p}" for m in ("vision_proj", "text_proj") for p in wb}
    keys |= {f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in wb}
    return keys


@pytest.fixture(scope="module")
def imagereward_folder(tmp_path_factory) -> str:
    """``ImageReward.pt`` + ``med_config.json`` + a BERT tokenizer folder, tiny."""
    from transformers import BertTokenizer, BlipVisionConfig

    root = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "circle", "##s", "and"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(root / "bert"))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2,
           "encoder_width": 48, "add_cross_attention": True}  # fmt: skip
    (root / "med_config.json").write_text(json.dumps(med))
    vision = BlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, layer_norm_eps=1e-6)  # fmt: skip
    probe = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 48),
             "blip.visual_encoder.patch_embed.proj.weight": torch.zeros(48, 3, 16, 16),
             "blip.visual_encoder.pos_embed": torch.zeros(1, 5, 48),
             "blip.visual_encoder.blocks.1.mlp.fc1.weight": torch.zeros(96, 48),
             "blip.visual_encoder.blocks.0.mlp.fc1.weight": torch.zeros(96, 48)}  # fmt: skip
    _, text = ImageRewardModel.configs_from_upstream(probe, med, vision_heads=2)
    torch.manual_seed(0)
    model = ImageRewardModel(vision, text)
    for p in model.mlp.parameters():  # upstream init std 1/(d+1) gives tiny outputs; make gradients visible
        torch.nn.init.normal_(p, std=0.2)
    state = model.upstream_state_dict()
    state |= {"blip.vision_proj.weight": torch.randn(16, 48), "blip.vision_proj.bias": torch.zeros(16),
              "blip.text_proj.weight": torch.randn(16, 32), "blip.text_proj.bias": torch.zeros(16)}  # fmt: skip
    assert set(state) == upstream_imagereward_keys(2, 2)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # persistent buffer in med.py
    torch.save(state, root / "ImageReward.pt")
    return str(root)


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory, clip_folder) -> str:
    """``sac+logos+ava1-l14-linearMSE.pth`` layout for the tiny CLIP's 16-d embeddings."""
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.manual_seed(0)
    upstream = torch.nn.Sequential(  # the upstream MLP, written out: Linear/Dropout, no ReLUs
        torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )  # fmt: skip
    torch.save({f"layers.{k}": v for k, v in upstream.state_dict().items()}, path)
    return str(path)


# ------------------------------------------------------------------------------------------ load and score
def test_pickscore_loads_scores_and_backprops(clip_folder):
    reward = PickScoreReward(model=clip_folder, processor=clip_folder)
    scores = _check_scores_and_grad(reward)
    # the upstream formula, from the transformers model directly
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    images = _images()
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=reward.transform(images)).pooler_output)
        tok = reward.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    scaled = PickScoreReward(model=clip_folder, processor=clip_folder, scale=1 / 26)(_images(), PROMPTS)
    torch.testing.assert_close(scaled, scores / 26, atol=1e-5, rtol=1e-5)


def test_clipscore_modes(clip_folder):
    cos = _check_scores_and_grad(CLIPScoreReward(model=clip_folder))
    assert (cos.abs() <= 1 + 1e-5).all()
    tm = CLIPScoreReward(model=clip_folder, mode="torchmetrics")(_images(), PROMPTS)
    torch.testing.assert_close(tm, (100 * cos).clamp_min(0), atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        CLIPScoreReward(model=clip_folder, mode="bogus")


def test_hpsv2_loads_scores_and_backprops(hps_files):
    import open_clip

    folder, config = hps_files
    reward = HPSv2Reward(version="v2.1", checkpoint=folder, model=config)
    scores = _check_scores_and_grad(reward)
    assert (scores.abs() <= 1 + 1e-5).all()  # a cosine, no logit scale
    # the key layout is open_clip ViT-H-14's, at tiny size
    with torch.device("meta"):
        full = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    state = torch.load(f"{folder}/HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    layout = lambda keys: {re.sub(r"\.\d+\.", ".N.", k) for k in keys}  # noqa: E731
    assert layout(state) == layout(full.state_dict())
    # same as open_clip's own forward on the same tokens
    model = open_clip.create_model("tiny-ViT-H-14", pretrained=None)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model(reward.transform(_images()), open_clip.get_tokenizer("tiny-ViT-H-14")(PROMPTS))
    expected = (out[0] * out[1]).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        HPSv2Reward(version="v2.0", checkpoint=folder, model=config)


def test_imagereward_loads_scores_and_backprops(imagereward_folder):
    reward = ImageRewardReward(checkpoint=imagereward_folder, tokenizer=f"{imagereward_folder}/bert", vision_heads=2)
    assert len(reward.tokenizer) == 15  # BERT vocab + [DEC] + [ENC], as BLIP's init_tokenizer
    _check_scores_and_grad(reward)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and (tok["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    # the checkpoint file itself works too (med_config.json found beside it)
    again = ImageRewardReward(checkpoint=f"{imagereward_folder}/ImageReward.pt",
                              tokenizer=f"{imagereward_folder}/bert", vision_heads=2)  # fmt: skip
    torch.testing.assert_close(again(_images(), PROMPTS), reward(_images(), PROMPTS))


def test_imagereward_mapping_matches_upstream_vit_math(imagereward_folder):
    """The BLIP ViT recomputed from the upstream keys with plain torch ops equals the mapped BlipVisionModel."""
    state = torch.load(f"{imagereward_folder}/ImageReward.pt", weights_only=True)
    reward = ImageRewardReward(checkpoint=imagereward_folder, tokenizer=f"{imagereward_folder}/bert", vision_heads=2)
    pixels = reward.transform(_images())
    v = {k[len("blip.visual_encoder.") :]: t for k, t in state.items() if k.startswith("blip.visual_encoder.")}
    F = torch.nn.functional
    x = F.conv2d(pixels, v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v["cls_token"].expand(len(x), -1, -1), x], 1) + v["pos_embed"]
    for i in range(2):
        b = lambda n: (v[f"blocks.{i}.{n}.weight"], v[f"blocks.{i}.{n}.bias"])  # noqa: B023, E731
        h = F.layer_norm(x, (48,), *b("norm1"), eps=1e-6)
        q, k, val = F.linear(h, *b("attn.qkv")).reshape(len(x), -1, 3, 2, 24).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * 24**-0.5).softmax(-1)
        x = x + F.linear((att @ val).transpose(1, 2).reshape(len(x), -1, 48), *b("attn.proj"))
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (48,), *b("norm2"), eps=1e-6), *b("mlp.fc1"))),
                         *b("mlp.fc2"))  # fmt: skip
    x = F.layer_norm(x, (48,), v["norm.weight"], v["norm.bias"], eps=1e-6)
    with torch.no_grad():
        ours = reward.model.visual(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-4)


def test_aesthetic_loads_scores_and_backprops(clip_folder, aesthetic_file):
    reward = AestheticReward(checkpoint=aesthetic_file, clip_model=clip_folder)
    scores = _check_scores_and_grad(reward)
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=reward.transform(_images())).pooler_output)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mlp = LinearStackMLP(16)
        mlp.load_state_dict(torch.load(aesthetic_file, weights_only=True))
        torch.testing.assert_close(scores, mlp.eval()(emb).squeeze(-1), atol=1e-5, rtol=1e-5)


def test_aesthetic_relu_variant_recognised(tmp_path, clip_folder):
    relu = LinearStackMLP(16, relu=True)
    assert sorted({k.split(".")[1] for k in relu.state_dict()}, key=int) == ["0", "3", "6", "9", "11"]
    torch.save(relu.state_dict(), tmp_path / "ava+logos-l14-reluMSE.pth")
    reward = AestheticReward(checkpoint=str(tmp_path / "ava+logos-l14-reluMSE.pth"), clip_model=clip_folder)
    assert any(isinstance(m, torch.nn.ReLU) for m in reward.mlp.modules())


def test_registry_builds_every_preference_reward(clip_folder, hps_files, imagereward_folder, aesthetic_file):
    folder, config = hps_files
    built = {
        "pickscore": build_reward("pickscore", model=clip_folder, processor=clip_folder),
        "clipscore": build_reward("clipscore", model=clip_folder),
        "hpsv2": build_reward("hpsv2", checkpoint=folder, model=config),
        "imagereward": build_reward("imagereward", checkpoint=imagereward_folder,
                                    tokenizer=f"{imagereward_folder}/bert", vision_heads=2),
        "aesthetic": build_reward("aesthetic", checkpoint=aesthetic_file, clip_model=clip_folder),
    }  # fmt: skip
    for name, reward in built.items():
        assert isinstance(reward, REWARDS[name]) and reward.differentiable
        assert reward(_images(shape=(64, 64)), PROMPTS).shape == (3,)


# --------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(40, 79), (300, 251), (64, 64), (20, 30)])
def test_torchvision_recipe_matches(size):
    """OpenAI CLIP / ImageReward / aesthetic: Resize(S, bicubic) -> CenterCrop(S) -> ToTensor -> Normalize."""
    from torchvision import transforms as T

    from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pil, tensor = _fixed_image(*size)
    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                     T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(pil)[None]  # fmt: skip
    _assert_close_to_reference(ImageTransform(size=32, crop=32, crop_rounding="round")(tensor), ref)


def test_reward_transforms_match_their_upstream_references(clip_folder, hps_files, imagereward_folder):
    from open_clip.transform import image_transform
    from torchvision import transforms as T
    from transformers import CLIPImageProcessorPil

    from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pil, tensor = _fixed_image(40, 79)  # odd crop offsets: floor and round differ
    # PickScore / CLIP score: transformers' (PIL) CLIPImageProcessor from the saved folder
    pick = PickScoreReward(model=clip_folder, processor=clip_folder).transform
    ref = torch.from_numpy(np.asarray(CLIPImageProcessorPil.from_pretrained(clip_folder)(images=pil)["pixel_values"]))
    _assert_close_to_reference(pick(tensor), ref)
    wrong = ImageTransform(size=32, crop=32, crop_rounding="round")(tensor)
    assert float((wrong - ref).abs().max()) > 0.1  # the comparison is sensitive to a one-pixel crop shift
    # HPSv2: open_clip's eval transform at the model's size
    folder, config = hps_files
    hps = HPSv2Reward(checkpoint=folder, model=config).transform
    _assert_close_to_reference(hps(tensor), image_transform(28, is_train=False)(pil)[None])
    # ImageReward: its torchvision Compose
    ir = ImageRewardReward(checkpoint=imagereward_folder, tokenizer=f"{imagereward_folder}/bert", vision_heads=2)
    ref_ir = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                        T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(pil)[None]  # fmt: skip
    _assert_close_to_reference(ir.transform(tensor), ref_ir)


def test_preprocessing_is_differentiable():
    images = _images(shape=(50, 37)).requires_grad_()
    ImageTransform(size=32, crop=32)(images).square().sum().backward()
    assert images.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_images_are_rejected(clip_folder):
    reward = CLIPScoreReward(model=clip_folder)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(_images() * 3, PROMPTS)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(3, 1, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(_images(), PROMPTS[:2])


def test_missing_checkpoints_name_the_path(tmp_path, clip_folder):
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        PickScoreReward(model=str(tmp_path / "no/such/dir"), processor=clip_folder)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        HPSv2Reward(checkpoint=str(tmp_path / "missing.pt"), model="ViT-H-14")
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ImageRewardReward(checkpoint=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):  # offline in the tests: a clear error
        AestheticReward(checkpoint="diffalign-tests/no-such-repo", clip_model=clip_folder)


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="unknown reward 'pikscore'.*pickscore"):
        build_reward("pikscore")


def test_corrupt_and_mismatched_weights(tmp_path, clip_folder, hps_files):
    bad = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        AestheticReward(checkpoint=str(bad), clip_model=clip_folder)
    torch.save({"layers.0.weight": torch.zeros(4, 4)}, bad)
    with pytest.raises(CheckpointError, match="aesthetic-predictor MLP"):
        AestheticReward(checkpoint=str(bad), clip_model=clip_folder)
    torch.save(LinearStackMLP(768).state_dict(), bad)  # a ViT-L/14 MLP with a 16-d CLIP
    with pytest.raises(CheckpointError, match="768-d"):
        AestheticReward(checkpoint=str(bad), clip_model=clip_folder)
    folder, _ = hps_files
    with pytest.raises(CheckpointError, match="do not fit"):  # a tiny checkpoint for the full-size architecture
        HPSv2Reward(checkpoint=folder, model="ViT-B-32")


def test_nan_and_inf_from_a_real_reward_are_reported(tmp_path, clip_folder):
    for value, word in ((float("nan"), "NaN"), (float("inf"), "inf")):
        mlp = LinearStackMLP(16)
        with torch.no_grad():
            mlp.layers[-1].bias.fill_(value)
        torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
        reward = AestheticReward(checkpoint=str(tmp_path / "mlp.pth"), clip_model=clip_folder)
        with pytest.raises(RewardError, match=f"'aesthetic' returned {word}"):
            reward(_images(), PROMPTS)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1")
@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"])
def test_default_hub_sources_fail_clearly_offline(name):
    """The upstream Hub ids are the defaults; offline and uncached they fail with a message naming the repo."""
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub repo") as info:
        build_reward(name)
    assert "/" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
