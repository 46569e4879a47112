"""Rewards defined outside the package, loaded through the dotted-path mechanism (``module:Class``)."""

import torch

from diffalign.rewards import Reward


class Redness(Reward):
    """Mean red-minus-blue of the image: a smooth, easily learned reward for tiny random models."""

    name = "redness"

    def score(self, images, prompts, **meta):
        return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))


class NaNAfterCalls(Reward):
    """Behaves like ``Redness`` for ``ok_calls`` calls, then returns NaN (a broken reward)."""

    name = "nan_after"

    def __init__(self, ok_calls: int = 0):
        self.calls = 0
        self.ok_calls = ok_calls

    def score(self, images, prompts, **meta):
        self.calls += 1
        value = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
        return value if self.calls <= self.ok_calls else torch.full_like(value, float("nan"))


class RedFraction(Reward):
    """Fraction of pixels the world's palette classifier calls red: a dense reward that the world base can learn
    in a few hundred rollouts (draw more, or larger, red)."""

    name = "red_fraction"

    def score(self, images, prompts, **meta):
        from diffalign.world.evaluator import classify_pixels
        from diffalign.world.scene import COLOR_NAMES

        red = COLOR_NAMES.index("red")
        labels = [classify_pixels(image.detach().float().cpu().numpy()) == red for image in images]
        return torch.tensor([float(m.mean()) for m in labels], device=images.device)


class CircleRedness(Reward):
    """A specialist: ``Redness`` on prompts that name a circle, NaN (abstains) on every other prompt."""

    name = "circle_redness"
    may_abstain = True

    def score(self, images, prompts, **meta):
        value = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
        applies = torch.tensor(["circle" in p for p in prompts], device=images.device)
        return torch.where(applies, value, torch.full_like(value, float("nan")))


class Blueness(Reward):
    """Mean blue-minus-red: pulls against ``Redness`` (a conflicting second reward)."""

    name = "blueness"

    def score(self, images, prompts, **meta):
        return (images[:, 2] - images[:, 0]).mean(dim=(1, 2))


class DifferentiableRedness(Redness):
    """``Redness`` declared differentiable: gradients reach the images (reward back-propagation tests)."""

    name = "differentiable_redness"
    differentiable = True
