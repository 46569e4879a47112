"""Steering on the embedded world: reward and evaluator accuracy versus NFE on held-out prompts.

    python benchmarks/steering_world.py [--prompts 32] [--pool 128] [--pool-cache FILE] [--seed 0]
    python benchmarks/steering_world.py --device cuda --pool 1024 --pool-batch 512 --wave-size 16 \
        --budgets 1024 2048 4096 8192      # the GPU run in the README

The shipped base model (``builtin:world-sd3``), 20 steps, CFG 3 (a sample costs 40 NFE), the Flow-GRPO SDE
(noise level 0.7). Reward: the world evaluator's partial credit, or with ``--reward-model`` a trained world
preference model (a continuous reward, like the DTS paper's ImageReward); accuracy: the evaluator's strict
verdict on the returned image. Prompts: every k-th prompt of the held-out test split (the same ones for every
method; prompt ``i`` uses seed ``i`` for the pool and ``i + 1000 * --seed`` for the steering rows).

Best-of-N is measured for every N up to ``--pool`` at once: each prompt draws one pool of ``pool`` independent
samples, and the expected reward (and accuracy) of the best of ``n`` i.i.d. draws is computed from it with the
unbiased order-statistics estimator ``E[f(best of n)] = sum_i f(x_(i)) C(i - 1, n - 1) / C(pool, n)`` (pool
sorted by reward, ``i`` its 1-based rank). This is the mean best-of-n over all ``C(pool, n)`` subsets, so the
curve is smooth and monotone where single best-of-n runs are noisy.

Rows: the best-of-N curve; DTS* (tree search, greedy read-out) at several budgets with the benchmark's
progressive widening (``--widening``/``--alpha``, default C = 1, alpha = 0.5) and with the paper's image default
(C = 2, alpha = 0.8); DTS (one softmax draw); Doob h-transform steering (MC look-ahead). Each steering row also
shows the NFE best-of-N needs for the same mean reward and the resulting saving. At budgets of a few dozen
samples the paper's widening lets the root take a new child on every one of the first ~35 iterations, so its
DTS* is best-of-N there; the narrower widening makes the tree branch below the root from the start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.rewards import PreferenceModelReward, WorldReward
from diffalign.sampling.sampler import SDE
from diffalign.steering import SteeringPipeline, steer
from diffalign.steering.base import chunks
from diffalign.steering.best_of_n import best_of_n_curve
from diffalign.world import evaluate_batch, test_prompts

PAPER_WIDENING = {"widening": 2.0, "alpha": 0.8}


def rows(budgets: list[int]) -> list[tuple[str, str, int, dict]]:
    """(label, method, budget, extra kwargs) per steering row; tree rows get the benchmark widening unless they
    name their own. DTS* runs at every budget, the paper's widening at the two largest, DTS at the third largest."""
    budgets = sorted(budgets)
    return [
        *(("dts_star", "dts_star", b, {}) for b in budgets),
        *(("dts_star C2 a0.8", "dts_star", b, PAPER_WIDENING) for b in budgets[-2:]),
        ("dts", "dts", budgets[max(0, len(budgets) - 2)], {}),
        ("doob", "doob", 192, {"num_candidates": 2}),
        ("doob", "doob", 344, {"num_candidates": 4}),
    ]


def held_out_prompts(count: int) -> list[str]:
    """``count`` evenly spaced held-out (test split) prompts: the prompt set of every world steering benchmark."""
    specs = test_prompts()
    return [s.text for s in specs[:: max(1, len(specs) // count)][:count]]


def world_sde_sampler(device: str, num_steps: int = 20):
    """The shipped world base and the sampler of the world steering benchmarks: ``(flow, reward, sde, times,
    shape)`` with the evaluator's partial credit, the Flow-GRPO SDE at noise level 0.7, a ``num_steps`` grid and
    64 px latents."""
    flow = SteeringPipeline.from_pretrained("builtin:world-sd3", family="sd3", device=device,
                                            max_sequence_length=16).flow  # fmt: skip
    return (flow, WorldReward("score"), SDE(kind="flow_sde", noise_level=0.7), flow.time_grid(num_steps, 64, 64),
            flow.latent_shape(64, 64))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of held-out prompts (evenly spaced)")
    parser.add_argument("--pool", type=int, default=128, help="best-of-N pool per prompt (largest N)")
    parser.add_argument("--model", default="builtin:world-sd3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lam", type=float, default=50.0, help="inverse temperature of the tree's soft backup")
    parser.add_argument("--c-uct", type=float, default=0.05, help="DTS* exploration constant (reward units)")
    parser.add_argument("--widening", type=float, default=1.0, help="progressive widening C (paper: 2)")
    parser.add_argument("--alpha", type=float, default=0.5, help="progressive widening alpha (paper: 0.8)")
    parser.add_argument("--pool-cache", help="JSON file that keeps the best-of-N pools between runs")
    parser.add_argument("--seed", type=int, default=0, help="steering rows use seed i + 1000 * seed for prompt i")
    parser.add_argument("--methods", nargs="+", default=["dts_star", "dts", "doob"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[160, 320, 640, 1024],
                        help="DTS* budgets (NFE) with the benchmark widening; the paper-widening rows use the two "
                        "largest")  # fmt: skip
    parser.add_argument("--wave-size", type=int, default=8, help="tree walks per batched model call")
    parser.add_argument("--branch-steps", type=int, nargs="+", help="tree branching steps (default: 0 4 8 12 16)")
    parser.add_argument("--pool-batch", type=int, default=64, help="pool samples per batched call")
    parser.add_argument("--reward-model", help="steer toward a trained world preference model (a folder written by "
                        "`diffalign train-reward configs/rewards/train_preference_world.yaml`) instead of the "
                        "evaluator's partial credit")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pipe = SteeringPipeline.from_pretrained(args.model, family="sd3", device=args.device, max_sequence_length=16)
    flow = pipe.flow
    prompts = held_out_prompts(args.prompts)
    reward = PreferenceModelReward(args.reward_model) if args.reward_model else WorldReward("score")

    def problem(prompt: str):
        return pipe.problem(prompt, reward, num_inference_steps=20, height=64, width=64, guidance_scale=3.0,
                            sde=SDE(kind="flow_sde", noise_level=0.7), inverse_temperature=args.lam)  # fmt: skip

    print(f"{len(prompts)} held-out prompts, 20 steps, CFG 3 (40 NFE per sample), lam {args.lam}, "
          f"c_uct {args.c_uct}, widening C {args.widening} alpha {args.alpha}", flush=True)  # fmt: skip

    # best-of-N: one pool per prompt, every N from it (optionally cached: the pool is most of the run time)
    key = {"model": args.model, "prompts": prompts, "pool": args.pool, "reward": args.reward_model or "world"}
    if args.device != "cpu":  # a device draws other noise than the CPU, so it keeps its own pools
        key["device"] = args.device
    cached = (
        json.loads(Path(args.pool_cache).read_text()) if args.pool_cache and Path(args.pool_cache).exists() else {}
    )
    if cached.get("key") != key:
        start, pools = time.time(), []
        for i, prompt in enumerate(prompts):
            prob, generator = problem(prompt), torch.Generator(args.device).manual_seed(i)
            scores, correct = [], []
            for size in chunks(args.pool, args.pool_batch):
                images = flow.decode_latents(prob.sample(size, generator).final)
                scores += reward(images, [prompt] * size).tolist()
                correct += [v.correct for v in evaluate_batch(images, [prompt] * size)]
            pools.append((scores, correct))
        cached = {"key": key, "pools": pools, "seconds_per_prompt": (time.time() - start) / len(prompts)}
        if args.pool_cache:
            Path(args.pool_cache).write_text(json.dumps(cached))
    curves = [best_of_n_curve(scores, correct) for scores, correct in cached["pools"]]
    pool_seconds = cached["seconds_per_prompt"]
    bon = [(sum(c[n][0] for c in curves) / len(curves), sum(c[n][1] for c in curves) / len(curves))
           for n in range(args.pool)]  # fmt: skip
    cost = problem(prompts[0]).sample_cost

    def bon_equivalent(value: float, nfe: float) -> tuple[str, str]:
        """NFE best-of-N needs for a mean reward of ``value``, and its ratio to ``nfe`` (">" past the pool)."""
        n = next((n for n in range(1, args.pool + 1) if bon[n - 1][0] >= value), None)
        if n is None:
            return f">{args.pool * cost}", f">{args.pool * cost / nfe:.1f}x"
        return f"{n * cost}", f"{n * cost / nfe:.1f}x"

    print(f"{'method':>17} {'budget':>6} {'mean NFE':>8} {'reward':>7} {'accuracy':>8} {'s/prompt':>8} "
          f"{'best-of-N NFE':>13} {'saving':>6}")  # fmt: skip
    for n in sorted({*(2**k for k in range(args.pool.bit_length()) if 2**k <= args.pool), args.pool}):
        print(f"{'best_of_n':>17} {n * cost:>6} {n * cost:>8} {bon[n - 1][0]:>7.3f} {bon[n - 1][1]:>8.3f} "
              f"{pool_seconds * n / args.pool:>8.2f} {n * cost:>13} {'1.0x':>6}", flush=True)  # fmt: skip
    final: dict[tuple[str, int], float] = {}
    for label, method, budget, extra in rows(args.budgets):
        if method not in args.methods:
            continue
        kwargs = dict(extra)
        if method in ("dts", "dts_star"):
            kwargs = {
                "widening": args.widening,
                "alpha": args.alpha,
                **kwargs,
                "c_uct": args.c_uct,
                "wave_size": args.wave_size,
                "branch_steps": args.branch_steps,
            }
        start, rewards, correct, nfe = time.time(), [], [], []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(args.device).manual_seed(i + 1000 * args.seed)
            out = steer(problem(prompt), method, budget, generator=generator, **kwargs)
            best = int(torch.argmax(out.rewards))
            image = flow.decode_latents(out.latents[best : best + 1])
            rewards.append(float(out.rewards[best]))
            correct.append(evaluate_batch(image, [prompt])[0].correct)
            nfe.append(out.nfe)
        mean_reward, mean_nfe = sum(rewards) / len(rewards), sum(nfe) / len(nfe)
        final[(label, budget)] = mean_reward
        equivalent, saving = bon_equivalent(mean_reward, mean_nfe)
        print(f"{label:>17} {budget:>6} {mean_nfe:>8.0f} {mean_reward:>7.3f} {sum(correct) / len(correct):>8.3f} "
              f"{(time.time() - start) / len(prompts):>8.2f} {equivalent:>13} {saving:>6}", flush=True)  # fmt: skip
    target = bon[-1][0]
    reach = sorted(b for (label, b), r in final.items() if label == "dts_star" and r >= target)
    top = args.pool * cost
    if reach:
        print(f"DTS* reaches best-of-{args.pool}'s reward ({target:.3f} at {top} NFE) with {reach[0]} NFE: "
              f"{top / reach[0]:.1f}x fewer")  # fmt: skip
    elif "dts_star" in args.methods:
        print(f"DTS* does not reach best-of-{args.pool}'s reward ({target:.3f} at {top} NFE) within its budgets")


if __name__ == "__main__":
    main()
