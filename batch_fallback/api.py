"""The batch REST API under /v1: jobs, their progress as Server-Sent Events, results, and OpenAPI.

The routes find the `BatchService` at `request.app.state.batch`; the server mounts them beside the
real-time routes. Every error is JSON `{"error": code, "message": …, "field": …}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import datetime
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import BatchError, InvalidJob, JobNotFound, Unauthorized
from .kinds import KINDS
from .service import BatchService, JobCreate
from .store import JobRecord, JobStatus, Webhook

PREFIX = "/v1"
MAX_BODY_BYTES = 32 * 1024 * 1024
INLINE_JSON_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones in a thread."""
KEEPALIVE_S = 15.0
RESULT_TYPES = {".png": "image/png", ".mp4": "video/mp4"}


class ResultView(BaseModel):
    index: int
    url: str
    seed: int
    width: int
    height: int
    bytes: int


class WebhookView(BaseModel):
    url: str
    state: str = Field(description="waiting (the job has not ended), pending (being delivered or retried), delivered, failed")
    attempts: int
    last_error: str | None
    delivered_at: str | None


class JobView(BaseModel):
    id: str
    kind: str
    status: JobStatus
    priority: str
    params: dict[str, Any]
    attempts: int
    max_attempts: int
    timeout_s: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: dict[str, int]
    cancel_requested: bool
    error: str | None
    results: list[ResultView]
    links: dict[str, str]
    webhook: WebhookView | None = None
    """In GET /v1/jobs/{id}, for a job that named a webhook_url: its delivery (null otherwise)."""


class JobListView(BaseModel):
    jobs: list[JobView]
    next_before: str | None


class ErrorView(BaseModel):
    error: str
    message: str
    field: str | None = None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="milliseconds")


def job_view(record: JobRecord, position: int | None = None, webhook: Webhook | None = None) -> dict[str, Any]:
    base = f"{PREFIX}/jobs/{record.id}"
    links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
    if record.has_preview:
        links["preview"] = f"{base}/preview.jpg"
    view = JobView(
        id=record.id,
        kind=record.kind,
        status=record.status,
        priority=record.priority.name.lower(),
        params=record.params,
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        timeout_s=record.timeout_s,
        created_at=_iso(record.created_at) or "",
        started_at=_iso(record.started_at),
        finished_at=_iso(record.finished_at),
        queue_position=position,
        progress={"step": record.step, "steps": record.steps},
        cancel_requested=record.cancel_requested,
        error=record.error,
        results=[
            ResultView(index=r.index, url=f"{base}/results/{r.index}{Path(r.path).suffix}", seed=r.seed, width=r.width, height=r.height, bytes=r.bytes)
            for r in record.results
        ],
        links=links,
        webhook=None
        if webhook is None
        else WebhookView(url=webhook.url, state=webhook.state, attempts=webhook.attempts, last_error=webhook.last_error, delivered_at=_iso(webhook.delivered_at)),
    )
    return view.model_dump(mode="json")


def error_response(error: BatchError) -> JSONResponse:
    body = ErrorView(error=error.code, message=str(error), field=error.field).model_dump()
    headers = {"WWW-Authenticate": 'Bearer realm="streamcanvas"'} if error.status == 401 else None
    return JSONResponse(body, status_code=error.status, headers=headers)


def service_of(request: HTTPConnection) -> BatchService:
    return request.app.state.batch


def check_api_key(request: HTTPConnection) -> None:
    """Bearer token, X-API-Key, or HTTP Basic with the key as password (what ComfyUI clients send)."""
    keys = service_of(request).config.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        given = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    else:
        given = request.headers.get("x-api-key", "")
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized("an API key is required (Authorization: Bearer KEY, X-API-Key, or Basic with KEY as password)")


def endpoint(
    handler: Callable[[Request], Awaitable[Response]],
    render_error: Callable[[BatchError], Response] = error_response,
) -> Callable[[Request], Awaitable[Response]]:
    """API-key check and typed errors → an error response, for one route."""

    async def wrapped(request: Request) -> Response:
        try:
            check_api_key(request)
            return await handler(request)
        except BatchError as error:
            return render_error(error)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    try:
        if len(body) <= INLINE_JSON_BYTES:
            return json.loads(body)
        return await asyncio.to_thread(json.loads, bytes(body))  # an uploaded image: keep the loop free
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidJob(f"the body is not valid JSON: {error}") from None


class PayloadTooLarge(BatchError):
    status = 413
    code = "payload_too_large"


@endpoint
async def create_job(request: Request) -> Response:
    service = service_of(request)
    body = await read_json(request)
    record, created = await asyncio.to_thread(service.create, body, request.headers.get("idempotency-key"))
    position = await asyncio.to_thread(service.position, record)
    headers = {"Location": f"{PREFIX}/jobs/{record.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job_view(record, position), status_code=201 if created else 200, headers=headers)


@endpoint
async def list_jobs(request: Request) -> Response:
    service = service_of(request)
    query = request.query_params
    status = None
    if "status" in query:
        try:
            status = JobStatus(query["status"])
        except ValueError:
            raise InvalidJob(f"status {query['status']!r} is not one of {', '.join(JobStatus)}", field="status") from None
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        raise InvalidJob(f"limit {query['limit']!r} is not an integer", field="limit") from None
    if not 1 <= limit <= 500:
        raise InvalidJob(f"limit {limit} is outside 1 … 500", field="limit")
    before = _parse_cursor(query["before"]) if "before" in query else None
    records = await asyncio.to_thread(service.store.list, status, limit, before)
    next_before = f"{records[-1].created_at!r}:{records[-1].id}" if len(records) == limit else None
    queued = any(record.status is JobStatus.QUEUED for record in records)
    positions = await asyncio.to_thread(service.store.queue_positions) if queued else {}
    views = [JobView(**job_view(record, positions.get(record.id))) for record in records]
    return JSONResponse(JobListView(jobs=views, next_before=next_before).model_dump(mode="json"))


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created_at, _, job_id = cursor.rpartition(":")
    try:
        return float(created_at), job_id
    except ValueError:
        raise InvalidJob(f"before {cursor!r} is not a next_before value of an earlier page", field="before") from None


@endpoint
async def get_job(request: Request) -> Response:
    service = service_of(request)
    record = await asyncio.to_thread(service.get, request.path_params["job_id"])
    position = await asyncio.to_thread(service.position, record)
    webhook = await asyncio.to_thread(service.store.webhook, record.id)
    return JSONResponse(job_view(record, position, webhook))


@endpoint
async def cancel_job(request: Request) -> Response:
    service = service_of(request)
    record = await asyncio.to_thread(service.cancel, request.path_params["job_id"])
    return JSONResponse(job_view(record), status_code=202 if record.status is JobStatus.RUNNING else 200)


@endpoint
async def job_events(request: Request) -> Response:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    await asyncio.to_thread(service.get, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        events = service.events(job_id)
        next_event = asyncio.ensure_future(anext(events))
        try:
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=KEEPALIVE_S)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                try:
                    name, data = next_event.result()
                except StopAsyncIteration:
                    return
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                next_event = asyncio.ensure_future(anext(events))
        finally:
            next_event.cancel()
            await events.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@endpoint
async def result_file(request: Request) -> Response:
    service = service_of(request)
    record = await asyncio.to_thread(service.get, request.path_params["job_id"])
    index = request.path_params["index"]
    suffix = request.path_params.get("suffix", ".png")
    for result in record.results:
        if result.index == index and Path(result.path).suffix == suffix:
            return FileResponse(result.path, media_type=RESULT_TYPES[suffix], filename=f"{record.id}-{index}{suffix}")
    raise JobNotFound(f"job {record.id} has no result {index} (status {record.status.value})")


async def video_result(request: Request) -> Response:
    request.scope["path_params"] = {**request.path_params, "suffix": ".mp4"}
    return await result_file(request)


@endpoint
async def preview_file(request: Request) -> Response:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    await asyncio.to_thread(service.get, job_id)
    preview = await asyncio.to_thread(service.store.preview, job_id)
    if preview is None:
        raise JobNotFound(f"job {job_id} has no preview (ask for one with params.preview=true)")
    return Response(preview, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@endpoint
async def job_kinds(request: Request) -> Response:
    return JSONResponse(
        {name: {"description": kind.description, "params": kind.Request.model_json_schema()} for name, kind in KINDS.items()}
    )


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema())


def openapi_schema() -> dict[str, Any]:
    models: list[type[BaseModel]] = [JobCreate, JobView, JobListView, ErrorView, ResultView, WebhookView]
    models += [kind.Request for kind in KINDS.values()]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    # A JobCreate is one of the kinds: `kind` says which, and `params` is that kind's request model.
    envelope = schemas.pop("JobCreate")
    variants = []
    for name, kind in KINDS.items():
        variant = copy.deepcopy(envelope)
        variant["title"] = f"JobCreate ({name})"
        variant["properties"]["kind"] = {"const": name, "description": kind.description}
        variant["properties"]["params"] = ref(kind.Request.__name__)
        variants.append(variant)
    schemas["JobCreate"] = {"oneOf": variants, "description": envelope.get("description", "")}

    def answer(description: str, name: str | None = None, media: str = "application/json") -> dict[str, Any]:
        body: dict[str, Any] = {"description": description}
        if name:
            body["content"] = {media: {"schema": ref(name)}}
        elif media != "application/json":
            body["content"] = {media: {}}
        return body

    errors = {status: answer(text, "ErrorView") for status, text in (("401", "API key missing or wrong"), ("404", "no such job"), ("422", "invalid request"))}
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "streamcanvas batch API", "version": "1.0.0"},
        "paths": {
            f"{PREFIX}/jobs": {
                "post": {
                    "summary": "Create a job (validated completely before it is queued)",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": ref("JobCreate")}}},
                    "responses": {
                        "201": answer("created", "JobView"),
                        "200": answer("the job this idempotency key already created", "JobView"),
                        "409": answer("idempotency key reused for a different request", "ErrorView"),
                        "413": answer("body too large", "ErrorView"),
                        "503": answer("the queue is full", "ErrorView"),
                        **errors,
                    },
                },
                "get": {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": [s.value for s in JobStatus]}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "before", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(e[+-]?[0-9]+)?:[0-9a-f]{32}$"}, "description": "next_before of the previous page"},
                    ],
                    "responses": {"200": answer("a page of jobs", "JobListView"), **errors},
                },
            },
            f"{PREFIX}/jobs/{{job_id}}": {
                "get": {"summary": "A job's status and results", "parameters": [job_id], "responses": {"200": answer("the job", "JobView"), **errors}}
            },
            f"{PREFIX}/jobs/{{job_id}}/cancel": {
                "post": {
                    "summary": "Cancel a job: a queued one at once, a running one at its next step",
                    "parameters": [job_id],
                    "responses": {"200": answer("cancelled", "JobView"), "202": answer("will stop at the next step", "JobView"), "409": answer("already ended", "ErrorView"), **errors},
                }
            },
            f"{PREFIX}/jobs/{{job_id}}/events": {
                "get": {
                    "summary": "Progress as Server-Sent Events: queued, started, progress, then finished, failed or cancelled",
                    "parameters": [job_id],
                    "responses": {"200": answer("an event stream", media="text/event-stream"), **errors},
                }
            },
            f"{PREFIX}/jobs/{{job_id}}/results/{{index}}.png": {
                "get": {
                    "summary": "One result image (PNG with its parameters in text chunks)",
                    "parameters": [job_id, {"name": "index", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    "responses": {"200": answer("the image", media="image/png"), **errors},
                }
            },
            f"{PREFIX}/jobs/{{job_id}}/preview.jpg": {
                "get": {"summary": "The latest low-resolution preview of a running job", "parameters": [job_id], "responses": {"200": answer("a JPEG", media="image/jpeg"), **errors}}
            },
            f"{PREFIX}/job-kinds": {"get": {"summary": "The job kinds and their parameters' JSON schemas", "responses": {"200": {"description": "kinds"}}}},
        },
        "components": {"schemas": schemas},
    }


async def jobs_collection(request: Request) -> Response:
    return await (create_job(request) if request.method == "POST" else list_jobs(request))


def batch_routes() -> list[Route]:
    return [
        Route(f"{PREFIX}/jobs", jobs_collection, methods=["GET", "POST"], max_body_size=MAX_BODY_BYTES),
        Route(f"{PREFIX}/jobs/{{job_id:str}}", get_job, methods=["GET"]),
        Route(f"{PREFIX}/jobs/{{job_id:str}}/cancel", cancel_job, methods=["POST"]),
        Route(f"{PREFIX}/jobs/{{job_id:str}}/events", job_events, methods=["GET"]),
        Route(f"{PREFIX}/jobs/{{job_id:str}}/results/{{index:int}}.png", result_file, methods=["GET"]),
        Route(f"{PREFIX}/jobs/{{job_id:str}}/results/{{index:int}}.mp4", video_result, methods=["GET"]),
        Route(f"{PREFIX}/jobs/{{job_id:str}}/preview.jpg", preview_file, methods=["GET"]),
        Route(f"{PREFIX}/job-kinds", job_kinds, methods=["GET"]),
        Route(f"{PREFIX}/openapi.json", openapi, methods=["GET"]),
    ]
