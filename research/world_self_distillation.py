"""Reward-filtered self-distillation (RAFT-style rejection-sampling fine-tuning) on the embedded world: can the
shipped base learn from its own correct images at all? A ceiling check for Flow-GRPO's strict-accuracy target.

    python -m research.world_self_distillation [--prompts 120] [--per-prompt 24] [--steps 600] [--threads 2]

1. Pool: category-balanced training prompts (``world:train``), ``--per-prompt`` images each with the evaluation
   sampler (20 ODE steps, CFG 3); the world evaluator keeps the strictly correct ones (at most ``--keep`` per
   prompt).
2. Fine-tune the whole transformer on them with the flow-matching loss ``|| v(x_t, t, c) - (eps - x0) ||^2``
   (logit-normal ``t``, the prompt dropped with probability 0.1 as in pre-training), AdamW.
3. Evaluate the base and the tuned model with the evaluation protocol (``--images`` per prompt): on the prompts
   that were trained on (fresh seeds) and on the held-out test split (GenEval-style overall and image-level).

If the tuned model does not gain even on the trained prompts, the model's composition is decided by the noise
draw more than by the prompt, and no reward-driven fine-tuning at this scale can be expected to lift held-out
strict accuracy far.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from diffalign.config import SamplingConfig
from diffalign.pipelines import load_flow_model
from diffalign.recipes.world_benchmark import evaluate_world
from diffalign.sampling.sampler import sample
from diffalign.training.finetuning import load_prompts
from diffalign.types import Cond
from diffalign.world import evaluate_batch, test_prompts
from diffalign.world.prompts import as_spec

SAMPLING = SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)


def balanced_prompts(count: int) -> list[str]:
    """``count`` distinct training prompts, taken round-robin over the categories (seeded shuffle)."""
    pool = sorted(set(load_prompts("world:train", "prompts")))
    random.Random(0).shuffle(pool)
    by_category: dict[str, list[str]] = {}
    for prompt in pool:
        by_category.setdefault(as_spec(prompt).category, []).append(prompt)
    chosen: list[str] = []
    while len(chosen) < min(count, len(pool)):
        for category in sorted(by_category):
            if by_category[category] and len(chosen) < count:
                chosen.append(by_category[category].pop())
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=120, help="training prompts sampled for the pool")
    parser.add_argument("--per-prompt", type=int, default=24, help="pool images per prompt")
    parser.add_argument("--keep", type=int, default=4, help="correct images kept per prompt (at most)")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=8, help="evaluation images per prompt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flow = load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16)
    times, shape = flow.time_grid(20, 64, 64), flow.latent_shape(64, 64)

    start = time.time()
    latents, texts, found = [], [], 0
    with torch.no_grad():
        for i, prompt in enumerate(balanced_prompts(args.prompts)):
            n = args.per_prompt
            generator = torch.Generator().manual_seed(10_000 + i)
            final = sample(flow, flow.encode_prompt([prompt] * n), times, shape=shape, generator=generator,
                           guidance_scale=3.0, uncond=flow.empty_cond(n), keep_states=False).final  # fmt: skip
            verdicts = evaluate_batch(flow.decode_latents(final).numpy(), [prompt] * n)
            correct = [k for k, v in enumerate(verdicts) if v.correct]
            found += len(correct)
            latents.append(final[correct[: args.keep]])
            texts += [prompt] * len(correct[: args.keep])
    data = torch.cat(latents)
    seen = sorted(set(texts))
    print(f"pool: {args.prompts} training prompts x {args.per_prompt} images, {found} correct "
          f"({found / (args.prompts * args.per_prompt):.3f}); kept {len(texts)} from {len(seen)} prompts; "
          f"{time.time() - start:.0f} s")  # fmt: skip

    def evaluate(label: str) -> None:
        on_seen = evaluate_world(flow, seen, SAMPLING, images_per_prompt=args.images, seed=7, progress=False).summary
        held = evaluate_world(flow, test_prompts(), SAMPLING, images_per_prompt=args.images, seed=0,
                              progress=False).summary  # fmt: skip
        print(
            f"{label:>6} {on_seen['image_accuracy']:>13.3f} {on_seen['mean_score']:>13.3f} "
            f"{held['overall']:>16.3f} {held['image_accuracy']:>18.3f} {held['mean_score']:>17.3f}",
            flush=True,
        )

    print(f"{'model':>6} {'trained: acc.':>13} {'trained: score':>13} {'held-out overall':>16} "
          f"{'held-out image acc.':>18} {'held-out score':>17}")  # fmt: skip
    with torch.no_grad():
        evaluate("base")

    with torch.no_grad():
        table = {prompt: flow.encode_prompt([prompt]) for prompt in seen}
        table[""] = flow.empty_cond(1)
    transformer = flow.transformer
    transformer.requires_grad_(True)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(args.steps):
        rows = torch.randint(len(texts), (args.batch,), generator=generator)
        drop = torch.rand(args.batch, generator=generator) < 0.1
        cond = Cond.cat([table["" if d else texts[r]] for r, d in zip(rows.tolist(), drop.tolist(), strict=True)])
        x0 = data[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(flow.velocity(x_t, t, cond), noise - x0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow-matching loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
    transformer.eval()
    transformer.requires_grad_(False)
    seconds = time.time() - start
    with torch.no_grad():
        evaluate("tuned")
    print(f"fine-tuning: {args.steps} steps at batch {args.batch}, lr {args.lr}, {seconds:.0f} s")


if __name__ == "__main__":
    main()
