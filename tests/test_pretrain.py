"""World pretraining at a tiny size: exact resume, plain-diffusers loading, both families, bad configs."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.recipes.world_pretrain import PretrainJob, pretrain
from diffalign.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

TINY = {
    "arch": {"image_size": 32, "vae_blocks": [8, 16], "layers": 1, "single_layers": 1, "heads": 2, "head_dim": 16,
             "text_width": 16, "text_layers": 1, "clip_max_length": 16, "t5_max_length": 12},
    "codec": {"steps": 3, "batch_size": 4},
    "train": {"dataset_size": 64, "steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
              "sample_every": 100, "log_every": 2, "keep_checkpoints": 5},
    "sampling": {"num_steps": 2, "height": 32, "width": 32, "guidance_scale": 2.0},
    "eval_images_per_prompt": 1,
}  # fmt: skip


def _job(tmp_path, name, family="sd3", **extra):
    return load_config(PretrainJob, {**TINY, "family": family, "output_dir": str(tmp_path / name), **extra})


def _transformer_weights(run_dir):
    return load_file(str(run_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    pretrain(_job(tmp, "run"))
    return tmp / "run"


def test_run_writes_pipeline_checkpoints_eval_and_config(finished_run):
    assert (finished_run / "pipeline" / "model_index.json").exists()
    assert [p.rsplit("-", 1)[1] for p in list_checkpoints(finished_run / "checkpoints")] == ["000002", "000004"]
    summary = json.loads((finished_run / "eval.json").read_text())
    assert summary["n"] == 98 and 0.0 <= summary["overall"] <= 1.0
    assert (finished_run / "config.yaml").exists() and list((finished_run / "samples").glob("*.png"))


def test_kill_and_resume_continues_identically(finished_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    # simulate a crash after the step-2 checkpoint: later state is gone
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "pipeline")
    pretrain(_job(tmp_path, "resumed"))
    a, b = _transformer_weights(finished_run), _transformer_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pipeline_loads_and_generates_with_plain_diffusers(finished_run):
    pipe = StableDiffusion3Pipeline.from_pretrained(finished_run / "pipeline")
    out = pipe(prompt=["a photo of a red circle"], height=32, width=32, num_inference_steps=2,
               max_sequence_length=12, output_type="pt").images  # fmt: skip
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_flux_family_pretrains_and_loads(tmp_path):
    pretrain(_job(tmp_path, "flux", family="flux", train={**TINY["train"], "steps": 2}))
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux" / "pipeline")
    out = pipe(prompt=["a photo of a blue square"], height=32, width=32, num_inference_steps=2,
               max_sequence_length=12, guidance_scale=1.0, output_type="pt").images  # fmt: skip
    assert out.shape == (1, 3, 32, 32)


def test_corrupt_checkpoint_is_a_clear_error(finished_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(finished_run / "checkpoints" / "step-000004", broken)
    (broken / "modules" / "transformer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="transformer.safetensors|cannot load"):
        load_checkpoint(broken, {"transformer": torch.nn.Linear(1, 1)})


@pytest.mark.parametrize(
    ("override", "key"),
    [({"arch": {"image_size": 30}}, "arch.image_size"), ({"train": {"cfg_dropout": 1.5}}, "train.cfg_dropout"),
     ({"family": "flux2"}, "family"), ({"train": {"stepz": 3}}, "train.stepz")],
)  # fmt: skip
def test_bad_pretrain_configs(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PretrainJob, {"output_dir": str(tmp_path), **override})
