"""The most a search that branches once at step k could save over best-of-N on the world, if it knew the value of
every prefix for free: an optimistic bound for tree search (DTS*) on the embedded world.

    python -m research.steering_world_oracle [--prompts 16] [--prefixes 16] [--branches 8] [--pool 128] [--save F]

Same sampler and reward as ``steering_world.py`` (the shipped base, 20 steps, CFG 3 = 40 NFE a sample, Flow-GRPO
SDE at noise level 0.7; reward = the world evaluator's partial credit) and the same held-out prompts. For each
prompt and each step ``k``: ``--prefixes`` SDE trajectories up to step ``k``, each continued to the clean image
with ``--branches`` independent noise streams.

The **oracle screen** ``(M, m)`` draws ``M`` prefixes, picks the one with the highest value (the mean reward of
its continuations, known to the oracle at no cost), and returns the best of ``m`` of its continuations. It costs
``2 (M k + m (20 - k))`` NFE. It is not a method but a bound on what selecting prefixes by their value can buy,
computed two ways that bracket an oracle with exact values:

- *in-sample*: the value is the mean of all ``--branches`` continuations, and the screen returns continuations
  from that same set. Selecting on the outcomes it returns favours the screen (optimistic).
- *held-out*: the value is the mean of the first half of the continuations, and the screen returns continuations
  from the second half. The value is then a noisy estimate (pessimistic for an exact oracle), but the outcomes
  are fresh.

Each cell averages over 400 random draws of the ``M`` prefixes and ``m`` continuations and over the prompts.

Best-of-N is the exact order-statistics curve of a pool of ``--pool`` independent samples per prompt (as in
``steering_world.py``); "saving" is the NFE best-of-N needs for the screen's reward over the screen's NFE. The
issue's target for DTS* is a saving of 5x.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.steering_world import held_out_prompts, world_sde_sampler
from diffalign.sampling.sampler import sample
from diffalign.steering.best_of_n import best_of_n_curve

SCREENS_m = [1, 2, 4, 8]
NUM_STEPS = 20
STEP_COST = 2  # CFG: the [uncond; cond] batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="number of held-out prompts (evenly spaced)")
    parser.add_argument("--prefixes", type=int, default=16, help="prefixes per prompt and step (M: powers of 2)")
    parser.add_argument("--branches", type=int, default=8, help="continuations per prefix (largest m)")
    parser.add_argument("--pool", type=int, default=128, help="independent samples per prompt for best-of-N")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--save", help="write the pools and the continuation scores to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.prefixes < 2 or args.branches < max(SCREENS_m):
        parser.error(f"need --prefixes >= 2 and --branches >= {max(SCREENS_m)}")
    if not all(0 < k < NUM_STEPS for k in args.steps):
        parser.error(f"--steps must lie in [1, {NUM_STEPS - 1}]")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    flow, reward, sde, times, shape = world_sde_sampler(args.device, NUM_STEPS)
    prompts = held_out_prompts(args.prompts)
    p, b = args.prefixes, args.branches

    def run(prompt: str, x_init: torch.Tensor, segment: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cond = flow.encode_prompt([prompt] * x_init.shape[0])
        return sample(flow, cond, segment, x_init=x_init, generator=generator, sde=sde, guidance_scale=3.0,
                      keep_states=False).final  # fmt: skip

    start = time.time()
    pools: list[list[float]] = []
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in args.steps}  # k -> per prompt (P, B)
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(args.device).manual_seed(7000 + i)
        noise = torch.randn((args.pool, *shape), generator=generator, device=flow.device)
        images = flow.decode_latents(run(prompt, noise, times, generator))
        pools.append(reward.score(images, [prompt] * args.pool).double().cpu().tolist())
        for k in args.steps:
            noise = torch.randn((p, *shape), generator=generator, device=flow.device)
            prefix = run(prompt, noise, times[: k + 1], generator).repeat_interleave(b, dim=0)
            images = flow.decode_latents(run(prompt, prefix, times[k:], generator))
            scores[k].append(reward.score(images, [prompt] * (p * b)).double().cpu().view(p, b))
    elapsed = time.time() - start

    if args.save:
        with open(args.save, "w") as f:
            json.dump({"prompts": prompts, "pools": pools,
                       "scores": {str(k): [t.tolist() for t in v] for k, v in scores.items()}}, f)  # fmt: skip
    curves = [best_of_n_curve(pool, [False] * len(pool)) for pool in pools]
    bon = [sum(c[n][0] for c in curves) / len(curves) for n in range(args.pool)]
    sample_cost = NUM_STEPS * STEP_COST
    best = {"in-sample": 0.0, "held-out": 0.0}

    def saving(value: float, nfe: int, how: str) -> str:
        n = next((n for n in range(1, args.pool + 1) if bon[n - 1] >= value), None)
        ratio = (args.pool if n is None else n) * sample_cost / nfe
        best[how] = max(best[how], ratio)
        return f"{'>' if n is None else ''}{ratio:.1f}x"

    print(f"{len(prompts)} held-out prompts; best-of-N pool {args.pool}; {p} prefixes x {b} continuations per step; "
          f"20 steps, CFG 3 ({sample_cost} NFE a sample); {elapsed:.0f} s")  # fmt: skip
    print("best-of-N reward at N = 1 / 2 / 4 / 8 / 16 / 32: "
          + " / ".join(f"{bon[n - 1]:.3f}" for n in (1, 2, 4, 8, 16, 32) if n <= args.pool))  # fmt: skip
    print(f"\n{'k':>3} {'M':>3} {'m':>3} {'NFE':>5} {'in-sample':>10} {'saving':>7} {'held-out':>9} {'saving':>7}")
    g = torch.Generator().manual_seed(0)
    half = b // 2

    def screen(table: torch.Tensor, value_cols: slice, out_cols: slice, n_prefixes: int, n_keep: int) -> float:
        values, outcomes = table[:, :, value_cols].mean(2), table[:, :, out_cols]
        total = 0.0
        for _ in range(400):
            idx = torch.rand(values.shape, generator=g).argsort(1)[:, :n_prefixes]
            v = values.gather(1, idx) + 1e-9 * torch.rand(idx.shape, generator=g, dtype=torch.float64)
            chosen = idx.gather(1, v.argmax(1, keepdim=True)).squeeze(1)  # (prompts,)
            rows = outcomes[torch.arange(table.shape[0]), chosen]  # (prompts, continuations)
            keep = torch.rand(rows.shape, generator=g).argsort(1)[:, :n_keep]
            total += float(rows.gather(1, keep).max(1).values.mean())
        return total / 400

    for k in args.steps:
        table = torch.stack(scores[k])  # (prompts, P, B)
        for n_prefixes in [2**e for e in range(1, args.prefixes.bit_length()) if 2**e <= args.prefixes]:
            for n_keep in SCREENS_m:
                nfe = STEP_COST * (n_prefixes * k + n_keep * (NUM_STEPS - k))
                inside = screen(table, slice(None), slice(None), n_prefixes, n_keep)
                cells = f"{inside:>10.3f} {saving(inside, nfe, 'in-sample'):>7}"
                if n_keep <= b - half:
                    held = screen(table, slice(0, half), slice(half, None), n_prefixes, n_keep)
                    cells += f" {held:>9.3f} {saving(held, nfe, 'held-out'):>7}"
                print(f"{k:>3} {n_prefixes:>3} {n_keep:>3} {nfe:>5} {cells}", flush=True)
    print(f"\nlargest saving of any oracle screen: {best['in-sample']:.1f}x in-sample (optimistic), "
          f"{best['held-out']:.1f}x held-out; the issue's target for DTS*: 5x")  # fmt: skip


if __name__ == "__main__":
    main()
