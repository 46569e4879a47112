"""How much of the world reward is fixed by the first k sampling steps: the room a tree search has to work in.

    python -m research.steering_world_prefix [--prompts 16] [--prefixes 4] [--branches 8] [--device cpu]

For each held-out prompt and each step k, draw ``--prefixes`` SDE trajectories up to step k, continue each from
its state at step k with ``--branches`` independent noise streams down to the clean image, and score every
image with the world evaluator's partial credit (the reward of ``steering_world.py``; same sampler: 20 steps,
CFG 3, Flow-GRPO SDE at noise level 0.7). The share of the reward variance explained by the prefix,

    fixed(k) = 1 - mean within-prefix variance / total variance      (pooled over prompts),

is 0 when the prefix says nothing about the final reward and 1 when siblings that share it always score the
same. A tree that branches at step k can only improve on best-of-N through the variance still open there
(``1 - fixed(k)``); the table also shows how often two siblings of one prefix score differently. k = 0 shares
only the initial noise.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.steering_world import held_out_prompts, world_sde_sampler
from diffalign.sampling.sampler import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="number of held-out prompts (evenly spaced)")
    parser.add_argument("--prefixes", type=int, default=4, help="prefixes per prompt and step")
    parser.add_argument("--branches", type=int, default=8, help="continuations per prefix")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 12, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    flow, reward, sde, times, shape = world_sde_sampler(args.device, 20)
    prompts = held_out_prompts(args.prompts)
    p, b = args.prefixes, args.branches
    print(f"{len(prompts)} held-out prompts, {p} prefixes x {b} continuations per prompt and step; 20 steps, CFG 3")
    print(f"{'step k':>6} {'fixed(k)':>9} {'open':>6} {'P(siblings differ)':>19} {'mean reward':>12} {'s':>6}")
    for k in args.steps:
        start, within, total, differ, means = time.time(), [], [], [], []
        for i, prompt in enumerate(prompts):
            cond = flow.encode_prompt([prompt] * p)
            generator = torch.Generator(args.device).manual_seed(1000 * k + i)
            prefix = sample(flow, cond, times[: k + 1], shape=shape, generator=generator, sde=sde,
                            guidance_scale=3.0).final if k > 0 else torch.randn(
                                (p, *shape), generator=generator, device=flow.device)  # fmt: skip
            x_k = prefix.repeat_interleave(b, dim=0)
            images = flow.decode_latents(sample(flow, flow.encode_prompt([prompt] * (p * b)), times[k:], x_init=x_k,
                                                generator=generator, sde=sde, guidance_scale=3.0,
                                                keep_states=False).final)  # fmt: skip
            scores = reward.score(images, [prompt] * (p * b)).double().cpu().view(p, b)
            within.append(float(scores.var(dim=1).mean()))
            total.append(float(scores.flatten().var()))
            differ.append(float((scores[:, :, None] != scores[:, None, :]).double().sum() / (p * b * (b - 1))))
            means.append(float(scores.mean()))
        fixed = 1 - sum(within) / sum(total)
        print(f"{k:>6} {fixed:>9.3f} {1 - fixed:>6.3f} {sum(differ) / len(differ):>19.3f} "
              f"{sum(means) / len(means):>12.3f} {time.time() - start:>6.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
