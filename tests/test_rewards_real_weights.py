"""The preference scorers on their real upstream checkpoints (marker ``weights``).

Runs where the checkpoints are in the local Hugging Face cache (or reachable); skips otherwise (this project's
CI and dev machines cannot download them). Each scorer loads through the same code as in the tiny-checkpoint
tests and must give finite scores on the documented scale (anchors_steering_rewards.md section 5), rank a world
image higher under its own prompt than under a mismatched one, and pass gradients to the images.
"""

import pytest
import torch
import torch.nn.functional as F

from diffalign.rewards import AestheticReward, CLIPScoreReward, HPSv2Reward, ImageRewardReward, PickScoreReward
from diffalign.rewards.hub import CheckpointError
from diffalign.world import parse_prompt, render, sample_scene

pytestmark = pytest.mark.weights

PROMPT = "a photo of a red circle"
OTHER = "a photo of two green squares"

# (reward class, constructor kwargs, documented score range, whether it reads the prompt)
SCORERS = [
    (PickScoreReward, {}, (10.0, 30.0), True),
    (HPSv2Reward, {"version": "v2.1"}, (0.1, 0.45), True),
    (ImageRewardReward, {}, (-3.0, 3.0), True),
    (CLIPScoreReward, {}, (0.05, 0.5), True),
    (AestheticReward, {}, (1.0, 10.0), False),
]


def _image() -> torch.Tensor:
    import numpy as np

    scene = sample_scene(parse_prompt(PROMPT), np.random.default_rng(0))
    image = torch.from_numpy(render(scene))[None]
    return F.interpolate(image, size=256, mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("cls,kwargs,scale,reads_prompt", SCORERS, ids=[s[0].name for s in SCORERS])
def test_real_checkpoint_scores_on_the_documented_scale(cls, kwargs, scale, reads_prompt):
    try:
        reward = cls(**kwargs)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        pytest.skip(f"{cls.name} checkpoint not available here: {e}")
    image = _image()
    scores = reward(image.repeat(2, 1, 1, 1), [PROMPT, OTHER])
    assert torch.isfinite(scores).all()
    assert scale[0] <= float(scores[0]) <= scale[1], (cls.name, scores)
    if reads_prompt:
        assert scores[0] > scores[1], (cls.name, scores)
    if reward.differentiable:
        pixels = image.clone().requires_grad_(True)
        reward(pixels, [PROMPT]).sum().backward()
        assert pixels.grad is not None and pixels.grad.abs().sum() > 0
