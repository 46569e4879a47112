"""``diffalign release``: a run folder -> a folder that stock diffusers loads and that reproduces the run's own
samples, its model card (metadata, evaluation, a snippet that runs), few-step schedules, the push preflight and
bad input.

Run folders are made by hand the way the training loop leaves them (``config.yaml``, ``final/`` written by the
adapter's ``save_lora`` or a transformer's ``save_pretrained``, ``eval_*.json``, ``grids/``, ``curves.png``); the
release reads nothing else.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from huggingface_hub import ModelCard
from PIL import Image

from diffalign.cli import main
from diffalign.pipelines import load_flow_model, resolve_model_path
from diffalign.pipelines.tiny import build_tiny
from diffalign.release import ReleaseError, release
from diffalign.sampling import sample

WORLD = "builtin:world-sd3"
PROMPT = "a photo of a red circle"
EVAL = {"reward/world": 0.5, "monitor/world_strict": 0.25, "world/overall": 0.2, "world/colors": 0.5,
        "diversity": 0.125}  # fmt: skip


def _config(base, out, steps=4, size=64, **extra):
    return {
        "output_dir": str(out), "seed": 0,
        "model": {"family": "sd3", "path": str(base), "dtype": "float32", "device": "auto", "lora": None,
                  "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": None},
        "prompts": "world:train", "eval_prompts": "world:test",
        "rewards": [{"name": "world", "weight": 1.0, "label": None, "args": {}}],
        "monitors": [{"name": "world", "weight": 1.0, "label": "world_strict", "args": {"mode": "correct"}}],
        "train": {"epochs": 2, "eval_images_per_prompt": 2},
        "sampling": {"num_steps": steps, "height": size, "width": size, "guidance_scale": 3.0, "guidance": None,
                     "shift": None, "sde": "ode", "noise_level": 0.7},
        "kind": "train", "algorithm": "flow_grpo", **extra,
    }  # fmt: skip


def _write_run(run, config, *, lora_flow=None, transformer=None, evals=True):
    """A run folder as the training loop writes it; ``final/`` from ``lora_flow.save_lora`` or a transformer."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if lora_flow is not None:
        lora_flow.save_lora(run / "final")
    elif transformer is not None:
        transformer.save_pretrained(run / "final")
    if evals:
        (run / "eval_before.json").write_text(json.dumps({"epoch": 0, **EVAL}))
        (run / "eval_after.json").write_text(json.dumps({"epoch": 2, **{k: v + 0.25 for k, v in EVAL.items()}}))
        (run / "grids").mkdir()
        for name in ("grids/before.png", "grids/after.png", "curves.png"):
            Image.new("RGB", (8, 8), (200, 30, 30)).save(run / name)
    return run


def _trained_lora(flow, seed=0):
    """Give ``flow`` a LoRA whose weights are non-zero (a fresh LoRA's B is zero and changes nothing)."""
    flow.add_lora(rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return flow


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    build_tiny("sd3").save_pretrained(root / "sd3")
    return root / "sd3"


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A LoRA run on the shipped world model (the ``builtin:`` path the card's snippet must resolve)."""
    root = tmp_path_factory.mktemp("world")
    flow = _trained_lora(load_flow_model("sd3", WORLD, max_sequence_length=16))
    return _write_run(root / "run", _config(WORLD, root / "run"), lora_flow=flow)


def _adapter_latents(flow, steps, size, seed=0, times=None):
    """The run's own sample (diffalign's ODE sampler, CFG 3) for the noise ``torch.Generator().manual_seed(seed)``
    draws, as the stock pipeline draws it."""
    shape = flow.latent_shape(size, size)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    times = flow.time_grid(steps, size, size) if times is None else times
    return sample(flow, flow.encode_prompt([PROMPT]), times, x_init=noise, guidance_scale=3.0).final


def _stock_latents(pipe, steps, size, seed=0, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.0, height=size, width=size,
                max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="latent",
                **kw).images  # fmt: skip


def _python_block(card_text):
    blocks = re.findall(r"```python\n(.*?)```", card_text, re.S)
    assert len(blocks) == 1
    return blocks[0]


# -------------------------------------------------------------------------------------------- LoRA release
def test_lora_release_loads_in_stock_diffusers_and_gives_the_runs_output(world_run, tmp_path):
    out = release(world_run, tmp_path / "rel")
    assert sorted(os.listdir(out)) == ["README.md", "images", "pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["after.png", "before.png", "curves.png"]

    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model_path(WORLD))
    base = _stock_latents(pipe, 4, 64)
    pipe.load_lora_weights(out)
    stock = _stock_latents(pipe, 4, 64)
    ours = _adapter_latents(load_flow_model("sd3", WORLD, lora=world_run / "final", max_sequence_length=16), 4, 64)
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    assert (stock - base).abs().max() > 1e-2  # the LoRA matters: a release without it would fail the check


def test_model_card_metadata_evaluation_and_snippet_that_runs_as_written(world_run, tmp_path, monkeypatch):
    out = release(world_run, tmp_path / "rel")
    card = ModelCard.load(os.path.join(out, "README.md"))
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "lora", "text-to-image", "flow-grpo", "sd3"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # a built-in base: the project's license
    assert "base_model" not in data  # a built-in base is no Hub model (the Hub rejects a base_model it lacks)
    assert data["widget"][0]["output"]["url"] == "images/after.png"
    text = card.text
    assert "arXiv:2505.05470" in text  # Flow-GRPO's paper, read from the algorithm's module
    assert "`world`" in text and "`world` (as `world_strict`)" in text  # rewards and monitors
    for key, value in EVAL.items():  # every numeric key, before -> after
        assert re.search(rf"\| `{re.escape(key)}` \| {value:.4g} \| {value + 0.25:.4g} \|", text), key
    assert (world_run / "config.yaml").read_text().strip() in text
    for name in ("after", "before", "curves"):
        assert f"(images/{name}.png)" in text

    code = _python_block(text)
    assert 'resolve_model_path("builtin:world-sd3")' in code and f'"{out}"' in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102 - the card's own snippet, as written
    image = Image.open(tmp_path / "sample.png")
    assert image.size == (64, 64)
    ours = load_flow_model("sd3", WORLD, lora=world_run / "final", max_sequence_length=16)
    shape = ours.latent_shape(64, 64)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    latents = sample(ours, ours.encode_prompt([re.search(r'image = pipe\(\n    "(.*?)"', code)[1]]),
                     ours.time_grid(4, 64, 64), x_init=noise, guidance_scale=3.0).final  # fmt: skip
    expected = (ours.decode_latents(latents)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    got = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.uint8).reshape(64, 64, 3)
    assert (got.int() - expected.int()).abs().max() <= 1  # the snippet's image is the run's own sample


def test_card_with_a_repo_id_and_a_hub_base(tiny_base, tmp_path):
    flow = _trained_lora(load_flow_model("sd3", tiny_base, max_sequence_length=16))
    run = _write_run(tmp_path / "run", _config(tiny_base, tmp_path / "run", size=32), lora_flow=flow, evals=False)
    sd35 = "stabilityai/stable-diffusion-3.5-medium"
    out = release(run, tmp_path / "rel", repo_id="someone/tiny-lora", base_model=sd35)
    card = ModelCard.load(os.path.join(out, "README.md"))
    data = card.data.to_dict()
    assert data["base_model"] == sd35 and data["base_model_relation"] == "adapter"
    assert data["license"] == "other" and data["license_name"] == "stabilityai-ai-community"
    assert data["model_name"] == "tiny-lora" and "widget" not in data and "## Evaluation" not in card.text
    code = _python_block(card.text)
    assert '"someone/tiny-lora"' in code and f'"{sd35}"' in code
    # the same snippet with the Hub ids pointing at the local copies runs and loads the released LoRA
    code = code.replace('"someone/tiny-lora"', f'"{out}"').replace(f'"{sd35}"', f'"{tiny_base}"')
    code = code.replace('image.save("sample.png")', "")
    namespace = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102
    assert namespace["image"].size == (32, 32) and "default_0" in str(namespace["pipe"].get_active_adapters())


# -------------------------------------------------------------------------------------------- whole pipelines
def test_merged_release_loads_with_diffusion_pipeline_and_gives_the_runs_output(world_run, tmp_path):
    out = release(world_run, tmp_path / "merged", merge=True)
    assert {"model_index.json", "transformer", "vae", "scheduler", "README.md"} <= set(os.listdir(out))
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert not getattr(pipe.transformer, "peft_config", None)  # fused and unloaded: plain weights
    ours = _adapter_latents(load_flow_model("sd3", WORLD, lora=world_run / "final", max_sequence_length=16), 4, 64)
    torch.testing.assert_close(_stock_latents(pipe, 4, 64), ours, rtol=1e-4, atol=1e-4)
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert "lora" not in card.data.tags and f'from_pretrained("{out}"' in _python_block(card.text)


def test_full_fine_tuning_run_releases_the_pipeline_with_its_transformer(tiny_base, tmp_path):
    flow = load_flow_model("sd3", tiny_base, max_sequence_length=16)
    with torch.no_grad():
        for p in flow.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    config = _config(tiny_base, tmp_path / "run", size=32, lora={"rank": 0, "alpha": 0.0, "target_modules": None})
    run = _write_run(tmp_path / "run", config, transformer=flow.transformer, evals=False)
    out = release(run, tmp_path / "rel")
    pipe = DiffusionPipeline.from_pretrained(out)
    torch.testing.assert_close(_stock_latents(pipe, 3, 32), _adapter_latents(flow, 3, 32), rtol=1e-4, atol=1e-5)
    base = _stock_latents(DiffusionPipeline.from_pretrained(tiny_base), 3, 32)
    assert (base - _stock_latents(pipe, 3, 32)).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- few-step students
def test_student_sigmas_are_used_as_given_by_stock_diffusers(tiny_base, tmp_path):
    flow = _trained_lora(load_flow_model("sd3", tiny_base, max_sequence_length=16))
    run = _write_run(tmp_path / "run", _config(tiny_base, tmp_path / "run", size=32), lora_flow=flow, evals=False)
    times = [1.0, 0.75, 0.5, 0.25]
    (run / "final" / "sigmas.json").write_text(json.dumps(times))
    out = release(run, tmp_path / "rel")
    assert json.loads(open(os.path.join(out, "sigmas.json")).read()) == times
    code = _python_block(ModelCard.load(os.path.join(out, "README.md")).text)
    assert f"sigmas={times!r}" in code and 'subfolder="scheduler"' in code

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_base)
    assert pipe.scheduler.config.shift != 1.0  # the base shifts its schedule; the student's times must not be
    pipe.load_lora_weights(out)
    pipe.scheduler = type(pipe.scheduler).from_pretrained(out, subfolder="scheduler")
    stock = _stock_latents(pipe, None, 32, sigmas=times)
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([*times, 0.0]))
    ours = _adapter_latents(flow, None, 32, times=torch.tensor([*times, 0.0]))
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)

    merged = release(run, tmp_path / "merged", merge=True)  # the pipeline folder carries the same scheduler
    pipe = DiffusionPipeline.from_pretrained(merged)
    torch.testing.assert_close(_stock_latents(pipe, None, 32, sigmas=times), ours, rtol=1e-4, atol=1e-4)


def test_student_scheduler_config_is_shipped(tiny_base, tmp_path):
    flow = _trained_lora(load_flow_model("sd3", tiny_base, max_sequence_length=16))
    run = _write_run(tmp_path / "run", _config(tiny_base, tmp_path / "run", size=32), lora_flow=flow, evals=False)
    scheduler = DiffusionPipeline.from_pretrained(tiny_base).scheduler
    config = {**scheduler.config, "shift": 2.0, "_class_name": type(scheduler).__name__}
    (run / "final" / "scheduler_config.json").write_text(json.dumps(config))
    lora_out = release(run, tmp_path / "rel")
    assert json.loads(open(os.path.join(lora_out, "scheduler", "scheduler_config.json")).read())["shift"] == 2.0
    merged = release(run, tmp_path / "merged", merge=True)
    assert DiffusionPipeline.from_pretrained(merged).scheduler.config.shift == 2.0


# -------------------------------------------------------------------------------------------- push and bad input
def _cli(args, env_extra=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                **(env_extra or {})})  # fmt: skip
    return subprocess.run([sys.executable, "-m", "diffalign", "release", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_push_without_a_token_or_offline_fails_before_writing_anything(world_run, tmp_path):
    out = tmp_path / "pushed"
    done = _cli([str(world_run), "--out", str(out), "--repo-id", "someone/world-lora", "--push"], tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "needs a Hugging Face token: set HF_TOKEN or run 'hf auth login'" in done.stderr
    done = _cli([str(world_run), "--out", str(out), "--repo-id", "someone/world-lora", "--push"],
                {"HF_TOKEN": "hf_not_a_real_token"}, tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "needs the network, but HF_HUB_OFFLINE is set" in done.stderr, done.stderr
    assert [p for p in os.listdir(tmp_path) if p != "hf"] == []  # no release folder, no temporary folder left


def _error(capsys, argv):
    assert main(["release", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_fails_with_a_clear_error_before_any_work(world_run, tiny_base, tmp_path, capsys):
    out = str(tmp_path / "out")
    empty = tmp_path / "no-final"
    _write_run(empty, _config(WORLD, empty))
    err = _error(capsys, [str(empty), "--out", out])
    assert "has no final weights: expected final/pytorch_lora_weights.safetensors" in err
    assert "is not a run folder: it has no config.yaml" in _error(capsys, [str(tmp_path), "--out", out])
    err = _error(capsys, [str(world_run), "--out", out, "--repo-id", "not a/valid//id"])
    assert "--repo-id 'not a/valid//id' is not a valid Hugging Face repo id" in err
    assert "--push needs --repo-id" in _error(capsys, [str(world_run), "--out", out, "--push"])

    flow = _trained_lora(load_flow_model("sd3", tiny_base, max_sequence_length=16))
    gone = tmp_path / "deleted-base"
    orphan = _write_run(tmp_path / "orphan", _config(gone, tmp_path / "orphan", size=32), lora_flow=flow, evals=False)
    err = _error(capsys, [str(orphan), "--out", out, "--merge"])
    assert f"the base model '{gone}' (config key 'model.path') cannot be found" in err
    hub = _write_run(tmp_path / "hub", _config("someone/not-cached", tmp_path / "hub"), lora_flow=flow, evals=False)
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in _error(
        capsys, [str(hub), "--out", out, "--merge"])  # fmt: skip
    assert not os.path.exists(out)

    os.makedirs(out)
    (tmp_path / "out" / "keep.txt").write_text("x")
    err = _error(capsys, [str(world_run), "--out", out])
    assert "exists and is not empty; choose another folder or pass --force" in err
    assert main(["release", str(world_run), "--out", out, "--force"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "images", "pytorch_lora_weights.safetensors"]
    assert "--out" in _error(capsys, [str(world_run), "--out", str(world_run / "release")])  # inside the run
    with pytest.raises(ReleaseError, match="sigmas.json.*must decrease"):
        (world_run / "final" / "sigmas.json").write_text("[0.5, 1.0]")
        try:
            release(world_run, tmp_path / "x")
        finally:
            os.remove(world_run / "final" / "sigmas.json")
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no temporary folders left


@pytest.mark.parametrize("argv", [["release", "--help"], ["demo", "--help"]])
def test_release_and_demo_help_import_nothing_heavy(argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffalign", *argv], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage: diffalign" in done.stdout
    imported = {line.rpartition("|")[2].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "diffusers", "transformers", "gradio", "huggingface_hub", "numpy", "PIL"}
