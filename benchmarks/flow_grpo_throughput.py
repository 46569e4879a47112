"""Flow-GRPO rollout throughput and training-step time vs the stock diffusers pipeline.

Default: an SD3.5-Medium-sized pipeline with random weights (2.24B-param transformer, CLIP-L, CLIP-G, T5-XXL
encoder, 16-channel VAE, offline tokenizers), 512 px, bf16, on CUDA. ``--tiny`` runs the same measurement on the
tiny SD3 pipeline (CPU smoke test). Prints a table:

- stock: ``StableDiffusion3Pipeline(..., output_type="latent")`` images/s (ODE, CFG);
- diffalign ODE: ``sample`` as an ODE with the same noise, steps and CFG;
- diffalign SDE rollout: ``sample`` with the Flow-GRPO SDE recording per-step log-probs (what training uses);
- training step: LoRA r32, one ``transition_log_prob`` forward + backward with CFG at batch ``--train-batch``,
  without and with gradient checkpointing (text encoders freed first; ``OOM`` if it does not fit).

    python benchmarks/flow_grpo_throughput.py [--batch 16] [--steps 10] [--tiny]
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time

import torch


def full_size_sd35(device: torch.device, dtype: torch.dtype):
    """SD3.5-Medium-sized StableDiffusion3Pipeline with random weights (no download)."""
    import open_clip
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from diffalign.pipelines.tokenizers import t5_tokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode().split("\n")[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    clip_tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(tokens)}, merges=merges, model_max_length=77)

    def clip(hidden, inter, heads, layers, proj, act="quick_gelu"):
        return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden, intermediate_size=inter,
                                                          num_attention_heads=heads, num_hidden_layers=layers,
                                                          projection_dim=proj, hidden_act=act))  # fmt: skip

    with torch.device(device):
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609,
                              use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=clip(768, 3072, 12, 12, 768), tokenizer=clip_tok,
            text_encoder_2=clip(1280, 5120, 20, 32, 1280, "gelu"), tokenizer_2=clip_tok,
            text_encoder_3=T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                   num_heads=64, feed_forward_proj="gated-gelu")),
            tokenizer_3=t5_tokenizer(max_length=256),
        )  # fmt: skip
    pipe.to(dtype)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    from diffalign.pipelines import wrap_pipeline
    from diffalign.pipelines.tiny import tiny_sd3
    from diffalign.sampling import SDE, sample, transition_log_prob

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny SD3 on CPU (smoke test)")
    args = parser.parse_args()

    if args.tiny:
        device, dtype, size = torch.device("cpu"), torch.float32, 32
        pipe = tiny_sd3()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or pass --tiny)")
        device, dtype, size = torch.device("cuda"), torch.bfloat16, args.size
        pipe = full_size_sd35(device, dtype)
    flow = wrap_pipeline(pipe)
    prompts = ["a photo of a red circle left of a blue square"] * args.batch
    noise = torch.randn(args.batch, *flow.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    noise = noise.to(device)
    cond = flow.encode_prompt(prompts)
    uncond = flow.empty_cond(args.batch)
    times = flow.time_grid(args.steps, size, size)

    with torch.no_grad():
        # both sides get the prompt embeddings precomputed: the timings cover the denoising loop only
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        embeds = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device)
        stock_embeds = dict(zip(names, embeds, strict=True))
        stock = timed(lambda: pipe(**stock_embeds, latents=noise.to(dtype), num_inference_steps=args.steps,
                                   guidance_scale=args.cfg, height=size, width=size, output_type="latent"),
                      args.repeats, device)  # fmt: skip
        ode = timed(lambda: sample(flow, cond, times, x_init=noise, guidance_scale=args.cfg, uncond=uncond,
                                   keep_states=False), args.repeats, device)  # fmt: skip
        sde = SDE(kind="flow_sde", noise_level=0.7)
        gen = torch.Generator(device=device).manual_seed(0)
        rollout = timed(lambda: sample(flow, cond, times, x_init=noise, guidance_scale=args.cfg, uncond=uncond,
                                       sde=sde, generator=gen), args.repeats, device)  # fmt: skip
        traj = sample(flow, cond, times, x_init=noise, guidance_scale=args.cfg, uncond=uncond, sde=sde, generator=gen)

    # training needs no text encoders: free them (on a GPU they hold ~10 GiB) before measuring its memory
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        setattr(pipe, name, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flow.add_lora(rank=32, alpha=64)
    optimizer = torch.optim.AdamW([p for p in flow.transformer.parameters() if p.requires_grad], lr=1e-4)
    b = args.train_batch

    def train_step():
        rows = list(range(b))
        out = transition_log_prob(flow, traj.states[:b, 3], traj.states[:b, 4], times[3], times[4], cond.index(rows),
                                  sde=sde, guidance_scale=args.cfg, uncond=uncond.index(rows))  # fmt: skip
        out.log_prob.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_rows = []
    for checkpointing in (False, True):
        if checkpointing:
            flow.transformer.enable_gradient_checkpointing()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step_time = timed(train_step, args.repeats, device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            train_rows.append((checkpointing, float("nan"), float("nan")))
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        train_rows.append((checkpointing, step_time, peak))

    name = "tiny SD3 (CPU)" if args.tiny else f"SD3.5-Medium size, random weights, {size}px, bf16"
    print(f"\n{name}; batch {args.batch}, {args.steps} steps, CFG {args.cfg}; device {device}; text tokens "
          f"{cond.embeds.shape[1]} (stock {stock_embeds['prompt_embeds'].shape[1]})")  # fmt: skip
    print(f"{'':34}{'s/batch':>10}{'images/s':>10}{'vs stock':>10}")
    for label, sec in (("stock diffusers pipeline (ODE)", stock), ("diffalign sample, ODE", ode),
                       ("diffalign rollout, SDE + log-probs", rollout)):  # fmt: skip
        print(f"{label:34}{sec:>10.3f}{args.batch / sec:>10.2f}{stock / sec:>10.2f}")
    for checkpointing, step_time, peak in train_rows:
        label = "training step, grad. checkpointing" if checkpointing else "training step (LoRA r32, CFG)"
        if math.isnan(step_time):
            print(f"{label:34}{'OOM':>10}  batch {b}")
        else:
            print(f"{label:34}{step_time:>10.3f}  batch {b}, peak {peak:.1f} GiB, {b / step_time:.2f} samples/s")


if __name__ == "__main__":
    main()
