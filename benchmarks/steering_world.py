"""Steering on the embedded world: reward and evaluator accuracy versus NFE on held-out prompts.

    python benchmarks/steering_world.py [--prompts 24] [--threads 1] [--device cpu]

The shipped base model (``builtin:world-sd3``), 20 steps, CFG 3 (a sample costs 40 NFE), the Flow-GRPO SDE
(noise level 0.7). Reward: the world evaluator's partial credit; accuracy: its strict verdict on the returned
image. Prompts: every k-th prompt of the held-out test split (the same ones for every method; prompt ``i`` uses
seed ``i``). Rows: plain sampling (best-of-1), best-of-N at 4 budgets, DTS* (tree search, greedy read-out) at 3
budgets, DTS (one softmax draw from the tree) and Doob h-transform steering (MC look-ahead).
Prints one table plus the smallest NFE at which DTS* reaches best-of-N's final reward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffalign.rewards import WorldReward  # noqa: E402
from diffalign.sampling.sampler import SDE  # noqa: E402
from diffalign.steering import SteeringPipeline, steer  # noqa: E402
from diffalign.world import evaluate_batch, test_prompts  # noqa: E402

ROWS: list[tuple[str, int, dict]] = [
    ("best_of_n", 40, {}),
    ("best_of_n", 160, {}),
    ("best_of_n", 320, {}),
    ("best_of_n", 640, {}),
    ("best_of_n", 1280, {}),
    ("dts_star", 160, {}),
    ("dts_star", 256, {}),
    ("dts_star", 320, {}),
    ("dts_star", 640, {}),
    ("dts", 320, {}),
    ("doob", 192, {"num_candidates": 2}),
    ("doob", 344, {"num_candidates": 4}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24, help="number of held-out prompts (evenly spaced)")
    parser.add_argument("--model", default="builtin:world-sd3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lam", type=float, default=50.0, help="inverse temperature of the tree's soft backup")
    parser.add_argument("--c-uct", type=float, default=0.05, help="DTS* exploration constant (reward units)")
    parser.add_argument("--methods", nargs="+", default=["best_of_n", "dts_star", "dts", "doob"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = SteeringPipeline.from_pretrained(args.model, family="sd3", device=args.device, max_sequence_length=16)
    flow = pipe.flow
    specs = test_prompts()
    every = max(1, len(specs) // args.prompts)
    prompts = [s.text for s in specs[::every][: args.prompts]]
    reward = WorldReward("score")
    print(f"{len(prompts)} held-out prompts, 20 steps, CFG 3 (40 NFE per sample), lam {args.lam}, c_uct {args.c_uct}")
    print(f"{'method':>10} {'budget':>6} {'mean NFE':>8} {'reward':>7} {'accuracy':>8} {'s/prompt':>8}")
    final: dict[tuple[str, int], float] = {}
    for method, budget, extra in ROWS:
        if method not in args.methods:
            continue
        kwargs = dict(extra)
        if method in ("dts", "dts_star"):
            kwargs.update(c_uct=args.c_uct, wave_size=8)
        start, rewards, correct, nfe = time.time(), [], [], []
        for i, prompt in enumerate(prompts):
            problem = pipe.problem(prompt, reward, num_inference_steps=20, height=64, width=64, guidance_scale=3.0,
                                   sde=SDE(kind="flow_sde", noise_level=0.7),
                                   inverse_temperature=args.lam)  # fmt: skip
            out = steer(problem, method, budget, generator=torch.Generator().manual_seed(i), **kwargs)
            best = int(torch.argmax(out.rewards))
            image = flow.decode_latents(out.latents[best : best + 1])
            rewards.append(float(out.rewards[best]))
            correct.append(evaluate_batch(image.numpy(), [prompt])[0].correct)
            nfe.append(out.nfe)
        final[(method, budget)] = sum(rewards) / len(rewards)
        per_prompt = (time.time() - start) / len(prompts)
        print(f"{method:>10} {budget:>6} {sum(nfe) / len(nfe):>8.0f} {final[(method, budget)]:>7.3f} "
              f"{sum(correct) / len(correct):>8.3f} {per_prompt:>8.2f}", flush=True)  # fmt: skip
    if "best_of_n" not in args.methods or "dts_star" not in args.methods:
        return
    top = max(b for m, b, _ in ROWS if m == "best_of_n")
    target = final[("best_of_n", top)]
    reach = sorted(b for (m, b), r in final.items() if m == "dts_star" and r >= target)
    if reach:
        print(f"DTS* reaches best-of-N's reward at {top} NFE ({target:.3f}) with {reach[0]} NFE: "
              f"{top / reach[0]:.1f}x fewer")  # fmt: skip
    else:
        print(f"DTS* does not reach best-of-N's reward at {top} NFE ({target:.3f}) within its budgets")


if __name__ == "__main__":
    main()
