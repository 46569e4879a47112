"""Rewards: the ``Reward`` interface, ``RewardSet``, and one module per reward family.

``REWARDS`` is the registry (name -> class). ``build_reward`` also accepts a dotted path to user code,
``"my_pkg.rewards:MyReward"``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from diffalign.config import ConfigError
from diffalign.rewards.base import Reward, RewardError, RewardOutput, RewardSet
from diffalign.rewards.jpeg import JpegCompressibilityReward, JpegIncompressibilityReward
from diffalign.rewards.models import ArtifactReward, MultiAspectReward, PreferenceModelReward
from diffalign.rewards.preference import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    ImageRewardReward,
    PickScoreReward,
)
from diffalign.rewards.world import WorldReward, WorldSpecialistReward

REWARDS: dict[str, type[Reward]] = {
    "world": WorldReward,
    "world_specialist": WorldSpecialistReward,
    "pickscore": PickScoreReward,
    "hpsv2": HPSv2Reward,
    "imagereward": ImageRewardReward,
    "aesthetic": AestheticReward,
    "clipscore": CLIPScoreReward,
    "jpeg_compressibility": JpegCompressibilityReward,
    "jpeg_incompressibility": JpegIncompressibilityReward,
    "preference_model": PreferenceModelReward,
    "artifact": ArtifactReward,
    "multi_aspect": MultiAspectReward,
}


@dataclass(kw_only=True)
class RewardConfig:
    """One reward in a config: registry ``name`` (or ``module:Class``), its ``weight``, constructor ``args``, and
    an optional ``label`` naming its component (default: the name), so one reward can appear twice."""

    name: str
    weight: float = 1.0
    label: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


def reward_class(name: str) -> type[Reward]:
    """The class registered as ``name``, or the class at dotted path ``"package.module:Class"``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import reward {name!r}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"{name!r} is not a diffalign Reward subclass")
        return cls
    raise ValueError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)} or 'module:Class'")


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate a reward by registry name or dotted path."""
    return reward_class(name)(**kwargs)


def build_reward_set(configs: list[RewardConfig], key: str = "rewards") -> RewardSet:
    """A ``RewardSet`` from config entries; component labels must be unique."""
    if not configs:
        raise ConfigError(f"config key '{key}': at least one reward is needed")
    rewards, weights = {}, {}
    for i, cfg in enumerate(configs):
        label = cfg.label or (cfg.name.rpartition(":")[2] if ":" in cfg.name else cfg.name)
        if label in rewards:
            raise ConfigError(f"config key '{key}[{i}]': reward {label!r} listed twice (give it a label)")
        try:
            cls = reward_class(cfg.name)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config key '{key}[{i}].name': {e}") from e
        try:
            rewards[label] = cls(**cfg.args)
        except (TypeError, ValueError) as e:  # unknown or bad constructor arguments
            raise ConfigError(f"config key '{key}[{i}].args': {e}") from e
        weights[label] = cfg.weight
    return RewardSet(rewards, weights)


__all__ = [
    "REWARDS",
    "AestheticReward",
    "ArtifactReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "JpegCompressibilityReward",
    "JpegIncompressibilityReward",
    "MultiAspectReward",
    "PickScoreReward",
    "PreferenceModelReward",
    "Reward",
    "RewardConfig",
    "RewardError",
    "RewardOutput",
    "RewardSet",
    "WorldReward",
    "WorldSpecialistReward",
    "build_reward",
    "build_reward_set",
    "reward_class",
]
