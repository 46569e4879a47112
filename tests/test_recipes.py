"""The real-model recipes (configs/sd35m, configs/flux1, configs/flux2): each resolves as written, its epoch splits
over 1, 2, 4 and 8 processes, and the same recipe on a tiny random model of its family (only the model path, the
rewards, the sizes and the output folder overridden) trains an epoch and exports its LoRA."""

from pathlib import Path

import pytest

from diffalign.algorithms import ALGORITHMS
from diffalign.config import load_config, read_kind
from diffalign.pipelines.tiny import build_tiny, tiny_flux
from diffalign.training.loop import run_training
from diffalign.training.trainer import derive_layout

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"sd35m": "sd3", "flux1": "flux", "flux2": "flux2"}
RECIPES = sorted(str(p.relative_to(ROOT)) for folder in FAMILIES for p in (ROOT / "configs" / folder).glob("*.yaml"))
# per algorithm: tiny sizes, and the section whose global sizes must split over the processes
TINY = {
    "flow_grpo": ["flow_grpo.prompts_per_epoch=2", "flow_grpo.group_size=2", "flow_grpo.batch_size=2",
                  "flow_grpo.num_steps=4", "flow_grpo.updates_per_epoch=1", "flow_grpo.window_range=[0,4]"],
    "nft": ["nft.prompts_per_epoch=2", "nft.group_size=2", "nft.batch_size=2", "nft.num_steps=3",
            "nft.updates_per_epoch=1"],
    "dmd": ["dmd.batch_size=2", "sampling.num_steps=8"],
}  # fmt: skip


def _algorithm(recipe: str) -> str:
    import yaml

    assert read_kind(ROOT / recipe) == "train"
    return yaml.safe_load((ROOT / recipe).read_text())["algorithm"]


def test_every_recipe_folder_has_recipes():
    assert {Path(r).parts[1] for r in RECIPES} == set(FAMILIES)
    assert {_algorithm(r) for r in RECIPES} == {"flow_grpo", "nft", "dmd"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_resolves_and_splits_over_any_gpu_count(recipe):
    algorithm = _algorithm(recipe)
    job = load_config(ALGORITHMS[algorithm][0], ROOT / recipe)
    assert job.model.family == FAMILIES[Path(recipe).parts[1]] and job.lora.rank == 32
    if algorithm in ("flow_grpo", "nft"):
        section = getattr(job, algorithm)
        for processes in (1, 2, 4, 8):
            local = derive_layout(section.prompts_per_epoch * section.group_size, processes, section.batch_size,
                                  f"{algorithm}.batch_size")  # fmt: skip
            assert local // section.batch_size >= section.updates_per_epoch


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_on_a_tiny_model_of_its_family(recipe, tmp_path, one_thread):
    algorithm, family = _algorithm(recipe), FAMILIES[Path(recipe).parts[1]]
    # FLUX.1-dev's recipe uses its distilled guidance embedding (no CFG pass): so does its tiny stand-in
    tiny = tiny_flux(guidance_embeds=True) if family == "flux" else build_tiny(family)
    tiny.save_pretrained(tmp_path / "model")
    job_cls, trainer = ALGORITHMS[algorithm]
    base = load_config(job_cls, ROOT / recipe)
    rewards = "[{name: 'reward_fixtures:Redness'}, {name: 'reward_fixtures:Blueness'}]" if len(base.rewards) > 1 \
        else "[{name: 'reward_fixtures:Redness'}]"  # fmt: skip
    overrides = [f"model.path={tmp_path / 'model'}", "model.dtype=float32", "model.max_sequence_length=16",
                 f"output_dir={tmp_path / 'run'}", f"rewards={rewards}", "train.epochs=1", "train.max_eval_prompts=2",
                 "train.mixed_precision=no", "train.gradient_checkpointing=false", "sampling.height=32",
                 "sampling.width=32", "sampling.num_steps=2", *TINY[algorithm]]  # fmt: skip
    run_training(load_config(job_cls, ROOT / recipe, overrides), trainer)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
