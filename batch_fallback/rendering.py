"""Full-quality renders with diffusers: many steps, a chosen scheduler, the model's full VAE.

`QualityRenderer` builds a fresh diffusers pipeline per job around the shared, read-only weights of a
`LoadedModel` (UNet, text encoder, tokenizer): only the scheduler, which keeps state, is new each time.
Every step calls back into the job (progress, cancellation, timeout, yielding to live sessions); raising
there stops the render at that step.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models import AutoencoderTiny
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.models import ModelSet
from streamcanvas.pipelines.stream import encode_prompts, nth_seed

SCHEDULERS = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "lcm": LCMScheduler,
}
"""Scheduler names accepted by the API (A1111's sampler names map onto these in `a1111.py`)."""

SCHEDULER_OPTIONS: dict[str, dict[str, object]] = {
    # PLMS as Stable Diffusion ships it: without the Runge-Kutta warm-up, which breaks below ~5 steps.
    "pndm": {"skip_prk_steps": True},
}

Mode = Literal["txt2img", "img2img", "inpaint"]

PIPELINES = {
    # (SDXL, with ControlNets, mode) → the diffusers pipeline that renders it
    (False, False, "txt2img"): StableDiffusionPipeline,
    (False, False, "img2img"): StableDiffusionImg2ImgPipeline,
    (False, False, "inpaint"): StableDiffusionInpaintPipeline,
    (False, True, "txt2img"): StableDiffusionControlNetPipeline,
    (False, True, "img2img"): StableDiffusionControlNetImg2ImgPipeline,
    (False, True, "inpaint"): StableDiffusionControlNetInpaintPipeline,
    (True, False, "txt2img"): StableDiffusionXLPipeline,
    (True, False, "img2img"): StableDiffusionXLImg2ImgPipeline,
    (True, False, "inpaint"): StableDiffusionXLInpaintPipeline,
    (True, True, "txt2img"): StableDiffusionXLControlNetPipeline,
    (True, True, "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
    (True, True, "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
}
"""With a mask, the inpainting pipelines: an inpainting UNet (9 input channels) when the model has one,
else masked latent blending (the masked area is denoised, the rest kept from the input at every step)."""

PREVIEW_SIDE = 128

# Approximate SD-1.x latent → RGB projection, used for previews when the model has no TAESD.
_LATENT_TO_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)

StepCallback = Callable[[int, int, Callable[[], bytes]], None]
"""Called after every denoising step with (step, steps, make_preview); make_preview() returns a JPEG."""


Sigmas = Literal["normal", "karras", "exponential", "beta", "simple", "sgm_uniform"]

SIGMA_OPTIONS: dict[str, dict[str, object]] = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "simple": {"timestep_spacing": "trailing"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
"""What each spacing sets on a diffusers scheduler (only where that scheduler has the option)."""


def sigma_spacings(scheduler: str) -> tuple[str, ...]:
    """The spacings `scheduler` can use: those whose options its diffusers class takes."""
    accepted = set(inspect.signature(SCHEDULERS[scheduler].__init__).parameters)
    return tuple(name for name, options in SIGMA_OPTIONS.items() if set(options) <= accepted)


def schedule_length(steps: int, strength: float) -> int:
    """The schedule an image-to-image render asks diffusers for. diffusers runs the last int(steps ×
    strength) steps of a `steps`-step schedule, none when that rounds to 0 (and then fails); such a
    request runs one step instead, at its strength: the shortest schedule whose last step starts there."""
    length = steps
    while 0 < strength and int(length * strength) < 1:
        length += 1
    return length


def expected_steps(request: RenderRequest) -> int:
    """How many steps `QualityRenderer.render` reports for this request, for progress across several
    passes (see `Passes`): a scheduler that takes more than one model call a step reports its own count
    when it starts."""
    if request.init_image is None and request.init_latents is None:
        return request.steps
    return image_to_image_steps(request.steps, request.strength)


def image_to_image_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image render of `steps` at `strength` runs (see `schedule_length`)."""
    return max(1, int(schedule_length(steps, strength) * strength))


class Passes:
    """The steps of several passes (the hires fix: the first render, then for each image its upscale
    and its repaint) as one count that only grows: every step of pass i comes after all of pass i - 1's,
    as A1111 counts its hires fix. A pass counts as its estimate until it reports its own length."""

    def __init__(self, on_step: StepCallback, estimates: list[int]) -> None:
        self.on_step = on_step
        self.lengths = list(estimates)

    def of(self, index: int) -> StepCallback:
        """The step callback for pass `index`."""

        def report(step: int, steps: int, make_preview: Callable[[], bytes]) -> None:
            self.lengths[index] = steps
            self.on_step(sum(self.lengths[:index]) + step, sum(self.lengths), make_preview)

        return report


@dataclass(frozen=True)
class RenderRequest:
    prompt: str | tuple[tuple[str, float], ...]
    """A prompt, or weighted prompts whose embeddings are mixed by weight (as the live stream does)."""
    negative_prompt: str
    width: int
    height: int
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    batch_size: int
    init_image: np.ndarray | None = None
    strength: float = 0.6
    loras: tuple[tuple[str, float], ...] = ()
    controls: tuple[RenderControl, ...] = ()
    model: str | None = None
    """A name in the server's models (None: the default one)."""
    embeddings: tuple[torch.Tensor, ...] | None = None
    """Prompt embeddings already encoded (conditional, unconditional[, pooled, unconditional pooled]),
    used instead of `prompt` and `negative_prompt` (a workflow's CLIPTextEncode nodes)."""
    init_latents: torch.Tensor | None = None
    """Scaled latents to start from (instead of `init_image`), noised to `strength`."""
    sigmas: Sigmas = "normal"
    """How the scheduler spaces its noise levels (ComfyUI's `scheduler` input)."""
    mask: np.ndarray | None = None
    """Inpainting: height × width uint8, 255 where the picture is painted anew, 0 where it is kept (the
    input image, or `init_latents`, is required)."""


@dataclass(frozen=True)
class RenderControl:
    """A ControlNet for one render: its name, scale, start/end fractions and control image (RGB uint8)."""

    model: str
    scale: float
    start: float
    end: float
    image: np.ndarray


class QualityRenderer:
    """Renders full-quality images on one device. Not thread-safe per call: one worker drives it."""

    def __init__(self, models: ModelSet | LoadedModel) -> None:
        self.models = models if isinstance(models, ModelSet) else ModelSet.single(models)

    @property
    def model(self) -> LoadedModel:
        """The default model (what a job that names none renders with)."""
        return self.models.default

    def render(self, request: RenderRequest, on_step: StepCallback) -> list[Image.Image]:
        return list(self._run(request, on_step, "pil").images)

    def sample(self, request: RenderRequest, on_step: StepCallback) -> torch.Tensor:
        """The denoised latents (scaled, as `init_latents` takes them) instead of decoded images."""
        return self._run(request, on_step, "latent").images

    def _run(self, request: RenderRequest, on_step: StepCallback, output_type: str):  # type: ignore[no-untyped-def]
        model = self.models.get(request.model)
        components = dict(model.pipe.components)
        components["vae"] = model.quality_vae
        if request.sigmas not in sigma_spacings(request.scheduler):
            raise ValueError(f"the {request.scheduler} scheduler cannot space its steps as {request.sigmas!r}")
        components["scheduler"] = SCHEDULERS[request.scheduler].from_config(
            model.pipe.scheduler.config, **SCHEDULER_OPTIONS.get(request.scheduler, {}), **SIGMA_OPTIONS[request.sigmas]
        )
        sdxl = model.architecture == "sdxl"
        if not sdxl:
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        img2img = request.init_image is not None or request.init_latents is not None
        if request.mask is not None and not img2img:
            raise ValueError("a mask needs an input image to inpaint")
        mode: Mode = "inpaint" if request.mask is not None else "img2img" if img2img else "txt2img"
        if request.controls:
            nets = [model.controlnets.get(control.model) for control in request.controls]
            components["controlnet"] = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        pipeline_class = PIPELINES[(sdxl, bool(request.controls), mode)]
        pipe = pipeline_class(**components)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator("cpu").manual_seed(nth_seed(request.seed, index)) for index in range(request.batch_size)]

        def step_end(pipeline, step: int, _timestep, tensors: dict) -> dict:  # type: ignore[no-untyped-def]
            latents = tensors["latents"]
            on_step(step + 1, pipeline.num_timesteps, lambda: self.preview(latents, model))
            return tensors

        starts_from_an_image = request.init_latents is not None or request.init_image is not None
        arguments: dict = {
            **self._prompt_arguments(model, request),
            "num_inference_steps": schedule_length(request.steps, request.strength) if starts_from_an_image else request.steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": request.batch_size,
            "generator": generators,
            "callback_on_step_end": step_end,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "output_type": output_type,
        }
        if request.init_latents is not None:
            latents = request.init_latents.to(model.placement.device, model.pipe.unet.dtype)
            arguments.update(image=latents, strength=request.strength)
            if request.mask is not None:  # latents to start from, and (unused by a 4-channel UNet) the masked ones
                arguments.update(masked_image_latents=latents, width=request.width, height=request.height)
        elif request.init_image is None:
            arguments.update(width=request.width, height=request.height)
        else:
            image = Image.fromarray(request.init_image)
            if image.size != (request.width, request.height):
                image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
            arguments.update(image=image, strength=request.strength)
        if request.mask is not None:
            arguments.update(mask_image=_sized(request.mask, request.width, request.height), width=request.width, height=request.height)
        if request.controls:
            single = len(request.controls) == 1
            control_images = [_sized(control.image, request.width, request.height) for control in request.controls]
            scales = [control.scale for control in request.controls]
            arguments["image" if mode == "txt2img" else "control_image"] = control_images[0] if single else control_images
            arguments["controlnet_conditioning_scale"] = scales[0] if single else scales
            arguments["control_guidance_start"] = [control.start for control in request.controls]
            arguments["control_guidance_end"] = [control.end for control in request.controls]
        with torch.inference_mode(), model.adapters.wanted(request.loras):
            return pipe(**arguments)

    def _prompt_arguments(self, model: LoadedModel, request: RenderRequest) -> dict[str, object]:
        """The prompt as the pipeline takes it: text, or, for weighted prompts, embeddings mixed by
        weight (SDXL's pooled embeddings too)."""
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        if request.embeddings is not None:
            return dict(zip(names, request.embeddings))
        if isinstance(request.prompt, str):
            return {"prompt": request.prompt, "negative_prompt": request.negative_prompt or None}
        mixed = encode_prompts(model, request.prompt, request.negative_prompt or None, request.loras)
        return dict(zip(names, mixed))

    @torch.inference_mode()
    def preview(self, latents: torch.Tensor, model: LoadedModel | None = None) -> bytes:
        """A small JPEG of the first image's current latents: TAESD when loaded, else a linear guess."""
        latent = latents[:1]
        vae = (model or self.model).pipe.vae
        if isinstance(vae, AutoencoderTiny):
            pixels = vae.decode(latent.to(vae.dtype)).sample[0].float()
            rgb = (pixels / 2 + 0.5).clamp(0, 1)
        else:
            rgb = torch.einsum("chw,cr->rhw", latent[0].float().cpu(), _LATENT_TO_RGB)
            rgb = ((rgb + 1) / 2).clamp(0, 1)
        array = (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return preview_jpeg(Image.fromarray(array))


def preview_jpeg(image: Image.Image) -> bytes:
    """A preview: the image at most PREVIEW_SIDE a side, as a JPEG."""
    small = image.convert("RGB")
    small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def _sized(rgb: np.ndarray, width: int, height: int) -> Image.Image:
    image = Image.fromarray(rgb)
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
