"""The trainer seam on tiny real models: LoRA adapter switching on the flow model, two registered modules
(checkpoint layout, exact resume, export), alternating phases, registration errors, and flow matching that
learns."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from seam_fixtures import ToyJob, TwoAdapterTrainer

from diffalign.algorithms.flow_matching import FlowMatchingConfig, FlowMatchingTrainer, LatentDataset, PromptCache
from diffalign.config import ConfigError, load_config
from diffalign.pipelines import wrap_pipeline
from diffalign.pipelines.tiny import build_tiny
from diffalign.training.loop import TrainContext, run_training
from diffalign.training.trainer import Cadence

pytestmark = pytest.mark.usefixtures("one_thread")


def _flow():
    return wrap_pipeline(build_tiny("sd3"), max_sequence_length=16)


def _inputs(flow, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    return x, torch.rand(batch, generator=g), flow.encode_prompt(["a red circle", "a blue square"][:batch])


def _nonzero_lora(flow, adapter, value):
    with torch.no_grad():
        for n, p in flow.transformer.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.fill_(value)


# ------------------------------------------------------------------------------------------------ adapters
def test_adapter_context_selects_one_adapter_or_the_base_and_restores():
    flow = _flow()
    x, t, cond = _inputs(flow)
    with torch.no_grad():
        base = flow.velocity(x, t, cond)
    flow.add_lora(rank=2, alpha=4, adapter_name="gen")
    flow.add_lora(rank=2, alpha=4, adapter_name="fake")  # add_lora activates the adapter it adds
    _nonzero_lora(flow, "gen", 0.05)
    _nonzero_lora(flow, "fake", -0.05)
    with torch.no_grad():
        outside = flow.velocity(x, t, cond)
        with flow.adapter("gen"):
            gen = flow.velocity(x, t, cond)
            with flow.adapter(None):
                nested = flow.velocity(x, t, cond)
            assert torch.equal(flow.velocity(x, t, cond), gen)  # the inner block restored "gen"
        with flow.adapter("fake"):
            fake = flow.velocity(x, t, cond)
        with flow.adapter(None):
            teacher = flow.velocity(x, t, cond)
    torch.testing.assert_close(teacher, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(nested, base, rtol=0, atol=1e-6)
    assert torch.equal(outside, fake)  # outside any block: the last adapter added, as before
    assert (gen - base).abs().max() > 1e-3 and (fake - base).abs().max() > 1e-3 and (gen - fake).abs().max() > 1e-3
    assert flow.transformer.active_adapters() == ["fake"]
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        with flow.adapter("nope"):
            pass
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        with _flow().adapter(None):
            pass


def test_adapter_context_routes_through_the_adapters_wrapper():
    flow = _flow()
    flow.add_lora(rank=2, alpha=4, adapter_name="gen")
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    flow.use_network(Wrapper(flow.transformer), adapter="gen")
    x, t, cond = _inputs(flow, 1)
    with torch.no_grad():
        flow.velocity(x, t, cond)
        assert not calls
        with flow.adapter("gen"):
            flow.velocity(x, t, cond)
        assert calls == [1]
        with flow.adapter(None):
            flow.velocity(x, t, cond)
    assert calls == [1] and flow.network is flow.transformer


# ------------------------------------------------------------------------------------------------ two modules
def _run(out, epochs=3):
    return run_training(load_config(ToyJob, {"output_dir": str(out), "epochs": epochs}), TwoAdapterTrainer)


def _tensors(folder):
    return {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("*.safetensors"))}


def _torch_files(folder):
    return {str(p.relative_to(folder)): torch.load(p, weights_only=True) for p in sorted(folder.rglob("*.pt"))}


def test_two_modules_checkpoint_resume_and_export_exactly(tmp_path):
    out = tmp_path / "run"
    _run(out)
    ckpt = out / "checkpoints" / "step-000003"
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["modules/fake_score.safetensors", "modules/generator.ema.safetensors",
                     "modules/generator.safetensors", "optimizers/fake_score.pt", "optimizers/generator.pt",
                     "rng.safetensors", "schedulers/fake_score.pt", "schedulers/generator.pt",
                     "state.json"]  # fmt: skip
    gen = load_file(str(ckpt / "modules" / "generator.safetensors"))
    fake = load_file(str(ckpt / "modules" / "fake_score.safetensors"))
    assert gen and fake and all(".gen." in k for k in gen) and all(".fake." in k for k in fake)
    final = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    critic = load_file(str(out / "final" / "fake_score" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == critic.keys() and any(not torch.equal(final[k], critic[k]) for k in final)
    for lora in (final, critic):  # both adapters trained (lora_B starts at zero)
        moved = [bool(v.abs().max() > 0) for k, v in lora.items() if "lora_B" in k]
        assert sum(moved) >= len(moved) - 1, moved  # the last block's context query gets no gradient in SD3
    ema = load_file(str(ckpt / "modules" / "generator.ema.safetensors"))
    exported_b = [v for k, v in sorted(final.items()) if "lora_B" in k]
    shadow_b = [v for k, v in sorted(ema.items()) if "lora_B" in k]
    assert all(torch.equal(a, b) for a, b in zip(exported_b, shadow_b, strict=True))  # final/ holds the EMA

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "final")
    _run(resumed)
    for a, b in (
        (_tensors(out / "final"), _tensors(resumed / "final")),
        (_tensors(ckpt), _tensors(resumed / ckpt.relative_to(out))),
    ):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    a, b = _torch_files(ckpt), _torch_files(resumed / ckpt.relative_to(out))
    for name in ("optimizers/generator.pt", "optimizers/fake_score.pt"):
        sa, sb = a[name]["state"], b[name]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[p]["exp_avg"], sb[p]["exp_avg"]) for p in sa), name
    assert a["schedulers/fake_score.pt"] == b["schedulers/fake_score.pt"]
    assert a["schedulers/fake_score.pt"]["last_epoch"] == 6  # two critic steps per epoch


def test_each_phase_changes_only_its_own_parameters(tmp_path):
    trainer = TwoAdapterTrainer(TrainContext(load_config(ToyJob, {"output_dir": str(tmp_path)})))
    transformer = trainer.flow.transformer
    batch = trainer.collect(0)

    def snapshot():
        return {n: p.detach().clone() for n, p in transformer.named_parameters()}

    def changed(before):
        return {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}

    before = snapshot()
    out = trainer.optimize(batch, 0, [[("fake", 1)]], trainer.loss, ["fake_score"])
    moved = changed(before)
    assert moved and all(".fake." in n for n in moved) and any("lora_B.fake" in n for n in moved)
    assert {"loss_fm", "grad_norm/fake_score"} <= out.keys()
    before = snapshot()
    out = trainer.optimize(batch, 0, [[("gen", 0)]], trainer.loss, ["generator"])
    moved = changed(before)
    assert moved and all(".gen." in n for n in moved) and any("lora_B.gen" in n for n in moved)
    assert {"loss_fm", "loss_teacher", "grad_norm/generator"} <= out.keys()
    assert trainer.ctx.modules["generator"].steps == 1 and trainer.ctx.modules["fake_score"].steps == 1
    assert trainer.ctx.modules["generator"].ema.num_updates == 1


def test_registration_errors(tmp_path):
    ctx = TrainContext(load_config(ToyJob, {"output_dir": str(tmp_path)}))
    net, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ctx.register("a", net, torch.optim.AdamW([net.weight]))
    with pytest.raises(ValueError, match="same parameters"):
        ctx.register("b", net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(ValueError, match="not the module's"):
        ctx.register("c", net, torch.optim.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="must be new"):
        ctx.register("a", other, torch.optim.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="must be new"):
        ctx.register("a.ema", other, torch.optim.AdamW(other.parameters()))
    ctx.prepare()
    with pytest.raises(RuntimeError, match="already prepared"):
        ctx.register("d", other, torch.optim.AdamW(other.parameters()))


# ------------------------------------------------------------------------------------------------ flow matching
class _TinyFlowMatching(FlowMatchingTrainer):
    """The whole tiny SD3 transformer fitted to four fixed latents of two prompts."""

    def __init__(self, ctx, flow, source, steps):
        transformer = flow.transformer.requires_grad_(True)
        ctx.register("transformer", transformer, torch.optim.AdamW(transformer.parameters(), lr=3e-3),
                     grad_clip=1.0)  # fmt: skip
        ctx.prepare()
        flow.use_network(ctx.modules["transformer"].network)
        super().__init__(ctx, flow, source, FlowMatchingConfig(batch_size=8, cfg_dropout=0.1),
                         encode=PromptCache(flow, ["", "a red circle", "a blue square"]))  # fmt: skip
        self.cadence = Cadence(epochs=steps, progress_bar=False)


def _held_out_loss(flow, latents, prompts):
    """The flow-matching loss of fixed pairs with fixed noise and times (1, 2, ... 9 tenths)."""
    g = torch.Generator().manual_seed(1)
    x0 = latents.repeat(9, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(0.1, 0.9, 9).repeat_interleave(len(latents))
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        v = flow.velocity(x_t, t, flow.encode_prompt(prompts * 9))
    return float(((v - (noise - x0)) ** 2).mean())


def test_flow_matching_lowers_its_loss_on_a_tiny_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "a blue square"] * 2
    latents = torch.stack([torch.full((4, 8, 8), 0.8), torch.full((4, 8, 8), -0.8)] * 2)
    latents = latents + 0.1 * torch.randn(latents.shape, generator=g)
    flow = _flow()
    before = _held_out_loss(flow, latents, prompts)
    job = load_config(ToyJob, {"output_dir": str(tmp_path), "epochs": 60})
    run_training(job, lambda ctx: _TinyFlowMatching(ctx, flow, LatentDataset(prompts, latents), 60))
    flow.use_network(None)
    after = _held_out_loss(flow, latents, prompts)
    assert after < 0.5 * before, (before, after)
    history = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(history) == 60 and '"loss_fm"' in history[0]


def test_flow_matching_config_errors():
    with pytest.raises(ConfigError, match="cfg_dropout"):
        FlowMatchingConfig(cfg_dropout=1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        FlowMatchingConfig(batch_size=0)
    with pytest.raises(ValueError, match="as many prompts as latents"):
        LatentDataset(["a"], torch.zeros(2, 4, 8, 8))
