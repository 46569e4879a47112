"""Speed of the world main job (``configs/world/flow_grpo.yaml``) on this machine, each speed setting side by side
in one run, and our sampling beside the stock ``StableDiffusion3Pipeline``.

For every setting (``model.autocast`` x ``model.compile``; ``auto`` is bf16 only where the CPU has native bf16)
and thread count it builds the job's real trainer (the shipped base ``builtin:world-sd3`` with its rank-16 LoRA,
the world reward and monitors) and measures:

- forward: one transformer forward of a CFG rollout batch (64 rows = 32 prompts x [uncond; cond]), ms;
- rollouts/s: one epoch's ``collect`` (128 SDE rollouts of 10 steps with CFG, log-probs, decode, reward);
- train samples/s: one epoch's ``update`` on them (4 optimizer steps, 2 trained steps per sample);
- eval images/s: one evaluation pass (20-step CFG ODE with the EMA weights, decode, rewards, monitors, the world
  evaluator, the grid) on ``--eval-prompts`` test prompts x 4 images;
- first pass: the seconds of the first collect + update + evaluation (which include compilation).

Then the stock pipeline (``output_type="pt"``, 20 steps, CFG 3, batch 32) beside ``generate`` on the base model.

    python benchmarks/world_speed.py [--threads 1 2] [--settings fp32 bf16 compile compile+bf16] [--eval-prompts 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer  # noqa: E402
from diffalign.config import SamplingConfig, load_config  # noqa: E402
from diffalign.pipelines import load_flow_model  # noqa: E402
from diffalign.sampling.generate import generate  # noqa: E402
from diffalign.training.loop import TrainContext  # noqa: E402
from diffalign.world import test_prompts  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "world", "flow_grpo.yaml")
SETTINGS = {
    "fp32": ["model.autocast=none", "model.compile=false"],
    "bf16": ["model.autocast=bfloat16", "model.compile=false"],
    "compile": ["model.autocast=none", "model.compile=true"],
    "compile+bf16": ["model.autocast=bfloat16", "model.compile=true"],
    "auto": ["model.autocast=auto", "model.compile=false"],
    "compile+auto": ["model.autocast=auto", "model.compile=true"],
}


def machine() -> str:
    """The CPU model, its bf16 instructions and torch's thread setting, in one line."""
    name = platform.processor() or "cpu"
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), name)
        flags = " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in info)
    return f"{name} ({flags or 'no bf16 instructions'}), torch {torch.__version__}"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def forward_ms(trainer: FlowGRPOTrainer, repeats: int = 5) -> float:
    """Median ms of one no-grad transformer forward on a 64-row CFG batch through the policy network."""
    flow = trainer.flow
    cond = flow.encode_prompt([p.text for p in test_prompts()[:32]])
    both = type(cond).cat([flow.empty_cond(32), cond])
    x = torch.randn(64, *trainer.shape, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            times.append(timed(lambda: flow.velocity(x, 0.7, both))[0])
    return 1e3 * sorted(times[2:])[len(times[2:]) // 2]


def measure(setting: str, eval_prompts: int, out: str) -> dict[str, float]:
    overrides = [f"output_dir={out}", f"train.max_eval_prompts={eval_prompts}",
                 "eval_sets={test: {prompts: 'world:test'}}", *SETTINGS[setting]]  # fmt: skip
    trainer = FlowGRPOTrainer(TrainContext(load_config(FlowGRPOJob, CONFIG, overrides)))
    evaluator = trainer.ft.evaluator
    samples = trainer.local
    first = 0.0
    first += timed(lambda: trainer.update(trainer.collect(0), 0))[0]
    first += timed(lambda: evaluator.run(0, "warmup"))[0]
    row = {"forward ms": forward_ms(trainer)}
    t_collect, batch = timed(lambda: trainer.collect(1))
    t_update, _ = timed(lambda: trainer.update(batch, 1))
    t_eval, summary = timed(lambda: evaluator.run(1, "timed"))
    images = len(trainer.ft.eval_sets["test"].prompts)
    row.update({"rollouts/s": samples / t_collect, "train samples/s": samples / t_update,
                "eval images/s": images / t_eval, "first pass s": first,
                "eval strict acc": summary["test/world/overall"]})  # fmt: skip
    return row


def stock_vs_ours(batch: int = 32, steps: int = 20, scale: float = 3.0) -> dict[str, float]:
    """Images/s of the stock pipeline and of ``generate`` (fp32 and bf16 autocast) on the base model."""
    flow = load_flow_model("sd3", "builtin:world-sd3", max_sequence_length=16)
    prompts = [p.text for p in test_prompts()[:batch]]
    cfg = SamplingConfig(num_steps=steps, height=64, width=64, guidance_scale=scale)

    def stock():
        gen = torch.Generator().manual_seed(0)
        return flow.pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=scale, height=64, width=64,
                         max_sequence_length=16, generator=gen, output_type="pt").images  # fmt: skip

    def ours():
        return generate(flow, prompts, cfg, seed=0, batch_size=batch, progress=False)

    out = {}
    for name, fn, autocast in (("stock", stock, None), ("ours fp32", ours, None), ("ours bf16", ours, "bfloat16")):
        flow.set_autocast(autocast)
        fn()  # warm-up
        out[name] = batch / timed(fn)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16", "compile", "compile+bf16"],
                        choices=list(SETTINGS))  # fmt: skip
    parser.add_argument("--eval-prompts", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}")
    columns = ["forward ms", "rollouts/s", "train samples/s", "eval images/s", "first pass s", "eval strict acc"]
    print("| threads | setting | " + " | ".join(columns) + " |", flush=True)
    print("|---" * (len(columns) + 2) + "|", flush=True)
    baseline: dict[int, dict[str, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for setting in args.settings:
            with tempfile.TemporaryDirectory() as out:
                row = measure(setting, args.eval_prompts, out)
            base = baseline.setdefault(threads, row)
            cells = [f"{row['forward ms']:.0f} ({base['forward ms'] / row['forward ms']:.2f}x)"]
            for key in columns[1:4]:
                cells.append(f"{row[key]:.1f} ({row[key] / base[key]:.2f}x)")
            cells += [f"{row['first pass s']:.0f}", f"{row['eval strict acc']:.3f}"]
            print(f"| {threads} | {setting} | " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(args.threads[0])
    rates = stock_vs_ours()
    print("\n20-step CFG sampling of 32 images (decode included), images/s:", flush=True)
    for name, rate in rates.items():
        print(f"  {name}: {rate:.1f} ({rate / rates['stock']:.2f}x the stock pipeline)", flush=True)


if __name__ == "__main__":
    main()
