"""What a job can be. Each kind is a request model (validated before anything is queued) and a run.

Adding a kind — video, upscale, a workflow — is one `JobKind` subclass registered in `KINDS`:
`Request` says what the API accepts (unknown fields are refused), `accept()` turns a valid request
into the stored parameters and input image (on the API side, with access to the live sessions), and
`run()` renders on the worker side.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import cv2
import msgpack
import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from streamcanvas.codecs import images
from streamcanvas.codecs.errors import CodecError
from streamcanvas.codecs.images import ImageLimits

from streamcanvas.pipelines.adapters import MAX_ACTIVE_LORAS
from streamcanvas.pipelines.controls import MAX_CONTROL_SCALE, MAX_CONTROLS, Preprocessor, preprocess
from streamcanvas.pipelines.errors import InvalidParameter, UnknownName
from streamcanvas.pipelines.models import ModelChoice
from streamcanvas.pipelines.sizes import MIN_SIDE, SIDE_MULTIPLE, aligned, side_problem
from streamcanvas.pipelines.stream import MAX_SEED, RenderResult, StreamParams, StreamPipeline, nth_seed
from streamcanvas.pipelines.styles import StylePreset

from .errors import InvalidJob
from .nodes import REGISTRY, NodeContext
from .rendering import (
    SCHEDULERS,
    Passes,
    QualityRenderer,
    RenderControl,
    RenderRequest,
    Sigmas,
    StepCallback,
    expected_steps,
    preview_jpeg,
    sigma_spacings,
)
from .results import ResultFile, ResultImage, described, postprocessing_text
from .store import Stage
from .uploads import Uploads
from .upscaling import RESAMPLERS, network_passes, refine, repaint_steps, upscale_steps, upscaled
from .video import VideoLimits, output_size, probe, restyle
from .workflow import Catalog, execute, plan

StageCallback = Callable[[Stage], None]

SchedulerName = Literal["euler_a", "euler", "dpmpp_2m", "ddim", "pndm", "unipc", "heun", "lcm"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LiveCapture:
    """What a live session looks like right now, for "render this session": its canvas and params."""

    canvas: np.ndarray | None
    params: StreamParams
    width: int
    height: int
    control_layer: np.ndarray | None = None
    model: str | None = None
    """The session's model (None: the default)."""


@dataclass(frozen=True)
class AcceptContext:
    max_width: int
    max_height: int
    image_limits: ImageLimits
    capture_live: Callable[[str, str], LiveCapture]
    """(session id, control token) → the session's state; raises InvalidJob / JobNotFound."""
    models: Mapping[str, ModelChoice] = field(default_factory=dict)
    """The server's models by name (the first is the default), with what may be named on each."""
    styles: Mapping[str, StylePreset] = field(default_factory=dict)
    uploads: Uploads | None = None
    """Images uploaded for workflows (None: the server keeps none)."""

    def catalog(self) -> Catalog:
        """What a workflow may name here."""
        uploads = self.uploads
        if uploads is None:
            return workflow_catalog(self.models, self.max_width, self.max_height, lambda name: False)
        return workflow_catalog(self.models, self.max_width, self.max_height, lambda name: uploads.path(name) is not None, uploads.names)


@dataclass(frozen=True)
class Accepted:
    params: dict[str, Any]
    input_image: bytes | None = None


class _Strict(BaseModel):
    # NaN and ±Infinity (which Python's JSON reads) are refused as what they are, not as out of range.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class BatchControl(_Strict):
    """A ControlNet for a batch render, as a live session's CONTROL; what it reads is `source`."""

    model: str = Field(max_length=64)
    scale: float = Field(1.0, ge=0.0, le=MAX_CONTROL_SCALE)
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    preprocessor: Preprocessor = "scribble"
    source: Literal["control_image", "image"] | None = Field(
        None, description="the job's control_image or its input image; None: the control_image if the job has one, else the input image"
    )

    def reads(self, control_image: object | None, image: object | None) -> object | None:
        """Which of the two this control reads (None where that one is missing)."""
        if self.source == "image" or (self.source is None and control_image is None):
            return image
        return control_image


class LiveLook(_Strict):
    """What keeps a full-quality render looking like the live stream: a style preset, LoRAs, ControlNets."""

    model: str | None = Field(None, max_length=512, description="one of the server's models (GET /v1/models); None: the default")
    style: str = Field("", max_length=64, description="a style preset (GET /v1/styles): its prompt template, negative prompt, LoRAs and control scale")
    loras: dict[str, float] = Field(default_factory=dict, max_length=MAX_ACTIVE_LORAS, description="LoRA name → weight")
    controls: list[BatchControl] = Field(default_factory=list, max_length=MAX_CONTROLS)
    control_image: str | None = Field(None, description="base64 PNG/JPEG/WebP the controls read (after their preprocessor); default: the input image")


UPSCALER_DESCRIPTION = f"a resampler ({', '.join(RESAMPLERS)}) or one of the server's super-resolution networks (--upscaler NAME=PATH)"


class HiresFix(_Strict):
    """A second pass at a larger size: the first image upscaled, then repainted at a low strength in tiles."""

    scale: float = Field(2.0, ge=1.0, le=4.0)
    width: int | None = Field(
        None, ge=MIN_SIDE, multiple_of=SIDE_MULTIPLE,
        description="the size to end at instead of scale: the image is scaled to cover width × height, then centre-cropped to it "
        "(A1111's hr_resize_x/hr_resize_y); with one of the two, the other follows the image's aspect",
    )  # fmt: skip
    height: int | None = Field(None, ge=MIN_SIDE, multiple_of=SIDE_MULTIPLE)
    upscaler: str = Field("lanczos", max_length=64, description=UPSCALER_DESCRIPTION)
    strength: float = Field(0.5, gt=0.0, le=1.0)
    steps: int | None = Field(None, ge=1, le=150, description="None: the job's steps")
    tile: int = Field(512, ge=MIN_SIDE, le=2048, multiple_of=SIDE_MULTIPLE)
    overlap: int = Field(64, ge=0, le=512, description="at most half the tile")

    @field_validator("overlap")
    @classmethod
    def _overlap_fits(cls, overlap: int, info: ValidationInfo) -> int:
        return _fitting_overlap(overlap, info)

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """For a first image of width × height: the size it is upscaled to, and the size the pass ends
        at (the same, unless a target size with another aspect crops the middle of it)."""
        if self.width is None and self.height is None:
            size = _hires_size(width, height, self.scale)
            return size, size
        target_width = self.width or _side(self.height * width / height)  # type: ignore[operator]
        target_height = self.height or _side(self.width * height / width)  # type: ignore[operator]
        factor = max(target_width / width, target_height / height)
        cover = (max(target_width, _side(width * factor, up=True)), max(target_height, _side(height * factor, up=True)))
        return cover, (target_width, target_height)


class GenerationRequest(LiveLook):
    prompt: str = Field(max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    width: int = Field(512, ge=MIN_SIDE, description="multiple of 8, at most the server's max resolution")
    height: int = Field(512, ge=MIN_SIDE)
    steps: int = Field(25, ge=1, le=150)
    scheduler: SchedulerName = "euler_a"
    sigmas: Sigmas = Field("normal", description="how the scheduler spaces its noise levels (karras, exponential, …), where it can")
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None picks one; it is recorded")
    batch_size: int = Field(1, ge=1, le=8)
    preview: bool = Field(False, description="keep a low-resolution preview of the current step")
    hires: HiresFix | None = Field(None, description="txt2img/img2img: a hires-fix pass to width × height × scale")

    @field_validator("sigmas")
    @classmethod
    def _spaced_by_the_scheduler(cls, sigmas: str, info: ValidationInfo) -> str:
        scheduler = info.data.get("scheduler")
        if scheduler is not None and sigmas not in sigma_spacings(scheduler):
            raise ValueError(f"the {scheduler} scheduler spaces its steps as {', '.join(sigma_spacings(scheduler))}, not {sigmas}")
        return sigmas


class Img2ImgRequest(GenerationRequest):
    image: str = Field(description="base64 PNG, JPEG or WebP (a data: URL is accepted)")
    strength: float = Field(0.6, gt=0.0, le=1.0)
    width: int | None = Field(None, ge=MIN_SIDE)  # type: ignore[assignment]
    height: int | None = Field(None, ge=MIN_SIDE)  # type: ignore[assignment]


InpaintingFill = Literal["original", "fill", "latent_noise", "latent_nothing"]


class InpaintRequest(Img2ImgRequest):
    mask: str = Field(description="base64 PNG/JPEG/WebP, resized to the image: white where it is painted anew, black where it is kept (an RGBA mask with transparency: its alpha)")
    mask_blur: int = Field(4, ge=0, le=64, description="Gaussian blur of the mask's edge, pixels")
    inpainting_fill: InpaintingFill = Field("original", description="what the masked area starts as: the image, a fill from its surroundings, noise, or grey")
    invert_mask: bool = False
    strength: float = Field(0.75, gt=0.0, le=1.0)


class OutpaintRequest(GenerationRequest):
    image: str = Field(description="base64 PNG, JPEG or WebP (a data: URL is accepted)")
    left: int = Field(0, ge=0, le=2048, description="pixels added on the left")
    right: int = Field(0, ge=0, le=2048)
    top: int = Field(0, ge=0, le=2048)
    bottom: int = Field(0, ge=0, le=2048)
    mask_blur: int = Field(8, ge=0, le=64, description="how far the new area blends into the old, pixels")
    inpainting_fill: InpaintingFill = "fill"
    strength: float = Field(1.0, gt=0.0, le=1.0)
    width: int | None = Field(None, ge=MIN_SIDE, description="None: the extended canvas's size (rounded down to a multiple of 8)")  # type: ignore[assignment]
    height: int | None = Field(None, ge=MIN_SIDE)  # type: ignore[assignment]


class UpscaleRequest(LiveLook):
    image: str = Field(description="base64 PNG, JPEG or WebP (a data: URL is accepted)")
    scale: float = Field(2.0, ge=1.0, le=4.0, description="×2, ×4 or anything between (width/height override it)")
    width: int | None = Field(None, ge=1, description="the output's exact width; None: the image's × scale, rounded")
    height: int | None = Field(None, ge=1)
    upscaler: str = Field("lanczos", max_length=64, description=UPSCALER_DESCRIPTION)
    strength: float = Field(0.0, ge=0.0, le=1.0, description="0: resampling only; above 0, the hires-fix pass: img2img in tiles at this strength")
    prompt: str = Field("", max_length=4000, description="what the hires-fix pass paints")
    negative_prompt: str = Field("", max_length=4000)
    steps: int = Field(20, ge=1, le=150)
    scheduler: SchedulerName = "euler_a"
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    tile: int = Field(512, ge=MIN_SIDE, le=2048, multiple_of=SIDE_MULTIPLE)
    overlap: int = Field(64, ge=0, le=512, description="at most half the tile")
    preview: bool = False

    @field_validator("overlap")
    @classmethod
    def _overlap_fits(cls, overlap: int, info: ValidationInfo) -> int:
        return _fitting_overlap(overlap, info)


class VideoRequest(LiveLook):
    """A clip restyled with the live stream's parameters (the same pipeline as a session's frames)."""

    video: str = Field(description="base64 MP4, MOV or WebM (a session recording is an MP4); size and length are checked from its headers")
    prompt: str = Field(max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    strength: float = Field(0.5, gt=0.0, le=1.0)
    steps: int = Field(2, ge=1, le=4, description="the stream's denoising steps per frame")
    guidance_scale: float = Field(1.2, ge=0.0, le=30.0)
    cfg_type: Literal["none", "full", "self", "initialize"] = "self"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    feedback: float = Field(0.0, ge=0.0, le=1.0, description="temporal option: how much of the previous frame's latent each frame starts from")
    width: int | None = Field(None, ge=MIN_SIDE, description="the output's size; None: the clip's, scaled down to fit the server's maximum")
    height: int | None = Field(None, ge=MIN_SIDE)
    preview: bool = False


class LiveSessionRequest(_Strict):
    """The session's own style, LoRAs and controls (its control layer included) come with it."""

    session_id: str = Field(max_length=64)
    session_token: str = Field(max_length=4096, description="the session's control token (ready.token)")
    steps: int = Field(25, ge=1, le=150)
    scheduler: SchedulerName = "euler_a"
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    strength: float | None = Field(None, gt=0.0, le=1.0, description="None: the session's strength")
    negative_prompt: str | None = Field(None, max_length=4000)
    width: int | None = Field(None, ge=MIN_SIDE, description="None: the session's resolution")
    height: int | None = Field(None, ge=MIN_SIDE)
    batch_size: int = Field(1, ge=1, le=8)
    preview: bool = False
    mask: str | None = Field(None, description="base64 image, white where the canvas is painted anew (an inpaint of the canvas); None: all of it")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: InpaintingFill = "original"


class JobKind:
    name: ClassVar[str]
    Request: ClassVar[type[BaseModel]]
    description: ClassVar[str]

    def parse(self, params: object) -> BaseModel:
        if not isinstance(params, dict):
            raise InvalidJob(f"params must be an object, got {type(params).__name__}", field="params")
        try:
            return self.Request.model_validate(params)
        except ValidationError as error:
            raise invalid_job(error, prefix="params.") from None

    def accept(self, request: Any, context: AcceptContext) -> Accepted:
        raise NotImplementedError

    def run(
        self,
        params: dict[str, Any],
        input_image: bytes | None,
        renderer: QualityRenderer,
        on_step: StepCallback,
        on_stage: StageCallback = lambda stage: None,
    ) -> list[ResultImage | ResultFile]:
        """Render on the worker: `on_step` after every denoising step, `on_stage` when a multi-part job
        (a workflow) moves on; either raises to stop the job there."""
        images = self.render(params, input_image, renderer, on_step)
        return described(params, images, renderer.models.get(params.get("model")).name)

    def render(self, params: dict[str, Any], input_image: bytes | None, renderer: QualityRenderer, on_step: StepCallback) -> list[Image.Image]:
        request = self.render_request(params, input_image, renderer)
        hires = params.get("hires")
        if not hires:
            return renderer.render(request, on_step)
        (width, height), (out_width, out_height) = HiresFix.model_validate(hires).sizes(params["width"], params["height"])
        second = dataclasses.replace(request, strength=hires["strength"], steps=hires["steps"] or request.steps, controls=())
        # One count of steps over every pass, so that progress (and A1111's ETA) never goes back.
        upscale = upscale_steps(renderer, (params["width"], params["height"]), (width, height), hires["upscaler"], params.get("model"))
        repaint = repaint_steps(out_width, out_height, hires["tile"], hires["overlap"], second.steps, second.strength)
        passes = Passes(on_step, [expected_steps(request), *[upscale, repaint] * request.batch_size])
        images = renderer.render(request, passes.of(0))
        refined = []
        for index, image in enumerate(images):
            larger = upscaled(renderer, image, width, height, hires["upscaler"], params.get("model"), passes.of(1 + 2 * index))
            # Cropped before the pass, as A1111 does, so that only what is kept is repainted.
            larger = _centre_crop(larger, out_width, out_height) if (out_width, out_height) != (width, height) else larger
            second_pass = dataclasses.replace(second, seed=nth_seed(request.seed, index))
            refined.append(refine(renderer, larger, second_pass, hires["tile"], hires["overlap"], passes.of(2 + 2 * index)))
        return refined

    def render_request(self, params: dict[str, Any], input_image: bytes | None, renderer: QualityRenderer) -> RenderRequest:
        """The stored parameters as the renderer takes them."""
        init_image = _decode_stored(input_image) if input_image is not None else None
        controls = tuple(BatchControl.model_validate(control) for control in params.get("controls", ()))
        control_image = _decode_stored(base64.b64decode(params["control_image"])) if params.get("control_image") else None
        depth = renderer.models.get(params.get("model")).depth
        sources = [control.reads(control_image, init_image) for control in controls]
        if any(source is None for source in sources):
            raise InvalidJob("controls need a control_image (or an input image)", field="params.control_image")
        prompt = params["prompt"]
        return RenderRequest(
            prompt=prompt if isinstance(prompt, str) else tuple((text, float(weight)) for text, weight in prompt),
            negative_prompt=params.get("negative_prompt", ""),
            width=params["width"],
            height=params["height"],
            steps=params["steps"],
            scheduler=params["scheduler"],
            guidance_scale=params["guidance_scale"],
            sigmas=params.get("sigmas", "normal"),
            seed=params["seed"],
            batch_size=params["batch_size"],
            init_image=init_image,
            strength=params.get("strength", 1.0),
            loras=tuple(sorted(params.get("loras", {}).items())),
            model=params.get("model"),
            controls=tuple(
                RenderControl(control.model, control.scale, control.start, control.end, preprocess(source, control.preprocessor, depth))  # type: ignore[arg-type]
                for control, source in zip(controls, sources)
            ),
        )


class Txt2Img(JobKind):
    name = "txt2img"
    Request = GenerationRequest
    description = "an image (or a batch) from a prompt"

    def accept(self, request: GenerationRequest, context: AcceptContext) -> Accepted:
        _check_size(request.width, request.height, context)
        _check_hires(request, request.width, request.height, context)
        params = request.model_dump()
        params["seed"] = _seed(request.seed)
        params.update(_live_look(request, context))
        if any(BatchControl.model_validate(control).reads(params["control_image"], None) is None for control in params["controls"]):
            raise InvalidJob("a txt2img job has no input image: its controls read a control_image", field="params.control_image")
        return Accepted(params)


class Img2Img(JobKind):
    name = "img2img"
    Request = Img2ImgRequest
    description = "an image (or a batch) from a prompt and a starting image"

    def accept(self, request: Img2ImgRequest, context: AcceptContext) -> Accepted:
        rgb = _decode_upload(request.image, context.image_limits)
        return Accepted(_image_params(request, context, rgb), _store_png(rgb))


class Inpaint(JobKind):
    """img2img inside a mask: the pixels outside it are the input's own, untouched."""

    name = "inpaint"
    Request = InpaintRequest
    description = "an image repainted inside a mask (with the model's inpainting UNet, or masked latent blending)"

    def accept(self, request: InpaintRequest, context: AcceptContext) -> Accepted:
        rgb = _decode_upload(request.image, context.image_limits)
        mask = _mask(_decode_upload_rgba(request.mask, context.image_limits, "mask"), rgb.shape[1], rgb.shape[0])
        if request.invert_mask:
            mask = 255 - mask
        return self._accepted(request, context, rgb, mask)

    def _accepted(self, request: InpaintRequest | OutpaintRequest, context: AcceptContext, rgb: np.ndarray, mask: np.ndarray) -> Accepted:
        if not mask.any():
            raise InvalidJob("the mask is empty: nothing would be painted", field="params.mask")
        if request.hires is not None:
            raise InvalidJob("hires is for txt2img and img2img; upscale the inpainted image with an upscale job", field="params.hires")
        params = _image_params(request, context, rgb, exclude=frozenset({"mask", "invert_mask", "left", "right", "top", "bottom"}))
        # The mask travels as the stored image's alpha channel.
        return Accepted(params, _store_png(np.dstack([rgb, mask])))

    def render(self, params: dict[str, Any], input_image: bytes | None, renderer: QualityRenderer, on_step: StepCallback) -> list[Image.Image]:
        assert input_image is not None, "an inpainting job has its image"
        with Image.open(io.BytesIO(input_image)) as stored:
            rgba = np.asarray(stored.convert("RGBA"), dtype=np.uint8)
        image, mask = rgba[..., :3], rgba[..., 3]
        blurred = _blurred(mask, params["mask_blur"])
        request = self.render_request(params, input_image, renderer)
        request = dataclasses.replace(request, init_image=_filled(image, mask, params["inpainting_fill"], params["seed"]), mask=blurred)
        size = (params["width"], params["height"])
        original = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS) if image.shape[1::-1] != size else Image.fromarray(image)
        weight = Image.fromarray(blurred).resize(size, Image.Resampling.BILINEAR) if blurred.shape[1::-1] != size else Image.fromarray(blurred)
        # Outside the mask the input's own pixels (the VAE's round trip would shift them a little).
        return [Image.composite(painted.convert("RGB"), original, weight) for painted in renderer.render(request, on_step)]


class Outpaint(Inpaint):
    """Inpainting on a larger canvas: the added border is the mask."""

    name = "outpaint"
    Request = OutpaintRequest  # type: ignore[assignment]
    description = "an image extended by a border painted to match it"

    def accept(self, request: OutpaintRequest, context: AcceptContext) -> Accepted:  # type: ignore[override]
        rgb = _decode_upload(request.image, context.image_limits)
        if not (request.left or request.right or request.top or request.bottom):
            raise InvalidJob("outpainting needs a border: left, right, top or bottom above 0", field="params.left")
        height, width = rgb.shape[:2]
        new_width, new_height = width + request.left + request.right, height + request.top + request.bottom
        limits = context.image_limits
        if new_width > limits.max_width or new_height > limits.max_height:
            raise InvalidJob(f"the extended canvas would be {new_width}x{new_height}, over the limit of {limits.max_width}x{limits.max_height}", field="params.left")
        extended = cv2.copyMakeBorder(rgb, request.top, request.bottom, request.left, request.right, cv2.BORDER_REPLICATE)
        mask = np.full((new_height, new_width), 255, dtype=np.uint8)
        mask[request.top : request.top + height, request.left : request.left + width] = 0
        return self._accepted(request, context, extended, mask)


class Upscale(JobKind):
    name = "upscale"
    Request = UpscaleRequest
    description = "an image made larger: resampled, and with strength above 0 repainted in tiles (hires fix)"

    def accept(self, request: UpscaleRequest, context: AcceptContext) -> Accepted:
        if request.controls:
            raise InvalidJob("controls are not applied tile by tile; repaint with img2img first, then upscale", field="params.controls")
        rgb = _decode_upload(request.image, context.image_limits)
        height, width = rgb.shape[:2]
        # Exactly the size asked for, as A1111's extras give it: a resample needs no multiple of 8, and
        # the hires pass repaints at the next one up (see `refine`).
        out_width = request.width or round(width * request.scale)
        out_height = request.height or round(height * request.scale)
        for name, value, given, maximum in (
            ("width", out_width, request.width, context.max_width), ("height", out_height, request.height, context.max_height)
        ):
            if value > maximum:
                asked, field = (f"{name} {value}", f"params.{name}") if given else (f"scale {request.scale:g} makes the {name} {value}", "params.scale")
                raise InvalidJob(f"{asked}, over the maximum of {maximum}", field=field)
        _check_upscaler(request.upscaler, (width, height), (out_width, out_height), context, request.model, "params.upscaler")
        params = request.model_dump(exclude={"image"})
        params.update(width=out_width, height=out_height, seed=_seed(request.seed), batch_size=1)
        params.update(_live_look(request, context))
        return Accepted(params, _store_png(rgb))

    def run(
        self,
        params: dict[str, Any],
        input_image: bytes | None,
        renderer: QualityRenderer,
        on_step: StepCallback,
        on_stage: StageCallback = lambda stage: None,
    ) -> list[ResultImage | ResultFile]:
        if params["strength"] > 0:
            return super().run(params, input_image, renderer, on_step, on_stage)
        # A plain resample says what A1111's extras say about one, and no diffusion settings.
        assert input_image is not None, "an upscale job has its image"
        image = Image.fromarray(_decode_stored(input_image))
        larger = upscaled(renderer, image, params["width"], params["height"], params["upscaler"], params.get("model"), on_step)
        by_scale = (params["width"], params["height"]) == (round(image.width * params["scale"]), round(image.height * params["scale"]))
        text = {"postprocessing": postprocessing_text(params, params["scale"] if by_scale else None)}
        return [ResultImage(larger, params["seed"], text, {"model": renderer.models.get(params.get("model")).name, **params})]

    def render(self, params: dict[str, Any], input_image: bytes | None, renderer: QualityRenderer, on_step: StepCallback) -> list[Image.Image]:
        assert input_image is not None and params["strength"] > 0, "the hires pass of an upscale job, over its image"
        image = Image.fromarray(_decode_stored(input_image))
        size, model = (params["width"], params["height"]), params.get("model")
        base = self.render_request(params, None, renderer)
        # One count of steps over both passes (see Passes).
        repaint = repaint_steps(*size, params["tile"], params["overlap"], base.steps, base.strength)
        passes = Passes(on_step, [upscale_steps(renderer, image.size, size, params["upscaler"], model), repaint])
        larger = upscaled(renderer, image, *size, params["upscaler"], model, passes.of(0))
        return [refine(renderer, larger, base, params["tile"], params["overlap"], passes.of(1))]


class Video(JobKind):
    name = "video"
    Request = VideoRequest
    description = "a video restyled frame by frame, as an H.264 MP4 with the clip's frame rate and audio"

    def accept(self, request: VideoRequest, context: AcceptContext) -> Accepted:
        data = request.video.partition(",")[2] if request.video.startswith("data:") else request.video
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidJob("video is not valid base64", field="params.video") from None
        info = probe(raw, VideoLimits(max_side=max(context.max_width, context.max_height)))
        width, height = output_size(info.width, info.height, context.max_width, context.max_height, (request.width, request.height))
        _check_size(width, height, context)
        params = request.model_dump(exclude={"video"})
        params.update(width=width, height=height, seed=_seed(request.seed), frames=info.frames, fps=info.fps, audio=info.audio)
        params.update(_live_look(request, context))
        if any(control["source"] == "control_image" for control in params["controls"]):
            raise InvalidJob("a video job's controls read each frame of the clip: no control_image", field="params.controls")
        stream_params(params)  # the live stream's own checks, now rather than on the worker
        return Accepted(params, raw)

    def run(
        self,
        params: dict[str, Any],
        input_image: bytes | None,
        renderer: QualityRenderer,
        on_step: StepCallback,
        on_stage: StageCallback = lambda stage: None,
    ) -> list[ResultImage | ResultFile]:
        assert input_image is not None, "a video job has its clip"
        model = renderer.models.get(params.get("model"))
        frames = StreamFrames(StreamPipeline(model, params["width"], params["height"]), stream_params(params))
        total = params["frames"]

        def on_frame(index: int, rgb: np.ndarray) -> None:
            on_step(index + 1, max(total, index + 1), lambda: preview_jpeg(Image.fromarray(rgb)))

        data = restyle(input_image, params["width"], params["height"], frames, on_frame)
        return [ResultFile(data, ".mp4", params["width"], params["height"], params["seed"])]


class StreamFrames:
    """A StreamPipeline as a FrameStream: each input comes out once, in order, though the stream batch
    answers an input `depth - 1` frames after it was fed."""

    def __init__(self, pipeline: StreamPipeline, params: StreamParams) -> None:
        self.pipeline = pipeline
        pipeline.configure(params, img2img=True)
        self.next = 0
        self.last: tuple[int, np.ndarray] | None = None

    def feed(self, rgb: np.ndarray, index: int) -> list[tuple[int, np.ndarray]]:
        self.last = (index, rgb)
        return self._answered(self.pipeline.render(rgb, tag=index, refill=index == 0))

    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        for _ in range(self.pipeline.depth + 1):  # the inputs still inside the stream batch
            if self.last is None or self.next > self.last[0]:
                return
            yield from self._answered(self.pipeline.render(self.last[1], tag=self.last[0]))
        if self.last is not None and self.next <= self.last[0]:
            raise RuntimeError(f"the stream did not answer frame {self.next} of {self.last[0] + 1}")

    def _answered(self, result: RenderResult) -> list[tuple[int, np.ndarray]]:
        if result.image is None or result.answers < self.next:
            return []  # priming the stream batch: no new frame yet
        out = [(index, result.image) for index in range(self.next, result.answers + 1)]
        self.next = result.answers + 1
        return out


def stream_params(params: dict[str, Any]) -> StreamParams:
    """A video job's parameters as the live stream takes them (its controls read each frame)."""
    fields = {name: params[name] for name in ("prompt", "negative_prompt", "strength", "steps", "guidance_scale", "cfg_type", "seed", "feedback")}
    controls = [{**control, "source": "canvas"} for control in params.get("controls", [])]
    try:
        return StreamParams().replace(**fields, loras=tuple(sorted(params.get("loras", {}).items())), controls=tuple(controls))
    except InvalidParameter as error:
        raise InvalidJob(f"params.{error}", field=f"params.{error.field}") from None


class LiveSession(JobKind):
    name = "live_session"
    Request = LiveSessionRequest
    description = "the current canvas, prompt and seed of a live session, rendered at full quality"

    def accept(self, request: LiveSessionRequest, context: AcceptContext) -> Accepted:
        live = context.capture_live(request.session_id, request.session_token)
        width = request.width or live.width
        height = request.height or live.height
        _check_size(width, height, context)
        session = live.params
        prompts = session.prompts()  # the style's template already applied
        # Each control reads what it reads live: the control layer (the job's control_image; a control on a
        # layer never sent does nothing, live or here) or the canvas (the job's input image).
        has_layer = live.control_layer is not None
        controls = [control for control in session.controls if control.source == "canvas" or has_layer]
        reads_layer = any(control.source == "layer" for control in controls)
        params = {
            "session_id": request.session_id,
            "prompt": prompts[0][0] if len(prompts) == 1 else [list(pair) for pair in prompts],
            "negative_prompt": session.negative_prompt if request.negative_prompt is None else request.negative_prompt,
            "seed": session.seed,
            "width": width,
            "height": height,
            "steps": request.steps,
            "scheduler": request.scheduler,
            "guidance_scale": request.guidance_scale,
            "batch_size": request.batch_size,
            "preview": request.preview,
            "model": live.model,
            "style": session.style,
            "loras": dict(session.active_loras),
            "controls": [
                {
                    "model": c.model, "scale": c.scale, "start": c.start, "end": c.end, "preprocessor": c.preprocessor,
                    "source": "control_image" if c.source == "layer" else "image",
                }
                for c in controls
            ],
            "control_image": _base64_png(live.control_layer) if reads_layer else None,
        }
        if live.canvas is None and request.mask is not None:
            raise InvalidJob("a mask needs the session's canvas: this session renders from its prompt alone", field="params.mask")
        if live.canvas is None:  # a txt2img session: its prompt and seed (and control layer) are all there is
            return Accepted(params)
        params["strength"] = request.strength if request.strength is not None else session.strength
        if request.mask is None:
            return Accepted(params, _store_png(live.canvas))
        # The masked area is inpainted; the rest of the result is the canvas itself.
        height, width = live.canvas.shape[:2]
        mask = _mask(_decode_upload_rgba(request.mask, context.image_limits, "mask"), width, height)
        if not mask.any():
            raise InvalidJob("the mask is empty: nothing would be painted", field="params.mask")
        params.update(mask_blur=request.mask_blur, inpainting_fill=request.inpainting_fill)
        return Accepted(params, _store_png(np.dstack([live.canvas, mask])))

    def render(self, params: dict[str, Any], input_image: bytes | None, renderer: QualityRenderer, on_step: StepCallback) -> list[Image.Image]:
        if "mask_blur" in params:  # created with a mask
            return KINDS["inpaint"].render(params, input_image, renderer, on_step)
        return super().render(params, input_image, renderer, on_step)


PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")
"""ComfyUI's extra_data.preview_method values that ask for previews of the sampler's steps."""


class WorkflowRequest(_Strict):
    prompt: dict[str, Any] = Field(description="the graph in ComfyUI's API format: node id → {class_type, inputs}")
    client_id: str | None = Field(None, max_length=128, description="ComfyUI's client id: the /ws connection that gets this job's progress")
    extra_data: dict[str, Any] = Field(default_factory=dict, description="ComfyUI's extra_data; each key of its extra_pnginfo becomes a PNG text chunk")


class Workflow(JobKind):
    name = "workflow"
    Request = WorkflowRequest
    description = "a graph of nodes in ComfyUI's API format (GET /object_info lists the node classes)"

    def accept(self, request: WorkflowRequest, context: AcceptContext) -> Accepted:
        extra_pnginfo = request.extra_data.get("extra_pnginfo", {})
        if not isinstance(extra_pnginfo, dict):
            raise InvalidJob("extra_data.extra_pnginfo must be an object", field="params.extra_data.extra_pnginfo")
        validated = plan(request.prompt, REGISTRY, context.catalog())
        # The uploads a LoadImage reads travel inside the job (see uploads.py).
        names = sorted({step.inputs["image"] for step in validated.steps if step.node.name == "LoadImage"})
        files = {name: context.uploads.read(name) for name in names} if context.uploads is not None else {}
        params = {
            "prompt": request.prompt,
            "client_id": request.client_id,
            "extra_data": request.extra_data,
            "outputs": list(validated.outputs),
            "preview": request.extra_data.get("preview_method") in PREVIEW_METHODS,
            "max_width": context.max_width,
            "max_height": context.max_height,
        }
        return Accepted(params, msgpack.packb(files) if files else None)

    def run(
        self,
        params: dict[str, Any],
        input_image: bytes | None,
        renderer: QualityRenderer,
        on_step: StepCallback,
        on_stage: StageCallback = lambda stage: None,
    ) -> list[ResultImage]:
        files: dict[str, bytes] = msgpack.unpackb(input_image) if input_image else {}
        # Checked again against this worker's models (it may run another version than the server).
        catalog = workflow_catalog(renderer.models.choices(), params["max_width"], params["max_height"], lambda name: name in files)
        validated = plan(params["prompt"], REGISTRY, catalog)
        context = NodeContext(
            renderer, files, on_step, params["max_width"], params["max_height"], params["prompt"], params["extra_data"].get("extra_pnginfo", {})
        )
        execute(validated, context, lambda node_id, done: on_stage(Stage(node_id, done, context.outputs)))
        on_stage(Stage(None, tuple(step.id for step in validated.steps), context.outputs))
        return context.results


KINDS: dict[str, JobKind] = {
    kind.name: kind for kind in (Txt2Img(), Img2Img(), Inpaint(), Outpaint(), Upscale(), Video(), LiveSession(), Workflow())
}


def workflow_catalog(
    models: Mapping[str, ModelChoice],
    max_width: int,
    max_height: int,
    has_image: Callable[[str], bool],
    images: Callable[[], tuple[str, ...]] = lambda: (),
) -> Catalog:
    """What a workflow may name: these models and their LoRAs and ControlNets, these images."""

    def union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for group in groups for name in group))

    return Catalog(
        checkpoints=tuple(models),
        loras=union(choice.loras for choice in models.values()),
        controlnets=union(choice.controlnets for choice in models.values()),
        upscale_models=union((name for name, _ in choice.upscalers) for choice in models.values()),
        images=images,
        has_image=has_image,
        max_width=max_width,
        max_height=max_height,
    )


def _live_look(request: LiveLook, context: AcceptContext) -> dict[str, Any]:
    """The request's style, LoRAs and controls, checked against what this server has, with the style's
    template applied to the prompt and its fields under the request's own."""
    where = "params."
    extra: dict[str, Any] = {"style": request.style, "control_image": None}
    choice = _model_choice(request.model, context)
    if context.models:
        extra["model"] = request.model or next(iter(context.models))
    loras = dict(request.loras)
    controls = [control.model_dump() for control in request.controls]
    prompt = getattr(request, "prompt", "")
    negative = getattr(request, "negative_prompt", "")
    if request.style:
        preset = context.styles.get(request.style)
        if preset is None:
            error = UnknownName.listing("style", "style preset", request.style, context.styles)
            raise InvalidJob(f"{where}{error}", field=f"{where}style")
        template = preset.fields.get("prompt_template", "{prompt}")
        prompt = template.replace("{prompt}", prompt)
        negative = negative or preset.fields.get("negative_prompt", "")
        loras = {**dict(preset.fields.get("loras", {})), **loras}
        if preset.control_scale is not None:
            for control in controls:
                control["scale"] = preset.control_scale
    try:  # the live stream's own checks: ranges, start below end, and names this model has
        choice.check(StreamParams(loras=loras, controls=[{k: v for k, v in control.items() if k != "source"} for control in controls]))
    except InvalidParameter as error:
        raise InvalidJob(f"{where}{error}", field=f"{where}{error.field}") from None
    if request.control_image is not None:
        extra["control_image"] = _base64_png(_decode_upload(request.control_image, context.image_limits, "control_image"))
    extra.update(prompt=prompt, negative_prompt=negative, loras={name: weight for name, weight in loras.items() if weight}, controls=controls)
    return extra


def _image_params(
    request: Img2ImgRequest | OutpaintRequest, context: AcceptContext, rgb: np.ndarray, exclude: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The stored parameters of a job that starts from an image: its size (the image's, rounded down to
    multiples of 8 within the maximum, unless given), a seed, and the live look."""
    height, width = rgb.shape[:2]
    width = request.width or _fit(width, context.max_width)
    height = request.height or _fit(height, context.max_height)
    _check_size(width, height, context)
    _check_hires(request, width, height, context)
    params = request.model_dump(exclude={"image", *exclude})
    params.update(width=width, height=height, seed=_seed(request.seed))
    params.update(_live_look(request, context))
    return params


def _hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(64, round(width * scale) // 8 * 8), max(64, round(height * scale) // 8 * 8)


def _fitting_overlap(overlap: int, info: ValidationInfo) -> int:
    """Tiles overlap by at most half their size. More made the tiles' stride a few pixels: a 128² hires
    fix at tile 64, overlap 64 was 626 tile renders instead of 9."""
    tile = info.data.get("tile")
    if tile is not None and overlap > tile // 2:
        raise ValueError(f"overlap {overlap} is more than half the tile ({tile}): at most {tile // 2}")
    return overlap


def _side(length: float, up: bool = False) -> int:
    """A side of `length` pixels as a multiple of 8: the nearest, or the next one up (`up`)."""
    return aligned(length) if up else max(MIN_SIDE, round(length / SIDE_MULTIPLE) * SIDE_MULTIPLE)


def _centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _check_hires(request: GenerationRequest, width: int, height: int, context: AcceptContext) -> None:
    if request.hires is None:
        return
    hires = request.hires
    (cover_width, cover_height), (out_width, out_height) = hires.sizes(width, height)
    if max(cover_width, out_width) > context.max_width or max(cover_height, out_height) > context.max_height:
        asked = f"hires.scale {hires.scale:g}" if hires.width is None and hires.height is None else f"hires to {out_width}x{out_height}"
        raise InvalidJob(
            f"{asked} would make {max(cover_width, out_width)}x{max(cover_height, out_height)}, over the limit of {context.max_width}x{context.max_height}",
            field="params.hires.scale" if hires.width is None and hires.height is None else "params.hires",
        )
    _check_upscaler(hires.upscaler, (width, height), (cover_width, cover_height), context, request.model, "params.hires.upscaler")


def _check_upscaler(
    name: str, size: tuple[int, int], out_size: tuple[int, int], context: AcceptContext, model: str | None, field: str
) -> None:
    """A resampler, or a super-resolution network of the job's model whose passes stay within twice
    the server's maximum size each way before they are resampled to the output size."""
    if name in RESAMPLERS:
        return
    networks = dict(_model_choice(model, context).upscalers)
    if name not in networks:
        error = UnknownName.listing(field.rpartition(".")[2], "upscaler", name, [*RESAMPLERS, *networks])
        raise InvalidJob(f"{field.rpartition('.')[0]}.{error}", field=field)
    passes = network_passes(networks[name], *size, *out_size)
    width, height = (side * networks[name] ** passes for side in size)
    if width > 2 * context.max_width or height > 2 * context.max_height:
        raise InvalidJob(
            f"{field}: {name!r} (x{networks[name]}) would make {width}x{height} on the way to {out_size[0]}x{out_size[1]}, over twice "
            f"the limit of {context.max_width}x{context.max_height}; use a network of a smaller factor, or a resampler",
            field=field,
        )


def _model_choice(model: str | None, context: AcceptContext) -> ModelChoice:
    """What the job's model (or the default) lets it name; UnknownName-style InvalidJob for a model the server lacks."""
    if not context.models:
        return ModelChoice()
    name = model or next(iter(context.models))
    if name not in context.models:
        error = UnknownName.listing("model", "model", name, context.models)
        raise InvalidJob(f"params.{error}", field="params.model")
    return context.models[name]


def _base64_png(rgb: np.ndarray | None) -> str | None:
    return None if rgb is None else base64.b64encode(_store_png(rgb)).decode("ascii")


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(MAX_SEED)


def _fit(size: int, maximum: int) -> int:
    return max(MIN_SIDE, min(maximum, size) // SIDE_MULTIPLE * SIDE_MULTIPLE)


def _check_size(width: int, height: int, context: AcceptContext) -> None:
    for name, value, maximum in (("width", width, context.max_width), ("height", height, context.max_height)):
        problem = side_problem(value, maximum)
        if problem is not None:
            raise InvalidJob(f"{name} {problem}", field=f"params.{name}")


def _decode_upload(data: str, limits: ImageLimits, name: str = "image") -> np.ndarray:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidJob(f"{name} is not valid base64", field=f"params.{name}") from None
    image_format = images.sniff_format(raw)
    if image_format is None:
        raise InvalidJob(f"{name} is not a PNG, JPEG or WebP file", field=f"params.{name}")
    try:
        return images.decode(image_format, raw, limits)
    except CodecError as error:
        raise InvalidJob(f"{name}: {error}", field=f"params.{name}") from None


def _decode_upload_rgba(data: str, limits: ImageLimits, name: str) -> np.ndarray:
    """An uploaded mask: its alpha channel when that says something (not opaque all over), else its
    grey levels."""
    _decode_upload(data, limits, name)  # the same checks (base64, format, size limits) first
    raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)
    with Image.open(io.BytesIO(raw)) as opened:
        if "A" in opened.getbands():
            alpha = np.asarray(opened.getchannel("A"), dtype=np.uint8)
            if alpha.min() < 255:
                return alpha
        return np.asarray(opened.convert("L"), dtype=np.uint8)


def _mask(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    """0/255 at the image's size (a mask of another size is resized to it)."""
    if grey.shape != (height, width):
        grey = np.asarray(Image.fromarray(grey).resize((width, height), Image.Resampling.NEAREST))
    return np.where(grey >= 128, 255, 0).astype(np.uint8)


def _blurred(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


def _filled(image: np.ndarray, mask: np.ndarray, fill: str, seed: int) -> np.ndarray:
    """What the masked area starts as (A1111's inpainting_fill, in pixels)."""
    inside = mask >= 128
    if fill == "original":
        return image
    if fill == "fill":  # a fill from the surroundings (fast marching)
        return cv2.inpaint(image, inside.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    result = image.copy()
    if fill == "latent_noise":
        noise = np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
        result[inside] = noise[inside]
    else:  # latent_nothing: mid grey, which the VAE encodes as near-zero latents
        result[inside] = 127
    return result


def _store_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode_stored(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def invalid_job(error: ValidationError, prefix: str = "") -> InvalidJob:
    """The first problem pydantic found, as an InvalidJob naming its field (`prefix` + its path)."""
    problem = error.errors()[0]
    where = prefix + ".".join(str(part) for part in problem["loc"])
    message = problem["msg"]
    if problem["type"] == "extra_forbidden":
        message = "unknown field"
    elif problem["type"] == "missing":
        message = "required field is missing"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return InvalidJob(f"{where}: {message}{more}", field=where or None)
