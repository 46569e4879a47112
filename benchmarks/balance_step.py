"""What MARBLE's gradient balancing costs against a single-reward step, on the world's Flow-GRPO micro-step.

The shipped world base (``builtin:world-sd3``, a 2.3M-parameter SD3 transformer) with a LoRA (r16/alpha32, as in
``configs/world/flow_grpo.yaml``) re-scores ``--batch`` stored SDE transitions at 64 px with CFG 3 and backpropagates
Flow-GRPO's clipped surrogate. Rows (median and fastest of ``--repeats`` interleaved runs in rotated order, after a
warm-up; the fastest is the steadier figure on a shared machine):

- single reward: forward, loss, backward (the step a one-reward run takes);
- amortised MARBLE: forward, the K per-reward losses (``reward_losses``), one backward of ``amortised_loss``;
- full MARBLE solve: forward, the K per-reward losses, ``GradientBalancer.solve`` (K backward passes through the
  retained graph, the Gram matrix, the QP, writing ``.grad``);
- the QP alone (``marble_solution`` on a K x K Gram matrix: normalisation, exact solver up to K = 8, Frank-Wolfe
  beyond);
- the mean micro-step over ``--every`` optimizer steps of ``--micro`` micro-steps when one of them is a solve.

    taskset -c 1 python benchmarks/balance_step.py [--batch 32] [--rewards 3] [--repeats 21] [--every 10] [--micro 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffalign.balance import BalanceConfig, GradientBalancer, marble_solution, reward_losses
from diffalign.pipelines import load_flow_model
from diffalign.sampling.sampler import SDE, transition_log_prob


def world_micro_step(batch: int, seed: int = 0):
    """The world model with a LoRA and one micro-batch of transitions; returns the flow, its trained parameters
    and ``forward() -> per_sample_loss(advantages (B,)) -> (B,)`` (the clipped surrogate at this forward's ratios)."""
    flow = load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16)
    flow.add_lora(rank=16, alpha=32.0)
    params = [p for p in flow.transformer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    shape = flow.latent_shape(64, 64)
    prompts = [f"{n} red circles" for n in range(batch)]
    with torch.no_grad():
        cond, uncond = flow.encode_prompt(prompts), flow.empty_cond(batch)
    x_t = torch.randn(batch, *shape, generator=g)
    x_next = x_t - 0.1 * torch.randn(batch, *shape, generator=g)
    sde, t, t_next = SDE(kind="flow_sde", noise_level=0.7), 0.9, 0.8
    kwargs = dict(sde=sde, guidance_scale=3.0, uncond=uncond)
    with torch.no_grad():
        old = transition_log_prob(flow, x_t, x_next, t, t_next, cond, **kwargs).log_prob

    def forward():
        ratio = torch.exp(transition_log_prob(flow, x_t, x_next, t, t_next, cond, **kwargs).log_prob - old)

        def per_sample(a: torch.Tensor) -> torch.Tensor:
            a = a.clamp(-5, 5)
            return torch.maximum(-a * ratio, -a * ratio.clamp(1 - 1e-3, 1 + 1e-3))

        return per_sample

    return flow, params, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="transitions per micro-step (world: 32)")
    parser.add_argument("--rewards", type=int, default=3, help="K rewards balanced")
    parser.add_argument("--repeats", type=int, default=21, help="21: steady medians on a shared core")
    parser.add_argument("--every", type=int, default=10, help="a full solve every this many optimizer steps")
    parser.add_argument("--micro", type=int, default=2, help="micro-steps per optimizer step (world: 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    K = args.rewards

    flow, params, forward = world_micro_step(args.batch)
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(args.batch, K, generator=g)
    advantages[: args.batch // 4, K - 1] = float("nan")  # a specialist reward abstaining on a quarter
    names = [f"r{k}" for k in range(K)]
    balancer = GradientBalancer(BalanceConfig(method="marble", every=args.every, ema=0.7), names, params)

    def zero():
        for p in params:
            p.grad = None

    def single():
        per_sample = forward()
        per_sample(torch.nan_to_num(advantages[:, 0])).mean().backward()

    def amortised():
        balancer.amortised_loss(reward_losses(forward(), advantages)).backward()

    def solve():
        balancer.solve(reward_losses(forward(), advantages), optimizer_step=0)

    steps = {"single reward": single, f"amortised MARBLE (K={K})": amortised, f"full MARBLE solve (K={K})": solve}
    solve()  # the first solve sets the weights amortised steps use
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        zero()
        fn()
    order = list(steps.items())
    for r in range(args.repeats):
        for name, fn in order[r % len(order) :] + order[: r % len(order)]:  # rotated: no step always runs first
            zero()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    base = median["single reward"]

    qp_rows = []
    for k in (2, 3, 5, 8, 12, 16):
        vectors = torch.randn(k, sum(p.numel() for p in params), generator=g, dtype=torch.float64)
        gram = vectors @ vectors.T
        marble_solution(gram)
        start = time.perf_counter()
        for _ in range(20):
            solution = marble_solution(gram)
        qp_rows.append((k, (time.perf_counter() - start) / 20, solution.qp.method))

    lora = sum(p.numel() for p in params)
    print(f"world SD3 transformer + LoRA r16 ({lora:,} trained parameters), batch {args.batch} at 64 px, CFG 3, "
          f"{args.threads} CPU thread(s), median of {args.repeats}")  # fmt: skip
    print(f"| {'step':<40} | {'median (ms)':>11} | {'vs single':>9} | {'min (ms)':>9} | {'vs single':>9} |")
    print(f"|{'-' * 42}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    n = args.every * args.micro
    median["mean"], fastest["mean"] = (
        (d[f"full MARBLE solve (K={K})"] + (n - 1) * d[f"amortised MARBLE (K={K})"]) / n for d in (median, fastest)
    )
    for name in median:
        label = f"mean, a solve every {args.every} x {args.micro} micro-steps" if name == "mean" else name
        m, f = median[name], fastest[name]
        print(f"| {label:<40} | {1e3 * m:>11.1f} | {m / base:>8.3f}x | {1e3 * f:>9.1f} | "
              f"{f / fastest['single reward']:>8.3f}x |")  # fmt: skip
    for k, seconds, method in qp_rows:
        label = f"QP alone, K={k} ({method})"
        print(f"| {label:<40} | {1e3 * seconds:>11.2f} | {seconds / base:>8.4f}x | {'':>9} | {'':>9} |")


if __name__ == "__main__":
    main()
