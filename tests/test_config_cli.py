"""Configs (schema, YAML, overrides, errors naming the key) and the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from diffalign.cli import main
from diffalign.config import ConfigError, SampleJob, check_output_dir, load_config, resolve_device
from diffalign.pipelines.tiny import build_tiny
from diffalign.training.checkpoint import CheckpointError, save_checkpoint

WORLD_TRAIN = os.path.join(os.path.dirname(__file__), "..", "configs", "world", "flow_grpo.yaml")


def _write(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_resolve_to_typed_dataclass(tmp_path):
    path = _write(tmp_path, {"kind": "sample", "model": {"path": "x"}, "sampling": {"num_steps": 4}})
    job = load_config(SampleJob, path, ["sampling.height=64", "model.dtype=bfloat16", "model.lora=null"])
    assert isinstance(job, SampleJob)
    assert job.sampling.num_steps == 4 and job.sampling.height == 64 and job.model.dtype == "bfloat16"
    assert job.model.lora is None


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"model": {"path": "x", "colour": 1}}, [], "model.colour"),
        ({"model": {"path": "x"}}, ["sampling.num_stepz=3"], "sampling.num_stepz"),
        ({"model": {"path": "x"}, "seed": "abc"}, [], "seed"),
        ({"model": {"path": "x", "family": "sdxl"}}, [], "model.family"),
        ({"model": {"path": "x"}}, ["model.dtype=fp8"], "model.dtype"),
        ({"model": {}}, [], "model.path"),
        ({"model": {"path": "x"}}, ["sampling.num_steps=0"], "sampling.num_steps"),
        ({"model": {"path": "x"}}, ["batch_size"], "key=value"),
        ({"model": {"path": "x"}}, ["model.device=tpu"], "model.device"),
    ],
)
def test_bad_configs_fail_naming_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(SampleJob, _write(tmp_path, {"kind": "sample", **data}), overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SampleJob, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SampleJob, bad)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd3"
    build_tiny("sd3").save_pretrained(path)
    return path


def test_cli_sample_writes_images_grid_index_and_config(tmp_path, tiny_model_dir, capsys):
    config = _write(tmp_path, {"kind": "sample", "model": {"family": "sd3", "path": str(tiny_model_dir)},
                               "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
                               "images_per_prompt": 2, "batch_size": 3})  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  two blue squares  \n")
    out = tmp_path / "out"
    assert main(["sample", str(config), "--prompts", str(prompts), "--out", str(out), "seed=7"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                        "grid.png"]  # fmt: skip
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 2 * 128
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["two blue squares"] * 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["sampling"]["num_steps"] == 3
    # same seed -> same images, independent of batch size
    out2 = tmp_path / "out2"
    assert main(["sample", str(config), "--prompts", str(prompts), "--out", str(out2), "seed=7", "batch_size=1"]) == 0
    for name in ("00000.png", "00003.png"):
        assert Image.open(out / name).tobytes() == Image.open(out2 / name).tobytes()
    # the folder reused for fewer prompts: the images of the earlier run beyond the new ones are removed
    prompts.write_text("a red circle\n")
    assert main(["sample", str(config), "--prompts", str(prompts), "--out", str(out), "seed=7"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    assert len((out / "index.jsonl").read_text().splitlines()) == 2


def test_cli_errors_are_clear(tmp_path, tiny_model_dir, capsys):
    config = _write(tmp_path, {"kind": "sample", "model": {"path": str(tiny_model_dir)},
                               "sampling": {"height": 32, "width": 32}})  # fmt: skip
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["sample", str(config), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    cases = [
        (["sampling.height=30"], "multiples of"),
        (["model.path=" + str(tmp_path / "missing")], "does not exist"),
        (["model.family=sdxl"], "model.family"),
        (["model.family=flux"], "FluxPipeline"),
    ]
    for overrides, message in cases:
        assert main(base + overrides) == 2
        assert message in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["sample", str(config), "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    other = _write(tmp_path, {"kind": "train"}, "train.yaml")
    assert main(["sample", str(other), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "kind: sample" in capsys.readouterr().err


def test_show_config_prints_resolved_yaml(tmp_path, capsys):
    config = _write(tmp_path, {"kind": "sample", "model": {"path": "m"}})
    assert main(["show-config", str(config), "sampling.num_steps=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sampling"]["num_steps"] == 5 and printed["model"]["family"] == "sd3"


def test_devices_are_checked_before_use():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'model.device': unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'model.device': 'cuda' is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="'device'"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}", "device")


def test_output_folder_checks(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "config key 'output_dir'")  # creatable: fine, and not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="'output_dir'.* exists and is not a folder"):
        check_output_dir(tmp_path / "file", "config key 'output_dir'")
    with pytest.raises(ConfigError, match="--out: cannot create .* is a file"):
        check_output_dir(tmp_path / "file" / "run", "--out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="'output_dir'.*cannot write"):
            check_output_dir(folder / "run", "config key 'output_dir'")
    finally:
        folder.chmod(0o755)


@pytest.fixture
def train_calls(monkeypatch):
    """``run_training`` replaced by a recorder (what it is called with; what it raises, if set)."""
    calls = {"jobs": [], "raise": None}

    def fake_run_training(job, trainer_cls):
        calls["jobs"].append(job)
        if calls["raise"] is not None:
            raise calls["raise"]
        return {}

    monkeypatch.setattr("diffalign.training.loop.run_training", fake_run_training)
    return calls


def test_train_fails_on_bad_values_before_any_model_loads(tmp_path, train_calls, capsys):
    (tmp_path / "file").write_text("")
    run = ["train", WORLD_TRAIN, f"output_dir={tmp_path / 'run'}"]
    cases = [
        ([f"output_dir={tmp_path / 'file'}"], "config key 'output_dir'"),
        ([f"output_dir={tmp_path / 'file' / 'run'}"], "config key 'output_dir'"),
        (["model.device=tpu"], "config key 'model.device'"),
        (["sampling.height=512", "sampling.width=512"], "at most 128 pixels"),  # the world model is 64 px
        (["sampling.height=60"], "multiples of 8"),
        (["model.family=flux"], "config key 'model.family'"),
    ]
    for overrides, message in cases:
        assert main(run + overrides) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert train_calls["jobs"] == [] and not (tmp_path / "run").exists()
    assert main(run) == 0 and len(train_calls["jobs"]) == 1  # the same command with good values gets to training


def test_ctrl_c_prints_the_resume_hint_and_exits_130(tmp_path, train_calls, capsys):
    train_calls["raise"] = KeyboardInterrupt()
    run = ["train", WORLD_TRAIN, f"output_dir={tmp_path / 'run'}"]
    assert main(run) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted before the first checkpoint" in err and "starts" in err
    save_checkpoint(tmp_path / "run" / "checkpoints", 10, {"trained": {"w": torch.zeros(1)}})
    assert main(run) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err
    newest = tmp_path / "run" / "checkpoints" / "step-000010"
    assert f"the same command resumes from the newest checkpoint, {newest}" in err


def test_only_the_projects_own_errors_become_one_line(tmp_path, train_calls, capsys):
    run = ["train", WORLD_TRAIN, f"output_dir={tmp_path / 'run'}"]
    for error in (FloatingPointError("loss is not finite at epoch 3"), CheckpointError("step-1 is corrupt")):
        train_calls["raise"] = error
        assert main(run) == 2
        assert capsys.readouterr().err.strip() == f"diffalign train: error: {error}"
    for error in (ValueError("a bug"), TypeError("another bug"), KeyError("x")):  # programming errors keep tracebacks
        train_calls["raise"] = error
        with pytest.raises(type(error)):
            main(run)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["score", "--help"], ["sample", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """``diffalign --help`` must answer at once: no torch, diffusers, ... (each command imports its own modules)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffalign", *argv], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage: diffalign" in done.stdout
    imported = {line.rpartition("|")[2].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "diffalign" in imported
    assert not imported & {"torch", "diffusers", "transformers", "accelerate", "numpy", "PIL", "omegaconf", "yaml"}


def test_overrides_of_a_table_replace_it_whole_or_add_and_set_entries():
    from diffalign.algorithms.flow_grpo import FlowGRPOJob

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "world", "flow_grpo.yaml")
    job = load_config(FlowGRPOJob, path, ["eval_sets={mine: {prompts: 'world:train', images_per_prompt: 8}}"])
    assert list(job.eval_sets) == ["mine"] and job.eval_sets["mine"].images_per_prompt == 8
    job = load_config(FlowGRPOJob, path, ["eval_sets.mine.prompts=world:train", "eval_sets.test.max_prompts=5"])
    assert list(job.eval_sets) == ["test", "test_seen", "train", "mine"] and job.eval_sets["test"].max_prompts == 5
    job = load_config(FlowGRPOJob, path, ["model={path: elsewhere}"])  # a schema section: only the key named
    assert job.model.path == "elsewhere" and job.model.family == "sd3"


def test_yaml_no_is_a_string_and_exponents_are_floats(tmp_path):
    """``mixed_precision: no`` (a file or an override) is the string 'no', not YAML 1.1's False; 1e-3 is a float;
    boolean fields still take true / false."""
    from diffalign.algorithms.flow_grpo import FlowGRPOJob

    path = tmp_path / "job.yaml"
    path.write_text("model: {path: x}\ntrain: {mixed_precision: no, lr: 1e-3, gradient_checkpointing: true}\n")
    job = load_config(FlowGRPOJob, path)
    assert job.train.mixed_precision == "no" and job.train.lr == 0.001 and job.train.gradient_checkpointing is True
    job = load_config(FlowGRPOJob, path, ["train.mixed_precision=bf16", "train.mixed_precision=no",
                                          "train.lr=5e-4", "train.gradient_checkpointing=false"])  # fmt: skip
    assert job.train.mixed_precision == "no" and job.train.lr == 0.0005 and job.train.gradient_checkpointing is False


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "configs" / "world").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_world_config_resolves_as_written(path):
    from diffalign.cli import _load_job
    from diffalign.config import read_kind

    kind = read_kind(str(path))
    assert _load_job(kind, str(path), []).kind == kind
