"""How well the clean-sample estimate of a partial trajectory predicts its final world reward, and what pruning by
it could save over best-of-N: the most a look-ahead value could add to a tree search on the world.

    python -m research.steering_world_lookahead [--prompts 32] [--pool 64] [--threads 2] [--device cpu]

Same sampler as ``steering_world.py`` (the shipped base, 20 steps, CFG 3 = 40 NFE per sample, Flow-GRPO SDE at
noise level 0.7) and the same held-out prompts. Each prompt draws ``--pool`` trajectories; at the listed steps
``k`` every trajectory is scored on its clean-sample estimate ``x0_hat = x_k - t_k v_k`` (free: ``v_k`` is the
velocity step ``k`` computes anyway; FK steering's "expected x0" intermediate reward), and at the end on its
image. Reward: the world evaluator's partial credit.

Table 1, per step k: the mean look-ahead reward, its correlation with the final reward (pooled within prompts)
and how often the trajectory with the prompt's best look-ahead reward ends correct.

Table 2, screening: run ``M`` particles to step ``k``, keep the ``m`` with the best look-ahead reward and finish
only those; NFE ``= 2 M (k + 1) + 2 m (19 - k)``. Its expected best final reward is the mean over 400 random
size-``M`` subsets of each pool; best-of-N is the exact order-statistics curve of the same pools (as in
``steering_world.py``). "saving" is the NFE best-of-N needs for the same reward over the screen's NFE.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.steering_world import held_out_prompts
from diffalign.rewards import WorldReward
from diffalign.sampling.sampler import SDE
from diffalign.steering import SteeringPipeline
from diffalign.steering.best_of_n import best_of_n_curve

SCREENS = [(16, 4), (32, 8), (64, 8), (64, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of held-out prompts (evenly spaced)")
    parser.add_argument("--pool", type=int, default=64, help="trajectories per prompt")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if max(m for m, _ in SCREENS) > args.pool:
        parser.error(f"--pool must be at least {max(m for m, _ in SCREENS)} (the largest screen)")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pipe = SteeringPipeline.from_pretrained("builtin:world-sd3", family="sd3", device=args.device,
                                            max_sequence_length=16)  # fmt: skip
    prompts = held_out_prompts(args.prompts)
    reward = WorldReward("score")
    start = time.time()
    look = {k: [] for k in args.steps}
    final, correct = [], []
    for i, prompt in enumerate(prompts):
        problem = pipe.problem(prompt, reward, num_inference_steps=20, height=64, width=64, guidance_scale=3.0,
                               sde=SDE(kind="flow_sde", noise_level=0.7), inverse_temperature=1.0)  # fmt: skip
        generator = torch.Generator(args.device).manual_seed(5000 + i)
        x = problem.initial_noise(args.pool, generator)
        for index in range(problem.num_steps):
            out, v = problem.transition(x, index, generator)
            if index in look:
                look[index].append(problem.score(x - float(problem.times[index]) * v).double().cpu())
            x = out.x_next
        final.append(problem.score(x).double().cpu())
        correct.append(final[-1] == 1.0)
    elapsed = time.time() - start
    final_t = torch.stack(final)  # (P, M)
    cost = problem.sample_cost
    step_cost = problem.step_cost
    print(f"{len(prompts)} held-out prompts x {args.pool} trajectories, 20 steps, CFG 3 ({cost} NFE per sample); "
          f"{elapsed:.0f} s; mean final reward {final_t.mean():.3f}")  # fmt: skip
    print(f"{'step k':>6} {'look-ahead mean':>15} {'corr. with final':>16} {'P(correct | best look-ahead)':>28}")
    centred = final_t - final_t.mean(1, keepdim=True)
    for k in args.steps:
        h = torch.stack(look[k])
        hc = h - h.mean(1, keepdim=True)
        corr = float((hc * centred).sum() / (hc.pow(2).sum().sqrt() * centred.pow(2).sum().sqrt()))
        top = h == h.max(1, keepdim=True).values
        p_top = float(((final_t == 1.0) & top).sum() / top.sum())
        print(f"{k:>6} {float(h.mean()):>15.3f} {corr:>16.3f} {p_top:>28.3f}")

    curves = [best_of_n_curve(f.tolist(), c.tolist()) for f, c in zip(final, correct, strict=True)]
    bon = [sum(c[n][0] for c in curves) / len(curves) for n in range(args.pool)]

    def equivalent(value: float) -> str:
        n = next((n for n in range(1, args.pool + 1) if bon[n - 1] >= value), None)
        return f">{args.pool * cost}" if n is None else str(n * cost)

    print(f"\n{'k':>3} {'M':>3} {'m':>3} {'NFE':>5} {'reward':>7} {'best-of-N NFE':>13} {'saving':>7}")
    g = torch.Generator().manual_seed(0)
    for k in args.steps:
        h_all = torch.stack(look[k])
        for m_all, m_keep in SCREENS:
            total = 0.0
            for _ in range(400):
                idx = torch.rand(h_all.shape, generator=g).argsort(1)[:, :m_all]
                h = h_all.gather(1, idx) + 1e-6 * torch.rand(idx.shape, generator=g, dtype=torch.float64)
                kept = idx.gather(1, h.argsort(1, descending=True)[:, :m_keep])
                total += float(final_t.gather(1, kept).max(1).values.mean())
            value = total / 400
            nfe = step_cost * (m_all * (k + 1) + m_keep * (problem.num_steps - k - 1))
            eq = equivalent(value)
            saving = f">{args.pool * cost / nfe:.1f}x" if eq.startswith(">") else f"{int(eq) / nfe:.1f}x"
            print(f"{k:>3} {m_all:>3} {m_keep:>3} {nfe:>5} {value:>7.3f} {eq:>13} {saving:>7}", flush=True)


if __name__ == "__main__":
    main()
