"""Images per second of a few-step DMD2 student against its teacher, side by side in one run, with the quality
each reached on the world's held-out split when a run folder is given.

Samplers (``generate``: decode included, 64 px, on the shipped world base ``builtin:world-sd3``):

- teacher: 20 Euler steps with CFG 3 (40 transformer evaluations per image), the world's evaluation sampler;
- teacher, naive 4 steps: the student's schedule with CFG 3 (8 evaluations);
- student: 4 re-noising steps (``dmd.eta`` 1) without CFG (4 evaluations), with the run's LoRA
  (``RUN/final``) or, without ``--run``, an untrained LoRA of the same rank (the same cost).

With ``--run`` the table adds the strict accuracy and partial credit of ``RUN/comparison.json`` (the run's
evaluation of all three on ``world:test``). Rows are the median of ``--repeats`` runs in rotated order after a
warm-up.

    taskset -c 0 python benchmarks/dmd_student.py [--run runs/world-dmd] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffalign.algorithms.dmd import student_sampling  # noqa: E402
from diffalign.config import SamplingConfig  # noqa: E402
from diffalign.pipelines import load_flow_model  # noqa: E402
from diffalign.sampling.generate import generate  # noqa: E402
from diffalign.world import test_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished `configs/world/dmd.yaml` run folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    teacher_cfg = SamplingConfig(num_steps=20, height=64, width=64, guidance_scale=3.0)
    student_cfg = student_sampling(teacher_cfg, [1.0, 0.75, 0.5, 0.25, 0.0], eta=1.0)
    naive_cfg = replace(student_cfg, guidance_scale=3.0, sde="ode")
    teacher = load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16)
    student = load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16,
                              lora=os.path.join(args.run, "final") if args.run else None)  # fmt: skip
    if not args.run:
        student.add_lora(rank=16, alpha=32.0)
    prompts = [p.text for p in test_prompts()[: args.batch]]
    rows = {"teacher, 20 steps, CFG 3": (teacher, teacher_cfg, 40),
            "teacher, naive 4 steps, CFG 3": (teacher, naive_cfg, 8),
            "student, 4 steps": (student, student_cfg, 4)}  # fmt: skip

    def images_per_s(name: str) -> float:
        flow, cfg, _ = rows[name]
        start = time.perf_counter()
        with torch.no_grad():
            generate(flow, prompts, cfg, seed=0, batch_size=args.batch, progress=False)
        return len(prompts) / (time.perf_counter() - start)

    names = list(rows)
    for name in names:  # warm-up
        images_per_s(name)
    found: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            found[name].append(images_per_s(name))

    quality = {}
    if args.run:
        with open(os.path.join(args.run, "comparison.json")) as f:
            summary = json.load(f)
        keys = {"teacher, 20 steps, CFG 3": "teacher", "teacher, naive 4 steps, CFG 3": "teacher_naive",
                "student, 4 steps": "student"}  # fmt: skip
        for name, key in keys.items():
            ev = summary.get(key, {})
            quality[name] = (ev.get("test/world/overall"), ev.get("test/world/partial"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, 64 px, "
          f"median of {args.repeats}")  # fmt: skip
    base = statistics.median(found[names[0]])
    print("| sampler | NFE / image | images/s | vs teacher | strict (world:test) | partial |")
    print("|---|---|---|---|---|---|")
    for name in names:
        speed = statistics.median(found[name])
        strict, partial = quality.get(name, (None, None))
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {rows[name][2]} | {speed:.1f} | {speed / base:.1f}x | {fmt(strict)} | {fmt(partial)} |")


if __name__ == "__main__":
    main()
