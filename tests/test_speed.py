"""Speed settings of the model section: attention backends, bf16 autocast and torch.compile give the float32 eager
velocity within a stated tolerance, keep log-probs float32 and the importance ratio 1, and bad values are
ConfigErrors naming the key."""

import pytest
import torch

from diffalign.algorithms.flow_grpo import FlowGRPOJob, FlowGRPOTrainer, GRPOMicro
from diffalign.config import CPU_ATTENTION_BACKENDS, ConfigError, ModelConfig, SampleJob, load_config
from diffalign.pipelines import wrap_pipeline
from diffalign.pipelines.sd3 import DispatchJointAttnProcessor
from diffalign.pipelines.tiny import build_tiny
from diffalign.sampling import SDE, sample
from diffalign.training.loop import TrainContext

MAX_LEN = {"sd3": None, "flux": 32, "flux2": 32}
PROMPTS = ["a red circle left of a blue square", "three green triangles"]
#: bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, about 1e-2 over the tiny networks
BF16_RTOL = 3e-2
GPU_BACKENDS = ["flash", "_flash_3", "sage", "xformers", "_native_efficient", "_native_flash", "_native_cudnn"]


def _flow(family: str, seed: int = 0):
    return wrap_pipeline(build_tiny(family, seed), max_sequence_length=MAX_LEN[family])


def _inputs(flow, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    cond = flow.encode_prompt((PROMPTS * batch)[:batch])
    x = torch.randn(batch, *flow.latent_shape(32, 32), generator=g)
    return x, torch.linspace(0.9, 0.2, batch), cond


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -------------------------------------------------------------------------------------------- attention backends
@pytest.mark.parametrize("backend", CPU_ATTENTION_BACKENDS)
def test_each_cpu_backend_gives_the_native_velocity(family, backend):
    flow = _flow(family)
    x, t, cond = _inputs(flow)
    reference = flow.velocity(x, t, cond)  # the stock processors
    flow.set_attention_backend(backend)
    processors = [m.processor for m in flow.transformer.modules() if getattr(m, "processor", None) is not None]
    assert processors and all(p._attention_backend == backend for p in processors)
    if family == "sd3":  # SD3's stock processor calls SDPA directly: it is replaced by the dispatching one
        assert all(isinstance(p, DispatchJointAttnProcessor) for p in processors)
    torch.testing.assert_close(flow.velocity(x, t, cond), reference, rtol=1e-5, atol=1e-5)


def test_dispatching_sd3_processor_keeps_lora_gradients():
    flow = _flow("sd3")
    flow.add_lora(rank=2, alpha=2, init="gaussian")
    x, t, cond = _inputs(flow)
    flow.transformer.zero_grad()
    flow.velocity(x, t, cond).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in flow.transformer.named_parameters() if p.requires_grad}
    flow.transformer.zero_grad()
    flow.set_attention_backend("_native_math")
    flow.velocity(x, t, cond).square().mean().backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(flow.transformer.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_each_installed_gpu_backend_gives_the_native_velocity(family, backend):
    try:
        ModelConfig(path="x", attention_backend=backend)
    except ConfigError as e:
        pytest.skip(str(e))
    flow = _flow(family)
    flow.pipe.to("cuda", torch.bfloat16)
    x, t, cond = _inputs(flow)
    reference = flow.velocity(x.cuda(), t.cuda(), cond.to("cuda"))
    flow.set_attention_backend(backend)
    v = flow.velocity(x.cuda(), t.cuda(), cond.to("cuda"))
    assert _relative_error(v, reference) < BF16_RTOL


# -------------------------------------------------------------------------------------------- autocast
def test_bf16_autocast_velocity_is_close_and_float32_and_log_probs_stay_float32(family):
    flow = _flow(family)
    x, t, cond = _inputs(flow, batch=4)
    reference = flow.velocity(x, t, cond)
    flow.set_autocast("bfloat16")
    v = flow.velocity(x, t, cond)
    assert v.dtype == torch.float32
    assert 0 < _relative_error(v, reference) < BF16_RTOL  # > 0: the forward really ran in bf16
    times = flow.time_grid(4, 32, 32)
    sde = SDE(kind="flow_sde", noise_level=0.7)
    traj = sample(flow, cond, times, x_init=x, generator=torch.Generator().manual_seed(0), sde=sde)
    assert traj.states.dtype == torch.float32 and traj.log_probs.dtype == torch.float32
    flow.set_autocast(None)
    exact = sample(flow, cond, times, x_init=x, generator=torch.Generator().manual_seed(0), sde=sde)
    assert _relative_error(traj.states[:, -1], exact.states[:, -1]) < BF16_RTOL


def test_auto_autocast_is_bf16_only_where_the_device_runs_it_natively(monkeypatch, caplog):
    from diffalign.pipelines import base

    flow = _flow("sd3")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(base, "native_bf16", lambda device, native=native: native)
        flow.set_autocast("auto")
        assert flow.autocast == expected
    with caplog.at_level("WARNING", logger="diffalign.pipelines"):
        flow.set_autocast("bfloat16")  # still honoured where it is emulated, with a warning
    assert flow.autocast == torch.bfloat16 and "without native bf16" in caplog.text
    assert base.native_bf16(torch.device("cpu")) == (
        torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    )


# -------------------------------------------------------------------------------------------- compile
def test_compiled_velocity_equals_eager(one_thread, monkeypatch):
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing inductor leaves there
    flow = _flow("sd3")
    x, t, cond = _inputs(flow)
    reference = flow.velocity(x, t, cond)
    flow.compile()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.expanduser("~/.cache/diffalign/inductor")
    torch.testing.assert_close(flow.velocity(x, t, cond), reference, rtol=1e-4, atol=1e-5)
    assert flow.transformer._compiled_call_impl is not None  # the module itself is compiled, names unchanged
    assert all("_orig_mod" not in n for n, _ in flow.transformer.named_parameters())


# -------------------------------------------------------------------------------------------- the ratio stays 1
@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny("sd3").save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.mark.parametrize("model", [{"autocast": "bfloat16"}, {"attention_backend": "_native_math"}])
def test_ratio_is_one_before_the_first_update_with_speed_settings(tiny_sd3, tmp_path, model, one_thread):
    data = {
        "output_dir": str(tmp_path / "run"), "seed": 3,
        "model": {"family": "sd3", "path": str(tiny_sd3 / "sd3"), **model},
        "lora": {"rank": 4, "alpha": 8}, "prompts": str(tiny_sd3 / "prompts.txt"),
        "eval_sets": {"eval": {"prompts": str(tiny_sd3 / "prompts.txt")}},
        "rewards": [{"name": "reward_fixtures:Redness"}],
        "train": {"epochs": 1, "eval_every": 10, "checkpoint_every": 10},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
        "flow_grpo": {"prompts_per_epoch": 2, "group_size": 4, "batch_size": 8, "num_steps": 4,
                      "guidance_scale": 2.0, "beta": 0.04},
    }  # fmt: skip
    trainer = FlowGRPOTrainer(TrainContext(load_config(FlowGRPOJob, data)))
    assert trainer.flow.autocast == (torch.bfloat16 if "autocast" in model else None)
    batch = trainer.collect(0)
    rows = torch.arange(8)
    for j in range(batch.train_steps.shape[1]):
        with torch.no_grad():
            info = trainer.loss(batch, GRPOMicro(rows, j, 8))
        assert info["ratio"].dtype == torch.float32
        torch.testing.assert_close(info["ratio"], torch.ones(8), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- bad values
def test_bad_speed_settings_are_config_errors_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"'model.attention_backend'.*unknown attention backend 'fastest'"):
        load_config(SampleJob, {"model": {"path": "x", "attention_backend": "fastest"}})
    with pytest.raises(ConfigError, match=r"'model.attention_backend'.*'xformers' is not installed"):
        load_config(SampleJob, {"model": {"path": "x", "attention_backend": "xformers"}})
    with pytest.raises(ConfigError, match=r"'model.autocast'.*'int8'"):
        load_config(SampleJob, {"model": {"path": "x", "autocast": "int8"}})
    flow = _flow("sd3")
    with pytest.raises(ConfigError, match=r"'model.attention_backend'.*'_native_flash' does not run on a CPU"):
        flow.set_attention_backend("_native_flash")
    from torch._inductor import config as inductor

    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "g++"))
    with pytest.raises(ConfigError, match=r"'model.compile'.*C\+\+ compiler"):
        load_config(SampleJob, {"model": {"path": "x"}}, ["model.compile=true"])


# -------------------------------------------------------------------------------------------- the world evaluator
def test_world_evaluator_detects_each_image_once_and_judges_as_before(monkeypatch):
    import numpy as np

    from diffalign.world import evaluator
    from diffalign.world.render import render, sample_scene

    prompt = "a photo of a red circle left of a blue square"
    image = render(sample_scene(prompt, np.random.default_rng(0)))
    expected = evaluator.judge(evaluator.as_spec(prompt), evaluator.detect_objects(image))
    calls = []
    detect = evaluator.detect_objects
    monkeypatch.setattr(evaluator, "detect_objects", lambda arr: calls.append(1) or detect(arr))
    monkeypatch.setattr(evaluator, "_DETECTED", type(evaluator._DETECTED)())
    verdicts = [evaluator.evaluate(image, prompt), *evaluator.evaluate_batch(image[None].repeat(2, 0), [prompt] * 2)]
    assert len(calls) == 1 and all(v == expected for v in verdicts)
    evaluator.evaluate(1 - image, prompt)  # another image is detected anew
    assert len(calls) == 2
