"""A subset of the AUTOMATIC1111 web UI's HTTP API, so existing clients and tools work unmodified.

`/sdapi/v1/txt2img` and `/sdapi/v1/img2img` are synchronous there: they queue an ordinary job (the
same queue, validation and result files as `/v1/jobs`) and answer when it ends, with base64 PNGs,
the request echoed back as `parameters`, and `info` as a JSON string. Fields A1111 has that do not
apply here (restore_faces, hires fix, scripts, …) are accepted and ignored, as A1111's own API does
with fields it does not know.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamcanvas.pipelines.sizes import SIDE_MULTIPLE

from .api import MAX_BODY_BYTES, endpoint, read_json, service_of
from .errors import BatchError
from .results import SAMPLERS, SCHEDULE_TYPE_NAMES, SCHEDULE_TYPES, SCHEDULER_NAMES, UPSCALERS, infotext
from .store import JobRecord, JobStatus

PREFIX = "/sdapi/v1"

_SAMPLER_LOOKUP = {alias.lower(): scheduler for name, (scheduler, aliases) in SAMPLERS.items() for alias in [name, *aliases]}


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler a"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    send_images: bool = True
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75  # type: ignore[assignment]
    include_init_images: bool = False
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


INPAINTING_FILL = ("fill", "original", "latent_noise", "latent_nothing")
"""A1111's inpainting_fill codes 0 … 3."""

# A1111's latent upscalers ("Latent", "Latent (bicubic)", …) map onto the same resamplers as its
# others (results.UPSCALERS): this server upscales in pixels before the second pass.
_UPSCALER_LOOKUP = {name.lower(): method for name, method in UPSCALERS.items()}
_LATENT_UPSCALERS = {"latent": "bilinear", "latent (antialiased)": "bilinear", "latent (bicubic)": "bicubic",
                     "latent (bicubic antialiased)": "bicubic", "latent (nearest)": "nearest", "latent (nearest-exact)": "nearest"}


def _networks(request: Request) -> dict[str, int]:
    """The default model's super-resolution networks by name, with their factors."""
    return service_of(request).models.default.upscalers.scales


def _sampler_and_schedule(sampler: str, schedule_type: str | None) -> tuple[str, str]:
    """Our scheduler and spacing for A1111's sampler name and `scheduler` field (1.9+). Older clients
    put the schedule type in the sampler's name ("DPM++ 2M Karras"); a `scheduler` other than Automatic
    wins over it, as in A1111. KeyError: no such sampler; ValueError: no such schedule type."""
    key, sigmas = sampler.lower(), "normal"
    if key not in _SAMPLER_LOOKUP:
        for name, spacing in SCHEDULE_TYPES.items():
            if key.endswith(" " + name.lower()) and key[: -len(name) - 1] in _SAMPLER_LOOKUP:
                key, sigmas = key[: -len(name) - 1], spacing
                break
    scheduler = _SAMPLER_LOOKUP[key]
    if schedule_type is not None and schedule_type.lower() != "automatic":
        wanted = _schedule_type_name(schedule_type)  # its label ("SGM Uniform") or its name ("sgm_uniform")
        if wanted not in _SCHEDULE_LOOKUP:
            raise ValueError(schedule_type)
        sigmas = _SCHEDULE_LOOKUP[wanted]
    return scheduler, sigmas


def _schedule_type_name(label: str) -> str:
    return label.lower().replace(" ", "_")


_SCHEDULE_LOOKUP = {_schedule_type_name(label): spacing for label, spacing in SCHEDULE_TYPES.items()}


def _upscaler(name: str | None, networks: dict[str, int], latent: bool = False) -> str:
    """Ours for an A1111 upscaler name (a resampler, a network by its name in any case, or with
    `latent` the Latent ones); KeyError for one this server does not have."""
    if name is None:
        return "lanczos"
    key = name.lower()
    if key in _UPSCALER_LOOKUP:
        return _UPSCALER_LOOKUP[key] or "lanczos"
    for network in networks:
        if network.lower() == key:
            return network
    if latent:
        return _LATENT_UPSCALERS[key]
    raise KeyError(name)


def _no_upscaler(name: str | None, networks: dict[str, int], latent: bool = False) -> JSONResponse:
    listed = ", ".join([*UPSCALERS, *networks])
    return _detail(404, f"Upscaler not found: {name!r}; this server has {listed}{' and the Latent ones' if latent else ''}")


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def a1111_endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """API-key check, and typed errors answered as A1111 does: `{"detail": message}`."""
    return endpoint(handler, lambda error: _detail(error.status, str(error)))


def _validation(error: ValidationError) -> JSONResponse:
    detail = [{"loc": ["body", *problem["loc"]], "msg": problem["msg"], "type": problem["type"]} for problem in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


GENERATION_FIELDS = {
    "params.prompt": "prompt",
    "params.negative_prompt": "negative_prompt",
    "params.steps": "steps",
    "params.scheduler": "sampler_name",
    "params.sigmas": "scheduler",
    "params.guidance_scale": "cfg_scale",
    "params.width": "width",
    "params.height": "height",
    "params.seed": "seed",
    "params.batch_size": "batch_size",
    "params.strength": "denoising_strength",
    "params.image": "init_images",
    "params.mask": "mask",
    "params.mask_blur": "mask_blur",
    "params.hires": "enable_hr",
    "params.hires.scale": "hr_scale",
    "params.hires.width": "hr_resize_x",
    "params.hires.height": "hr_resize_y",
    "params.hires.upscaler": "hr_upscaler",
    "params.hires.strength": "denoising_strength",
    "params.hires.steps": "hr_second_pass_steps",
}
"""The job fields A1111's generation routes fill, by the A1111 field they come from: a refusal names
what the client sent (cfg_scale, not the job's guidance_scale)."""
EXTRAS_FIELDS = {
    "params.image": "image",
    "params.scale": "upscaling_resize",
    "params.width": "upscaling_resize_w",
    "params.height": "upscaling_resize_h",
    "params.upscaler": "upscaler_1",
}
MAX_IMAGES = 8


async def _generate(request: Request, img2img: bool) -> Response:
    try:
        body = (Img2ImgBody if img2img else Txt2ImgBody).model_validate(await read_json(request))
    except ValidationError as error:
        return _validation(error)
    if body.batch_size * body.n_iter > MAX_IMAGES:
        problem = f"batch_size × n_iter is {body.batch_size} × {body.n_iter} = {body.batch_size * body.n_iter}: at most {MAX_IMAGES} images a request"
        return JSONResponse({"detail": [{"loc": ["body", "n_iter"], "msg": problem, "type": "value_error"}]}, status_code=422)
    sampler = body.sampler_name or body.sampler_index
    try:
        scheduler, sigmas = _sampler_and_schedule(sampler, body.scheduler)
    except KeyError:
        return _detail(404, f"Sampler not found: {sampler!r}; this server has {', '.join(SAMPLERS)}, each also with a schedule type: "
                            f"{', '.join(SCHEDULE_TYPE_NAMES.values())} (\"DPM++ 2M Karras\")")
    except ValueError:
        problem = f"scheduler {body.scheduler!r} is not one this server has: {', '.join(SCHEDULE_TYPES)}"
        return JSONResponse({"detail": [{"loc": ["body", "scheduler"], "msg": problem, "type": "value_error"}]}, status_code=422)
    params: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "scheduler": scheduler,
        "sigmas": sigmas,
        "guidance_scale": body.cfg_scale,
        "batch_size": body.batch_size * body.n_iter,
        "width": body.width,
        "height": body.height,
        "preview": True,  # A1111 clients show /progress's current_image while they wait
    }
    if body.seed >= 0:
        params["seed"] = body.seed
    if body.enable_hr and not img2img:
        networks = _networks(request)
        try:
            upscaler = _upscaler(body.hr_upscaler, networks, latent=True)
        except KeyError:
            return _no_upscaler(body.hr_upscaler, networks, latent=True)
        # A target size instead of a factor: scaled to cover it, then the middle cropped to it, as A1111
        # does (sides to the nearest multiple of 8; with one of the two the other follows the aspect).
        size = {
            side: round(value / SIDE_MULTIPLE) * SIDE_MULTIPLE
            for side, value in (("width", body.hr_resize_x), ("height", body.hr_resize_y))
            if value
        }
        params["hires"] = {
            **({"scale": body.hr_scale} if not size else size),
            "upscaler": upscaler,
            "strength": body.denoising_strength if body.denoising_strength is not None else 0.7,
            "steps": body.hr_second_pass_steps or None,
        }
    kind = "txt2img"
    if img2img:
        assert isinstance(body, Img2ImgBody)
        params.update(image=body.init_images[0], strength=body.denoising_strength)
        kind = "img2img"
        if body.mask:
            kind = "inpaint"
            params.update(
                mask=body.mask,
                mask_blur=body.mask_blur,
                inpainting_fill=INPAINTING_FILL[body.inpainting_fill],
                invert_mask=bool(body.inpainting_mask_invert),
            )
    service = service_of(request)
    record = await _run_job(request, {"kind": kind, "params": params}, GENERATION_FIELDS)
    if isinstance(record, Response):
        return record
    if record.status is JobStatus.FAILED:
        return JSONResponse({"error": "GenerationFailed", "detail": record.error or "", "body": "", "errors": record.error or ""}, status_code=500)
    images = [base64.b64encode(await asyncio.to_thread(_read, result.path)).decode() for result in record.results] if body.send_images else []
    parameters = body.model_dump()
    if img2img and not parameters.pop("include_init_images", False):
        parameters["init_images"] = None
    info = _info(record, service.model.name, body.batch_size)
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})


async def _run_job(request: Request, job: dict[str, Any], fields: dict[str, str]) -> JobRecord | Response:
    """Queue an ordinary job and wait for its end (A1111's routes answer synchronously); a refusal as
    A1111 answers it, naming the A1111 field at fault (`fields`), or 499 when the client has left (the
    job goes on: GET /v1/jobs/{id} has it)."""
    service = service_of(request)
    try:
        record, _ = await asyncio.to_thread(service.create, job)
    except BatchError as error:
        return JSONResponse({"detail": [{"loc": ["body", *_a1111_loc(error.field, fields)], "msg": str(error), "type": error.code}]}, status_code=error.status)
    while not record.status.terminal:
        if await request.is_disconnected():
            return Response(status_code=499)
        await asyncio.sleep(0.1)
        record = await asyncio.to_thread(service.get, record.id)
    return record


def _a1111_loc(field: str | None, fields: dict[str, str]) -> list[str]:
    """A job field (`params.hires.scale`) as the A1111 field it came from, or else its own path."""
    if not field:
        return []
    if field in fields:
        return [fields[field]]
    return field.removeprefix("params.").split(".")


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _info(record: JobRecord, model_name: str, batch_size: int) -> dict[str, Any]:
    """A1111's `info`: the job (of batch_size × n_iter images) as A1111 describes what it made."""
    params = record.params
    seeds = [result.seed for result in record.results] or [params["seed"]]
    return {
        "prompt": params["prompt"],
        "all_prompts": [params["prompt"]] * len(seeds),
        "negative_prompt": params.get("negative_prompt", ""),
        "all_negative_prompts": [params.get("negative_prompt", "")] * len(seeds),
        "seed": params["seed"],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "width": params["width"],
        "height": params["height"],
        "sampler_name": SCHEDULER_NAMES[params["scheduler"]],
        "cfg_scale": params["guidance_scale"],
        "steps": params["steps"],
        "batch_size": batch_size,
        "denoising_strength": params.get("strength", (params.get("hires") or {}).get("strength")),
        "sd_model_name": model_name,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(record.created_at)),
        "infotexts": [infotext(params, seed, model_name) for seed in seeds],
        "interrupted": record.status is JobStatus.CANCELLED,
        "streamcanvas_job_id": record.id,
    }


@a1111_endpoint
async def txt2img(request: Request) -> Response:
    return await _generate(request, img2img=False)


@a1111_endpoint
async def img2img(request: Request) -> Response:
    return await _generate(request, img2img=True)


@a1111_endpoint
async def progress(request: Request) -> Response:
    service = service_of(request)
    running = await asyncio.to_thread(service.store.list, JobStatus.RUNNING, 1)
    counts = await asyncio.to_thread(service.store.counts)
    state = {
        "skipped": False,
        "interrupted": False,
        "job": "",
        "job_count": counts["queued"] + counts["running"],
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not running:
        return JSONResponse({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None})
    record = running[0]
    fraction = record.step / record.steps if record.steps else 0.0
    elapsed = time.time() - (record.started_at or time.time())
    state.update(
        job=record.id,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(record.created_at)),
        interrupted=record.cancel_requested,
        sampling_step=record.step,
        sampling_steps=record.steps,
    )
    current_image = None
    if request.query_params.get("skip_current_image", "false").lower() != "true":
        preview = await asyncio.to_thread(service.store.preview, record.id)
        current_image = base64.b64encode(preview).decode() if preview else None
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return JSONResponse({"progress": fraction, "eta_relative": eta, "state": state, "current_image": current_image, "textinfo": None})


@a1111_endpoint
async def interrupt(request: Request) -> Response:
    await asyncio.to_thread(service_of(request).store.request_cancel_running)
    return JSONResponse({})


def _model_entry(request: Request) -> dict[str, Any]:
    model = service_of(request).model
    return {
        "title": model.name,
        "model_name": model.name,
        "hash": None,
        "sha256": None,
        "filename": str(model.path),
        "config": None,
    }


@a1111_endpoint
async def options(request: Request) -> Response:
    service = service_of(request)
    current = {
        "sd_model_checkpoint": service.model.name,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "outdir_samples": str(service.config.results_dir),
        "enable_pnginfo": True,
    }
    if request.method == "GET":
        return JSONResponse(current)
    changes = await read_json(request)
    if not isinstance(changes, dict):
        return _detail(422, "the body must be a JSON object of options")
    wanted = changes.get("sd_model_checkpoint")
    if wanted is not None and wanted != service.model.name:
        return _detail(422, f"model {wanted!r} is not loaded; this server serves {service.model.name!r} (restart it with --model)")
    return JSONResponse(None)


@a1111_endpoint
async def sd_models(request: Request) -> Response:
    return JSONResponse([_model_entry(request)])


@a1111_endpoint
async def samplers(request: Request) -> Response:
    return JSONResponse([{"name": name, "aliases": aliases, "options": {}} for name, (_, aliases) in SAMPLERS.items()])


@a1111_endpoint
async def schedulers(request: Request) -> Response:
    """A1111's schedule types (1.9+) that this server has; which sampler takes which is checked per job."""
    return JSONResponse([
        {"name": _schedule_type_name(label), "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for label in SCHEDULE_TYPES
    ])


@a1111_endpoint
async def cmd_flags(request: Request) -> Response:
    """The A1111 command-line flags that describe this server (clients read it to find an API-only server)."""
    return JSONResponse({"api": True, "nowebui": True, "ckpt": service_of(request).model.name})


class ExtraSingleImageBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(min_length=1)
    resize_mode: int = Field(0, ge=0, le=1)
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaler_1: str = "Lanczos"


@a1111_endpoint
async def extra_single_image(request: Request) -> Response:
    """Upscale one image (an `upscale` job without the diffusion pass): {"image": base64 PNG, "html_info"}."""
    try:
        body = ExtraSingleImageBody.model_validate(await read_json(request))
    except ValidationError as error:
        return _validation(error)
    networks = _networks(request)
    try:
        upscaler = _upscaler(body.upscaler_1, networks)
    except KeyError:
        return _no_upscaler(body.upscaler_1, networks)
    params: dict[str, Any] = {"image": body.image, "upscaler": upscaler}
    if body.resize_mode == 1:
        params.update(width=body.upscaling_resize_w, height=body.upscaling_resize_h)
    else:
        params["scale"] = body.upscaling_resize
    record = await _run_job(request, {"kind": "upscale", "params": params}, EXTRAS_FIELDS)
    if isinstance(record, Response):
        return record
    if record.status is not JobStatus.FINISHED:
        return JSONResponse({"error": "UpscaleFailed", "detail": record.error or "", "body": "", "errors": record.error or ""}, status_code=500)
    image = base64.b64encode(await asyncio.to_thread(_read, record.results[0].path)).decode()
    return JSONResponse({"html_info": f"<p>{record.results[0].width}x{record.results[0].height}, {params['upscaler']}</p>", "image": image})


@a1111_endpoint
async def upscalers(request: Request) -> Response:
    """The resamplers, then the super-resolution networks (A1111 lists its ESRGAN-family models so)."""
    models = service_of(request).models
    listed = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0} for name in UPSCALERS]
    listed += [
        {"name": entry["name"], "model_name": entry["network"], "model_path": entry["path"], "model_url": None, "scale": float(entry["scale"])}
        for entry in models.default.upscalers.describe()
    ]
    return JSONResponse(listed)


@a1111_endpoint
async def png_info(request: Request) -> Response:
    """A PNG's text chunks: A1111's `parameters` as `info` (and parsed), the others as `items`."""
    body = await read_json(request)
    data = body.get("image") if isinstance(body, dict) else None
    if not isinstance(data, str) or not data:
        return _detail(422, "image: a base64 PNG is required")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            chunks = {key: value for key, value in getattr(image, "text", {}).items() if isinstance(value, str)}
    except (binascii.Error, ValueError) as error:
        return _detail(422, f"image: not valid base64 ({error})")
    except OSError:  # PIL's message names its in-memory file object: say what it means instead
        return _detail(422, "image: not a readable image (PNG, JPEG or WebP)")
    info = chunks.pop("parameters", "")
    return JSONResponse({"info": info, "items": chunks, "parameters": _parse_infotext(info)})


def _parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext back into fields: the prompt, the negative prompt, and `Key: value` pairs."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and ": " in lines[-1] and "Steps: " in lines[-1] else ""
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    fields: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative[0][len("Negative prompt: "):] if negative else ""}
    for pair in settings.split(", "):
        key, _, value = pair.partition(": ")
        if not (key and value):
            continue
        size = _SIZE_VALUE.fullmatch(value)
        if size:  # "Size: 512x768" is Size-1 and Size-2, as A1111 parses it (so is "Hires resize")
            fields.update({f"{key}-1": int(size[1]), f"{key}-2": int(size[2])})
        else:
            fields[key] = _number(value)
    return fields


_SIZE_VALUE = re.compile(r"(\d+)x(\d+)")


def _number(value: str) -> int | float | str:
    """A value of the infotext as the number it writes, where it is one ("7" and "7.5" alike)."""
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return number if math.isfinite(number) else value
    return value


@a1111_endpoint
async def loras(request: Request) -> Response:
    model = service_of(request).model
    return JSONResponse([
        {"name": name, "alias": name, "path": str(path), "metadata": {}} for name, path in model.adapters.paths.items()
    ])


def a1111_routes() -> list[Route]:
    return [
        Route(f"{PREFIX}/txt2img", txt2img, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/img2img", img2img, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/progress", progress, methods=["GET"]),
        Route(f"{PREFIX}/interrupt", interrupt, methods=["POST"]),
        Route(f"{PREFIX}/options", options, methods=["GET", "POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/sd-models", sd_models, methods=["GET"]),
        Route(f"{PREFIX}/samplers", samplers, methods=["GET"]),
        Route(f"{PREFIX}/schedulers", schedulers, methods=["GET"]),
        Route(f"{PREFIX}/cmd-flags", cmd_flags, methods=["GET"]),
        Route(f"{PREFIX}/extra-single-image", extra_single_image, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/upscalers", upscalers, methods=["GET"]),
        Route(f"{PREFIX}/png-info", png_info, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/loras", loras, methods=["GET"]),
    ]
