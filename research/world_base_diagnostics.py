"""What limits the shipped world base model's accuracy? Three checks, each printing its numbers.

    python -m research.world_base_diagnostics [--threads 1] [--continue-steps 4000] [--eval-every 2000]
        [--cosine] [--train-text-encoders] [--only-continue]

1. **Codec ceiling**: renders of the held-out prompts (4 scenes each), encoded and decoded by the shipped VAE, then
   judged by the world evaluator. If this were below 1, the codec or the evaluator would cap any model.
2. **Memorisation**: the base is fine-tuned (flow matching, 300 steps, lr 3e-4) on one of its own correct samples
   for each of 6 training prompts; then 16 fresh samples per prompt are judged. Rising accuracy and a falling
   distance to the taught latent show the transformer can draw correct images when taught them.
3. **Longer pre-training**: the pre-training objective continued from the shipped weights on fresh training
   scenes (batch 32, lr 3e-4 after 100 warm-up steps, EMA 0.999), with the held-out benchmark (4 images per
   prompt) and every 8th training prompt (2 images each) scored every ``--eval-every`` steps. ``--cosine`` decays
   the learning rate to 0 over the run (the shipped base itself ended a cosine schedule, so a constant rate leaves
   it un-annealed); ``--train-text-encoders`` also trains the three (random, frozen in the base) text encoders,
   encoding each batch's prompts with gradients, to test whether the prompt features limit the base.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.config import SamplingConfig
from diffalign.pipelines import FlowModel, load_flow_model
from diffalign.recipes.world_benchmark import evaluate_world
from diffalign.sampling.sampler import sample
from diffalign.training.ema import EMA
from diffalign.types import Cond
from diffalign.world import evaluate_batch, test_prompts
from diffalign.world.evaluator import summarize
from diffalign.world.prompts import train_prompts
from diffalign.world.render import dataset_examples, render, sample_scene

SAMPLING = SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)


def load_base() -> FlowModel:
    return load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16)


def flow_matching_step(
    flow: FlowModel, optimizer, x0, cond: Cond, generator: torch.Generator, clipped: torch.nn.Module | None = None
) -> float:
    """One step of ``|| v(x_t, t, c) - (eps - x0) ||^2`` with SD3's logit-normal ``t``."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    loss = F.mse_loss(flow.velocity(x_t, t, cond), noise - x0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"flow-matching loss is {float(loss)}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_((clipped or flow.transformer).parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def draw(flow: FlowModel, prompt: str, n: int, seed: int) -> torch.Tensor:
    """``n`` latents for ``prompt`` with the evaluation sampler."""
    with torch.no_grad():
        cond, times = flow.encode_prompt([prompt] * n), flow.time_grid(20, 64, 64)
        gen = torch.Generator().manual_seed(seed)
        return sample(flow, cond, times, shape=flow.latent_shape(64, 64), generator=gen, guidance_scale=3.0,
                      uncond=flow.empty_cond(n), keep_states=False).final  # fmt: skip


def codec_ceiling(flow: FlowModel) -> None:
    rng = np.random.default_rng(0)
    prompts = [p for p in test_prompts() for _ in range(4)]
    images = np.stack([render(sample_scene(p, rng)) for p in prompts]).astype(np.float32)
    with torch.no_grad():
        decoded = flow.decode_latents(flow.encode_images(torch.from_numpy(images))).numpy()
    for label, batch in (("renders", images), ("renders through the VAE", decoded)):
        summary = summarize(prompts, evaluate_batch(batch, prompts))
        print(f"codec ceiling: {label:<24} overall {summary['overall']:.3f}  image-level "
              f"{summary['image_accuracy']:.3f}  ({len(prompts)} images)")  # fmt: skip


def memorisation(flow: FlowModel, prompts_wanted: int = 6, steps: int = 300, lr: float = 3e-4) -> None:
    pool = [p.text for p in train_prompts()]
    random.Random(1).shuffle(pool)
    chosen, taught = [], []
    for prompt in pool:
        latents = draw(flow, prompt, 16, seed=5)
        correct = [k for k, v in enumerate(evaluate_batch(flow.decode_latents(latents), [prompt] * 16)) if v.correct]
        if correct:
            chosen.append(prompt)
            taught.append(latents[correct[0] : correct[0] + 1])
        if len(chosen) == prompts_wanted:
            break
    data = torch.cat(taught)

    def report(label: str) -> None:
        accuracy, distance = [], []
        for prompt, target in zip(chosen, data, strict=True):
            latents = draw(flow, prompt, 16, seed=99)
            verdicts = evaluate_batch(flow.decode_latents(latents), [prompt] * 16)
            accuracy.append(sum(v.correct for v in verdicts) / 16)
            distance.append(float((latents - target).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()))
        print(f"memorisation: {label:<6} accuracy {sum(accuracy) / len(accuracy):.3f}  per prompt "
              f"{' '.join(f'{a:.2f}' for a in accuracy)}  RMS latent distance to the taught sample "
              f"{' '.join(f'{d:.2f}' for d in distance)}")  # fmt: skip

    report("base")
    with torch.no_grad():
        table = {p: flow.encode_prompt([p]) for p in chosen}
    transformer = flow.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(len(chosen), (32,), generator=generator)
        flow_matching_step(flow, optimizer, data[rows], Cond.cat([table[chosen[r]] for r in rows.tolist()]), generator)
    transformer.eval().requires_grad_(False)
    report("taught")


def longer_pretraining(
    flow: FlowModel, steps: int, every: int, lr: float = 3e-4, cosine: bool = False, train_text: bool = False
) -> None:
    start = time.time()
    texts, images = dataset_examples(20_000, np.random.default_rng([123, 7]), split="train", size=64)
    with torch.no_grad():
        latents = torch.cat(
            [flow.encode_images(torch.from_numpy(images[i : i + 256])) for i in range(0, len(texts), 256)]
        )
        unique = sorted(set(texts)) + [""]
        table = {}
        for i in range(0, len(unique), 64):
            cond = flow.encode_prompt(unique[i : i + 64])
            table.update({p: cond.index(slice(j, j + 1)) for j, p in enumerate(unique[i : i + 64])})
    print(f"longer pre-training: {len(texts)} scenes encoded in {time.time() - start:.0f} s")
    train_subset = [p.text for p in train_prompts()][::8]
    pipe = flow.pipe
    encoders = torch.nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])

    def encode_with_grad(prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=flow.device,
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
        return Cond(embeds=embeds, pooled=pooled, prompts=prompts)

    def report(step: int, seconds: float) -> None:
        flow.__dict__.pop("_empty", None)  # the cached empty-prompt conditioning is stale once encoders train
        with torch.no_grad():
            held = evaluate_world(flow, test_prompts(), SAMPLING, images_per_prompt=4, seed=0, progress=False).summary
            seen = evaluate_world(flow, train_subset, SAMPLING, images_per_prompt=2, seed=0, progress=False).summary
        print(f"longer pre-training: +{step:>5} steps ({seconds:>5.0f} s)  held-out overall {held['overall']:.3f}  "
              f"image-level {held['image_accuracy']:.3f}  training prompts overall {seen['overall']:.3f}",
              flush=True)  # fmt: skip

    report(0, 0.0)
    transformer = flow.transformer.train().requires_grad_(True)
    groups = [{"params": list(transformer.parameters())}]
    if train_text:
        groups.append({"params": list(encoders.requires_grad_(True).parameters())})
    trained = torch.nn.ModuleList([transformer, encoders] if train_text else [transformer])
    optimizer = torch.optim.AdamW(groups, lr=lr)
    ema = EMA(trained, 0.999)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    start = time.time()
    for step in range(1, steps + 1):
        decay = 0.5 * (1 + math.cos(math.pi * max(0, step - 100) / (steps - 100))) if cosine else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 100) * decay
        rows = rng.integers(len(texts), size=32)
        drop = rng.random(32) < 0.1
        prompts = ["" if d else texts[r] for r, d in zip(rows, drop, strict=True)]
        cond = encode_with_grad(prompts) if train_text else Cond.cat([table[p] for p in prompts])
        flow_matching_step(flow, optimizer, latents[torch.from_numpy(rows)], cond, generator, trained)
        ema.update()
        if step % every == 0:
            trained.eval()
            with ema.swapped_in():
                report(step, time.time() - start)
            transformer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--continue-steps", type=int, default=4000, help="longer pre-training steps (0: skip)")
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--cosine", action="store_true", help="decay the continuation's learning rate to 0")
    parser.add_argument("--train-text-encoders", action="store_true", help="train the text encoders too")
    parser.add_argument("--only-continue", action="store_true", help="skip the codec and memorisation checks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.only_continue:
        codec_ceiling(load_base())
        memorisation(load_base())
    if args.continue_steps > 0:
        longer_pretraining(load_base(), args.continue_steps, args.eval_every, cosine=args.cosine,
                           train_text=args.train_text_encoders)  # fmt: skip


if __name__ == "__main__":
    main()
