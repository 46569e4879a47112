"""Configs (schema, YAML, overrides, errors naming the key) and the command line."""

import json

import pytest
import yaml
from PIL import Image

from diffalign.cli import main
from diffalign.config import ConfigError, SampleJob, load_config
from diffalign.pipelines.tiny import build_tiny


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
