"""Contract tests: each adapter against the stock diffusers pipeline and transformer of its family."""

import os

import pytest
import torch
from diffusers import FluxPipeline

from diffalign.config import ConfigError
from diffalign.pipelines import FluxFlowModel, check_pretrained, load_flow_model, wrap_pipeline
from diffalign.pipelines.tiny import build_tiny, tiny_flux
from diffalign.sampling import sample

MAX_LEN = {"sd3": None, "flux": 32, "flux2": 32}
PROMPTS = ["a red circle left of a blue square", "three green triangles"]


def _flow(family, seed=0, **kw):
    pipe = build_tiny(family, seed) if not kw else tiny_flux(seed, **kw)
    return wrap_pipeline(pipe, max_sequence_length=MAX_LEN[family])


def test_velocity_equals_direct_transformer_call(family):
    flow = _flow(family)
    cond = flow.encode_prompt(PROMPTS)
    x = torch.randn(2, *flow.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    v = flow.velocity(x, t, cond)
    tr = flow.transformer
    with torch.no_grad():
        if family == "sd3":
            direct = tr(
                hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
            ).sample
        elif family == "flux":
            b, c, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, c, h, w)
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            out = tr(
                hidden_states=packed,
                timestep=t,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.embeds,
                txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                img_ids=ids,
            ).sample
            direct = FluxFlowModel.unpack(out, h, w)
        else:
            b, c, h, w = x.shape
            ids = flow.pipe._prepare_latent_ids(x)
            out = tr(
                hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1),
                timestep=t,
                encoder_hidden_states=cond.embeds,
                txt_ids=cond.text_ids,
                img_ids=ids,
            ).sample
            direct = out.permute(0, 2, 1).reshape(b, c, h, w)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, direct, rtol=0, atol=1e-6)


def _stock_latents(flow, family, noise, steps, cfg):
    pipe = flow.pipe
    kw = dict(prompt=PROMPTS, height=32, width=32, num_inference_steps=steps, output_type="latent")
    if family == "sd3":
        return pipe(latents=noise, guidance_scale=cfg, **kw).images
    if family == "flux":
        b, c, h, w = noise.shape
        out = pipe(
            latents=FluxFlowModel.pack(noise),
            guidance_scale=3.5,
            true_cfg_scale=cfg,
            negative_prompt=[""] * 2 if cfg > 1 else None,
            max_sequence_length=32,
            **kw,
        ).images
        return FluxFlowModel.unpack(out, h, w)
    out = pipe(latents=noise, guidance_scale=cfg, max_sequence_length=32, **kw).images
    return out


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ode_sampler_reproduces_stock_pipeline(family, cfg):
    flow = _flow(family)
    steps = 4
    noise = torch.randn(2, *flow.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    stock = _stock_latents(flow, family, noise.clone(), steps, cfg)
    cond = flow.encode_prompt(PROMPTS)
    times = flow.time_grid(steps, 32, 32)
    traj = sample(flow, cond, times, x_init=noise, guidance_scale=cfg)
    ours = traj.final if family != "flux2" else flow.to_vae_latents(traj.final)
    assert traj.nfe == 2 * steps * (2 if cfg > 1 else 1)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_flux_guidance_embedding_reproduces_stock():
    flow = _flow("flux", guidance_embeds=True)
    assert flow.has_guidance_embedding
    noise = torch.randn(2, *flow.latent_shape(32, 32), generator=torch.Generator().manual_seed(4))
    stock = flow.pipe(
        prompt=PROMPTS,
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=FluxFlowModel.pack(noise),
        max_sequence_length=32,
        output_type="latent",
    ).images
    traj = sample(flow, flow.encode_prompt(PROMPTS), flow.time_grid(3, 32, 32), x_init=noise, guidance=5.0)
    torch.testing.assert_close(traj.final, FluxFlowModel.unpack(stock, 16, 16), rtol=1e-4, atol=1e-5)
    other = sample(flow, flow.encode_prompt(PROMPTS), flow.time_grid(3, 32, 32), x_init=noise, guidance=1.0)
    assert not torch.allclose(other.final, traj.final)


def test_time_grid_matches_stock_scheduler(family):
    flow = _flow(family)
    grid = flow.time_grid(6, 32, 32)
    assert grid.shape == (7,) and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    pipe = flow.pipe
    pipe(
        prompt=PROMPTS[:1],
        height=32,
        width=32,
        num_inference_steps=6,
        output_type="latent",
        **({} if family == "sd3" else {"max_sequence_length": 32}),
    )
    torch.testing.assert_close(grid, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    shifted = flow.time_grid(4, 32, 32, shift=3.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(shifted[:-1], 3 * u / (1 + 2 * u))


def test_decode_encode_image_range_and_roundtrip_shapes(family):
    flow = _flow(family)
    z = torch.randn(3, *flow.latent_shape(32, 32))
    images = flow.decode_latents(z)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    z2 = flow.encode_images(images)
    assert z2.shape == z.shape


def test_decode_matches_stock_postprocess(family):
    flow = _flow(family)
    noise = torch.randn(1, *flow.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
    kw = dict(prompt=PROMPTS[:1], height=32, width=32, num_inference_steps=2, output_type="pt")
    if family == "flux":
        stock = flow.pipe(latents=FluxFlowModel.pack(noise), max_sequence_length=32, **kw).images
    else:
        stock = flow.pipe(
            latents=noise, guidance_scale=1.0, **kw, **({} if family == "sd3" else {"max_sequence_length": 32})
        ).images
    traj = sample(flow, flow.encode_prompt(PROMPTS[:1]), flow.time_grid(2, 32, 32), x_init=noise)
    torch.testing.assert_close(flow.decode_latents(traj.final), stock, rtol=1e-4, atol=1e-4)


def test_save_and_load_pretrained_roundtrip(tmp_path, family):
    flow = _flow(family)
    flow.pipe.save_pretrained(tmp_path / "m")
    loaded = load_flow_model(family, tmp_path / "m", max_sequence_length=MAX_LEN[family])
    cond_a, cond_b = flow.encode_prompt(PROMPTS), loaded.encode_prompt(PROMPTS)
    x = torch.randn(2, *flow.latent_shape(32, 32))
    torch.testing.assert_close(loaded.velocity(x, 0.5, cond_b), flow.velocity(x, 0.5, cond_a))


def test_lora_roundtrip_in_diffusers_format(tmp_path, family):
    flow = _flow(family)
    flow.add_lora(rank=4, alpha=8)
    trainable = {n for n, p in flow.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if family == "flux2":  # the single-stream blocks train too (their fused QKV + MLP projection)
        assert any(n.startswith("single_transformer_blocks") for n in trainable)
    with torch.no_grad():  # gaussian init leaves lora_B at zero: perturb it so the adapter does something
        for n, p in flow.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    flow.save_lora(tmp_path / "lora")
    weights = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    (tmp_path / "plain.txt").write_text("")  # safetensors writes 0600: the LoRA gets an ordinary file's mode
    assert os.stat(weights).st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777
    cond = flow.encode_prompt(PROMPTS)
    x = torch.randn(2, *flow.latent_shape(32, 32))
    with torch.no_grad():
        v_lora = flow.velocity(x, 0.6, cond)
    fresh = _flow(family)
    v_base = fresh.velocity(x, 0.6, fresh.encode_prompt(PROMPTS))
    assert not torch.allclose(v_base, v_lora, atol=1e-4)
    fresh.pipe.load_lora_weights(tmp_path / "lora")  # the stock diffusers entry point
    torch.testing.assert_close(fresh.velocity(x, 0.6, fresh.encode_prompt(PROMPTS)), v_lora, rtol=0, atol=1e-6)
    again = _flow(family)
    again.load_lora(tmp_path / "lora", adapter_name="reward")
    torch.testing.assert_close(again.velocity(x, 0.6, again.encode_prompt(PROMPTS)), v_lora, rtol=0, atol=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path, family):
    flow = _flow(family)
    with pytest.raises(ValueError, match="multiples of"):
        flow.latent_shape(30, 32)
    with pytest.raises(ValueError, match="channels"):
        flow.velocity(torch.randn(2, 3, 16, 16), 0.5, flow.encode_prompt(PROMPTS))
    with pytest.raises(ValueError, match="batch"):
        flow.velocity(torch.randn(3, *flow.latent_shape(32, 32)), 0.5, flow.encode_prompt(PROMPTS))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.encode_images(torch.full((1, 3, 32, 32), 2.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flow_model(family, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_flow_model(family, tmp_path)


def test_wrong_family_and_unknown_family(tmp_path):
    build_tiny("flux").save_pretrained(tmp_path / "flux")
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        load_flow_model("sd3", tmp_path / "flux")
    with pytest.raises(ValueError, match="unknown model family 'sdxl'"):
        load_flow_model("sdxl", tmp_path / "flux")


def test_size_check_reads_the_configs_and_matches_what_the_transformer_accepts(tmp_path, family):
    """``check_pretrained`` (configs only, before any weights load) accepts exactly the sizes the model can produce."""
    flow = _flow(family)
    flow.pipe.save_pretrained(tmp_path / "m")
    check_pretrained(family, tmp_path / "m", 32, 32)
    limits = flow.size_limits(flow.transformer.config, flow.pipe.vae.config)
    assert limits.multiple == flow.size_multiple
    with pytest.raises(ConfigError, match=rf"'sampling\.height'/'sampling\.width'.*multiples of {limits.multiple}"):
        check_pretrained(family, tmp_path / "m", 32, 32 + limits.multiple // 2)
    other = {"sd3": "flux", "flux": "sd3", "flux2": "sd3"}[family]
    with pytest.raises(ConfigError, match="'model.family'"):
        check_pretrained(other, tmp_path / "m", 32, 32)
    if family != "sd3":
        assert limits.largest is None  # rotary position embeddings: no largest size
        return
    largest, too_big = limits.largest, limits.largest + limits.multiple
    check_pretrained(family, tmp_path / "m", largest, largest)
    with pytest.raises(ConfigError, match=f"at most {largest} pixels"):
        check_pretrained(family, tmp_path / "m", too_big, largest)
    with pytest.raises(ValueError, match=f"at most {largest} pixels"):
        flow.latent_shape(too_big, largest)
    cond = flow.encode_prompt(PROMPTS[:1])
    assert flow.velocity(torch.randn(1, *flow.latent_shape(largest, largest)), 0.5, cond).isfinite().all()
    c, h, w = flow.latent_shape(largest, largest)
    with pytest.raises(ValueError, match="cannot be greater than"):  # diffusers' own limit, one patch row further
        flow.velocity(torch.randn(1, c, h + limits.multiple // flow.spatial_factor, w), 0.5, cond)
