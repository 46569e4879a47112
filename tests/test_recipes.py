"""The real-model recipes (configs/sd35m, configs/flux1, configs/flux2): each resolves as written, its epoch splits
over 1, 2, 4 and 8 processes, and the same recipe on a tiny random model of its family (only the model path, the
reward, the sizes and the output folder overridden) trains an epoch and exports a LoRA."""

from pathlib import Path

import pytest

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer
from diffalign.config import load_config
from diffalign.pipelines.tiny import build_tiny, tiny_flux
from diffalign.training.loop import run_training
from diffalign.training.trainer import derive_layout

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd35m": "sd3", "flux1": "flux", "flux2": "flux2"}


@pytest.mark.parametrize("folder", sorted(RECIPES))
def test_recipe_resolves_and_splits_over_any_gpu_count(folder):
    job = load_config(FlowGRPOJob, ROOT / "configs" / folder / "flow_grpo_pickscore.yaml")
    assert job.model.family == RECIPES[folder] and job.lora.rank == 32
    g = job.flow_grpo
    for processes in (1, 2, 4, 8):
        local = derive_layout(g.prompts_per_epoch * g.group_size, processes, g.batch_size, "flow_grpo.batch_size")
        assert local // g.batch_size >= g.updates_per_epoch


@pytest.mark.parametrize("folder", sorted(RECIPES))
def test_recipe_trains_on_a_tiny_model_of_its_family(folder, tmp_path, one_thread):
    family = RECIPES[folder]
    # FLUX.1-dev's recipe uses its distilled guidance embedding (no CFG pass): so does its tiny stand-in
    tiny = tiny_flux(guidance_embeds=True) if family == "flux" else build_tiny(family)
    tiny.save_pretrained(tmp_path / "model")
    overrides = [f"model.path={tmp_path / 'model'}", "model.dtype=float32", "model.max_sequence_length=16",
                 "train.max_eval_prompts=2", f"output_dir={tmp_path / 'run'}",
                 "rewards=[{name: 'reward_fixtures:Redness'}]", "train.epochs=1", "train.mixed_precision=no",
                 "sampling.height=32", "sampling.width=32", "sampling.num_steps=2", "flow_grpo.prompts_per_epoch=2",
                 "flow_grpo.group_size=2", "flow_grpo.batch_size=2", "flow_grpo.num_steps=4",
                 "flow_grpo.updates_per_epoch=1", "train.gradient_checkpointing=false"]  # fmt: skip
    if family == "flux2":
        overrides.append("flow_grpo.window_range=[0,4]")
    job = load_config(FlowGRPOJob, ROOT / "configs" / folder / "flow_grpo_pickscore.yaml", overrides)
    run_training(job, FlowGRPOTrainer)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
