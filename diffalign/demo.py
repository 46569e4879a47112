"""The demo page: a Gradio app over a model, with inference-time steering toward a reward.

``diffalign demo [MODEL] [--lora PATH] [--port N]`` serves a page where a prompt gives an image; the steering
method (``none``: one plain ODE sample, or a method of ``diffalign.steering.METHODS``), its budget (NFE per prompt:
one transformer evaluation of one sample; a CFG step costs 2), the reward it steers toward, the seed and the
sampling settings are chosen on the page, and the image comes back with its reward and the NFE spent.

:class:`Demo` holds the model and does the work (usable without a page, e.g. in tests); :func:`build_app` lays the
page out over it and :func:`serve` starts the server. Gradio is an optional extra (``pip install
'diffalign[demo]'``); nothing here imports it before :func:`build_app`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

DEFAULT_MODEL = "builtin:world-sd3"
NO_STEERING = "none"
DISPLAY_SIZE = 256  # smaller images are shown enlarged (nearest neighbour) to this many pixels a side


class DemoError(ValueError):
    """A model, reward or installation the demo cannot start with (reported in one line)."""


@dataclass(kw_only=True)
class DemoSettings:
    """What the page starts with (each can be changed on it, but the size and the prompt length).

    Attributes:
        steps: denoising steps; guidance_scale: CFG scale (None: the family default).
        height, width: image size in pixels (None: the model's native size).
        max_sequence_length: text-encoder tokens (None: the pipeline default).
        reward: registry name of the reward steered toward and shown.
        inverse_temperature: ``lam`` of the steering target ``p(x) exp(lam r(x))``.
        method, budget: the steering method first selected and its NFE per prompt.
        prompt: the example prompt.
        method_args: extra arguments per method (e.g. ``{"dts_star": {"c_uct": 0.05}}``).
    """

    steps: int = 28
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    reward: str = "clipscore"
    inverse_temperature: float = 1.0
    method: str = "best_of_n"
    budget: int = 200
    prompt: str = "a photo of a cat"
    method_args: dict[str, dict[str, Any]] | None = None


#: Settings of the built-in models: those of their configs (``configs/world/steer.yaml``).
BUILTIN_SETTINGS: dict[str, DemoSettings] = {
    "builtin:world-sd3": DemoSettings(
        steps=20, guidance_scale=3.0, height=64, width=64, max_sequence_length=16, reward="world",
        inverse_temperature=50.0, prompt="a photo of a blue square and a red circle",
        method_args={"dts_star": {"c_uct": 0.05}, "doob": {"num_candidates": 4}},
    ),
}  # fmt: skip


def infer_family(path: str) -> str:
    """The adapter family (``sd3``, ``flux``, ``flux2``) of the pipeline at ``path`` (folder, ``builtin:NAME``, or
    a hub id in the local cache), read from its ``model_index.json``."""
    import json

    from huggingface_hub import try_to_load_from_cache

    from diffalign.pipelines import FAMILIES, resolve_model_path
    from diffalign.pipelines.base import local_folder

    folder = local_folder(resolve_model_path(path))
    index = os.path.join(folder, "model_index.json") if folder else try_to_load_from_cache(path, "model_index.json")
    if not isinstance(index, str):
        raise DemoError(f"cannot tell the family of {path!r} (its model_index.json is not here); pass --family")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    for family, cls in FAMILIES.items():
        if name in {c.__name__ for c in cls.pipeline_classes}:
            return family
    raise DemoError(f"{path!r} holds a {name}, which no diffalign family adapts")


@dataclass
class DemoResult:
    """One generation: the image (PIL), its reward, the NFE spent, and the wall time in seconds."""

    image: Image.Image
    reward: float
    nfe: int
    seconds: float

    def summary(self, reward: str, method: str, budget: int) -> str:
        spent = f"{self.nfe} of {budget}" if method != NO_STEERING else f"{self.nfe}"
        value = "n/a" if self.reward != self.reward else f"{self.reward:.3f}"
        return (f"**reward** `{reward}` = {value} &nbsp;·&nbsp; **NFE** {spent} &nbsp;·&nbsp; **method** `{method}` "
                f"&nbsp;·&nbsp; {self.seconds:.1f} s")  # fmt: skip


class Demo:
    """A model, its rewards and the one call the page makes (:meth:`generate`)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        family: str | None = None,
        lora: str | None = None,
        settings: DemoSettings | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        from diffalign.pipelines import load_flow_model

        self.model = model
        self.lora = lora
        self.family = family or infer_family(model)
        base = BUILTIN_SETTINGS.get(model, DemoSettings())
        self.settings = settings or base
        self.flow = load_flow_model(self.family, model, dtype=dtype, device=device, lora=lora,
                                    max_sequence_length=self.settings.max_sequence_length)  # fmt: skip
        limits = self.flow.size_limits(self.flow.transformer.config, self.flow.pipe.vae.config)
        native = limits.native or 512
        self.settings = replace(self.settings, height=self.settings.height or native,
                                width=self.settings.width or native)  # fmt: skip
        self.flow.latent_shape(self.settings.height, self.settings.width)
        self._rewards: dict[str, Any] = {}

    @property
    def methods(self) -> list[str]:
        from diffalign.steering import METHODS

        return [NO_STEERING, *METHODS]

    def reward(self, name: str) -> Any:
        """The reward ``name`` (registry name), built once."""
        if name not in self._rewards:
            from diffalign.rewards import build_reward

            self._rewards[name] = build_reward(name).to(self.flow.device)
        return self._rewards[name]

    def check_prompt(self, prompt: str, reward: str) -> str:
        prompt = " ".join(prompt.split())
        if not prompt:
            raise ValueError("enter a prompt")
        if reward == "world":
            from diffalign.world.prompts import is_world_prompt

            if not is_world_prompt(prompt):
                raise ValueError("the world reward judges prompts of the world's grammar, such as 'a photo of "
                                 "two red circles' or 'a photo of a blue square left of a circle'")  # fmt: skip
        return prompt

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        method: str,
        budget: int,
        *,
        seed: int = 0,
        reward: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        inverse_temperature: float | None = None,
    ) -> DemoResult:
        """One image for ``prompt``: a plain ODE sample (``method="none"``, ``budget`` unused) or the best sample
        of steering ``method`` with ``budget`` NFE; scored by ``reward`` (default: the settings')."""
        from diffalign.config import SamplingConfig
        from diffalign.images import to_pil
        from diffalign.sampling.generate import generate
        from diffalign.steering import SteeringPipeline

        s = self.settings
        reward_name = reward or s.reward
        prompt = self.check_prompt(prompt, reward_name)
        scorer = self.reward(reward_name)
        steps = int(steps or s.steps)
        scale = guidance_scale if guidance_scale is not None else s.guidance_scale
        started = time.perf_counter()
        if method == NO_STEERING:
            before = self.flow.nfe
            cfg = SamplingConfig(num_steps=steps, height=s.height, width=s.width, guidance_scale=scale)
            pixels = generate(self.flow, [prompt], cfg, seed=int(seed), progress=False)
            nfe = self.flow.nfe - before
            value = float(scorer(pixels.to(self.flow.device), [prompt])[0])
            image = to_pil(pixels)[0]
        else:
            lam = inverse_temperature if inverse_temperature is not None else s.inverse_temperature
            generator = torch.Generator(self.flow.device).manual_seed(int(seed))
            out = SteeringPipeline(self.flow)(
                prompt, scorer, method=method, budget=int(budget), num_inference_steps=steps, height=s.height,
                width=s.width, guidance_scale=scale, generator=generator, inverse_temperature=lam,
                method_kwargs=(s.method_args or {}).get(method), progress=False,
            )  # fmt: skip
            image, value, nfe = out.images[0], float(out.rewards[0]), out.nfe[0]
        return DemoResult(image=image, reward=value, nfe=nfe, seconds=time.perf_counter() - started)


def _enlarged(image: Image.Image) -> Image.Image:
    factor = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def build_app(
    model: str = DEFAULT_MODEL,
    *,
    family: str | None = None,
    lora: str | None = None,
    reward: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    device: str = "cpu",
    title: str | None = None,
) -> Any:
    """The page (a ``gradio.Blocks``) over :class:`Demo` ``(model, lora)``; ``None`` arguments take the model's
    defaults (:data:`BUILTIN_SETTINGS`, else :class:`DemoSettings`)."""
    try:
        import gradio as gr
    except ImportError as e:
        raise DemoError("the demo needs gradio: pip install 'diffalign[demo]'") from e
    from diffalign.rewards import REWARDS

    settings = BUILTIN_SETTINGS.get(model, DemoSettings())
    given = {"reward": reward, "steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
             "max_sequence_length": max_sequence_length}  # fmt: skip
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
    if settings.reward not in REWARDS:
        raise DemoError(f"unknown reward {settings.reward!r}; expected one of {sorted(REWARDS)}")
    demo = Demo(model, family=family, lora=lora, settings=settings, device=device)
    s = demo.settings
    name = title or (f"{model} + {os.path.basename(os.path.normpath(lora))}" if lora else model)

    def run(prompt, method, budget, reward_name, seed, steps, guidance, lam):
        try:
            result = demo.generate(prompt, method, int(budget), seed=int(seed), reward=reward_name, steps=int(steps),
                                   guidance_scale=float(guidance), inverse_temperature=float(lam))  # fmt: skip
        except ValueError as e:  # a bad prompt, a budget too small for the method, an unknown reward
            raise gr.Error(str(e)) from e
        return _enlarged(result.image), result.summary(reward_name, method, int(budget))

    one_sample = s.steps * (2 if (s.guidance_scale or 1.0) > 1 else 1)
    with gr.Blocks(title=f"diffalign demo: {name}", analytics_enabled=False) as app:
        gr.Markdown(f"## diffalign demo\n`{name}` ({demo.family}, {s.height}x{s.width} px). Steering spends a "
                    f"budget of model calls (NFE) per prompt to find an image the reward prefers; `none` draws one "
                    f"plain sample ({one_sample} NFE).")  # fmt: skip
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=s.prompt, elem_id="prompt")
                method = gr.Dropdown(demo.methods, value=s.method, label="Steering method", elem_id="method")
                budget = gr.Slider(one_sample, 40 * one_sample, value=s.budget, step=1,
                                   label="Budget (NFE per prompt)", elem_id="budget")  # fmt: skip
                reward_box = gr.Dropdown(sorted(REWARDS), value=s.reward, label="Reward", elem_id="reward")
                with gr.Accordion("Sampling", open=False):
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    steps_box = gr.Slider(1, 100, value=s.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Number(s.guidance_scale or demo.flow.default_guidance_scale,
                                         label="Guidance scale (CFG)", elem_id="guidance")  # fmt: skip
                    lam = gr.Number(s.inverse_temperature, label="Inverse temperature (steering strength)",
                                    elem_id="lam")  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="Image", type="pil", elem_id="image", format="png")
                info = gr.Markdown(elem_id="info")
        inputs = [prompt, method, budget, reward_box, seed, steps_box, guidance, lam]
        button.click(run, inputs, [image, info])
        prompt.submit(run, inputs, [image, info])
    app.demo = demo
    return app


def serve(app: Any, host: str | None = None, port: int | None = None, block: bool = True) -> str:
    """Start the page's server (``host``/``port`` None: Gradio's defaults, or ``GRADIO_SERVER_NAME``/``_PORT``);
    returns its URL. ``block=False`` returns at once, the server running in a thread (``app.close()`` stops it)."""
    import gradio as gr

    # system fonts: the page needs nothing from outside the server (no web fonts)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           theme=theme, footer_links=[])  # fmt: skip
    return url
