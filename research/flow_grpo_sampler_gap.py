"""Does a Flow-GRPO LoRA improve the world under the evaluation sampler, or only under the rollout sampler?

    python -m research.flow_grpo_sampler_gap --lora runs/world-flow-grpo/final [--prompts 96] [--images 4]

Scores the shipped base model and each given LoRA on the same category-balanced training prompts
(``world:train:balanced``, a fixed random subset) with three samplers, all CFG 3 at 64 px: the rollout sampler
(10 steps, a 2-step Flow-GRPO SDE window, noise 0.7, in the first 6 steps), a 10-step ODE, and the evaluation
sampler (20-step ODE). Prints the mean partial credit and strict accuracy of the world evaluator per cell.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffalign.pipelines import load_flow_model
from diffalign.sampling.sampler import SDE, sample, window
from diffalign.training.finetuning import load_prompts
from diffalign.world.evaluator import evaluate_batch

SAMPLERS: dict[str, tuple[int, bool]] = {"rollout: 10 steps, SDE window": (10, True),
                                         "10 steps ODE": (10, False), "eval: 20 steps ODE": (20, False)}  # fmt: skip


@torch.no_grad()
def score(flow, texts: list[str], num_steps: int, stochastic: bool, batch: int = 32) -> tuple[float, float]:
    """Mean partial credit and strict accuracy of ``texts`` sampled with the given sampler (fixed seeds)."""
    times, shape = flow.time_grid(num_steps, 64, 64), flow.latent_shape(64, 64)
    gen = torch.Generator().manual_seed(0)
    images = []
    for b in range(0, len(texts), batch):
        start = int(torch.randint(0, 5, (1,), generator=gen))
        sde = SDE(kind="flow_sde", noise_level=0.7, steps=window(start, 2)) if stochastic else None
        traj = sample(flow, flow.encode_prompt(texts[b : b + batch]), times, shape=shape, generator=gen, sde=sde,
                      guidance_scale=3.0, keep_states=False)  # fmt: skip
        images.append(flow.decode_latents(traj.final).cpu())
    verdicts = evaluate_batch(torch.cat(images).numpy(), texts)
    return float(np.mean([v.score for v in verdicts])), float(np.mean([v.correct for v in verdicts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", nargs="*", default=[], help="LoRA folders to compare with the base model")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = load_prompts("world:train:balanced", "prompts")
    chosen = np.random.default_rng(0).choice(len(pool), args.prompts, replace=False)
    texts = [pool[i] for i in chosen for _ in range(args.images)]
    print(f"{args.prompts} balanced training prompts x {args.images} images; cells: partial credit / accuracy")  # noqa: T201
    print(f"{'model':<40}" + "".join(f"{name:>32}" for name in SAMPLERS))  # noqa: T201
    for lora in [None, *args.lora]:
        flow = load_flow_model("sd3", "builtin:world-sd3", lora=lora, max_sequence_length=16)
        cells = [score(flow, texts, steps, stochastic) for steps, stochastic in SAMPLERS.values()]
        print(f"{lora or 'base':<40}" + "".join(f"{f'{s:.3f} / {a:.3f}':>32}" for s, a in cells))  # noqa: T201


if __name__ == "__main__":
    main()
