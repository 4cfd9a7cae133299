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
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import MAX_BODY_BYTES, endpoint, read_json, service_of
from .errors import BatchError
from .results import infotext
from .store import JobRecord, JobStatus

PREFIX = "/sdapi/v1"

SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", []),
    "UniPC": ("unipc", []),
    "Heun": ("heun", ["k_heun"]),
    "LCM": ("lcm", ["k_lcm"]),
}
_SAMPLER_LOOKUP = {alias.lower(): scheduler for name, (scheduler, aliases) in SAMPLERS.items() for alias in [name, *aliases]}
_SCHEDULER_NAMES = {scheduler: name for name, (scheduler, _) in SAMPLERS.items()}


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler a"
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    send_images: bool = True


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75
    include_init_images: bool = False


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def a1111_endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """API-key check, and typed errors answered as A1111 does: `{"detail": message}`."""
    return endpoint(handler, lambda error: _detail(error.status, str(error)))


def _validation(error: ValidationError) -> JSONResponse:
    detail = [{"loc": ["body", *problem["loc"]], "msg": problem["msg"], "type": problem["type"]} for problem in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


async def _generate(request: Request, img2img: bool) -> Response:
    try:
        body = (Img2ImgBody if img2img else Txt2ImgBody).model_validate(await read_json(request))
    except ValidationError as error:
        return _validation(error)
    sampler = body.sampler_name or body.sampler_index
    scheduler = _SAMPLER_LOOKUP.get(sampler.lower())
    if scheduler is None:
        return _detail(404, f"Sampler not found: {sampler!r}; this server has {', '.join(SAMPLERS)}")
    params: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "scheduler": scheduler,
        "guidance_scale": body.cfg_scale,
        "batch_size": body.batch_size * body.n_iter,
        "width": body.width,
        "height": body.height,
        "preview": True,  # A1111 clients show /progress's current_image while they wait
    }
    if body.seed >= 0:
        params["seed"] = body.seed
    if img2img:
        assert isinstance(body, Img2ImgBody)
        params.update(image=body.init_images[0], strength=body.denoising_strength)
    service = service_of(request)
    try:
        record, _ = await asyncio.to_thread(service.create, {"kind": "img2img" if img2img else "txt2img", "params": params})
    except BatchError as error:
        return JSONResponse({"detail": [{"loc": ["body", error.field or ""], "msg": str(error), "type": error.code}]}, status_code=error.status)
    while not record.status.terminal:
        # The job goes on if the client leaves (it is an ordinary job: GET /v1/jobs/{id} has it).
        if await request.is_disconnected():
            return Response(status_code=499)
        await asyncio.sleep(0.1)
        record = await asyncio.to_thread(service.get, record.id)
    if record.status is JobStatus.FAILED:
        return JSONResponse({"error": "GenerationFailed", "detail": record.error or "", "body": "", "errors": record.error or ""}, status_code=500)
    images = [base64.b64encode(await asyncio.to_thread(_read, result.path)).decode() for result in record.results] if body.send_images else []
    parameters = body.model_dump()
    if img2img and not parameters.pop("include_init_images", False):
        parameters["init_images"] = None
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(_info(record, service.model.name))})


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _info(record: JobRecord, model_name: str) -> dict[str, Any]:
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
        "sampler_name": _SCHEDULER_NAMES[params["scheduler"]],
        "cfg_scale": params["guidance_scale"],
        "steps": params["steps"],
        "batch_size": params["batch_size"],
        "denoising_strength": params.get("strength"),
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


def a1111_routes() -> list[Route]:
    return [
        Route(f"{PREFIX}/txt2img", txt2img, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/img2img", img2img, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/progress", progress, methods=["GET"]),
        Route(f"{PREFIX}/interrupt", interrupt, methods=["POST"]),
        Route(f"{PREFIX}/options", options, methods=["GET", "POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/sd-models", sd_models, methods=["GET"]),
        Route(f"{PREFIX}/samplers", samplers, methods=["GET"]),
    ]
