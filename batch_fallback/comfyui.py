"""ComfyUI's HTTP and WebSocket API over the batch queue, so unmodified ComfyUI clients can queue
workflows here (the subset is documented in docs/comfyui.md).

A `POST /prompt` is an ordinary `workflow` job: validated whole before it is queued, durable, retried,
cancellable, on either deployment. `/ws?clientId=` follows the jobs a client queued by sampling the job
store (a worker may be another process), and sends ComfyUI's messages in ComfyUI's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .api import MAX_BODY_BYTES, check_api_key, endpoint, read_json, service_of
from .errors import BatchError, InvalidJob, JobNotFound
from .nodes import REGISTRY
from .results import result_path
from .service import BatchService
from .store import JobRecord, JobStatus, Stage
from .workflow import WorkflowInvalid

logger = logging.getLogger(__name__)

KIND = "workflow"
POLL_S = 0.2
MAX_FOLLOWED = 4096
"""Prompts followed for connected /ws clients at once (a prompt leaves the table once it has ended)."""
OUTBOX = 512
"""Messages waiting for one /ws client; a client that falls this far behind is disconnected."""
MAX_HISTORY = 200
PREVIEW_IMAGE, JPEG = 1, 1  # ComfyUI's binary frame: event type, then image format, both 32-bit big-endian
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)


def _comfy_error(status: int, error_type: str, message: str, details: str = "", node_errors: dict[str, Any] | None = None) -> JSONResponse:
    body = {"error": {"type": error_type, "message": message, "details": details, "extra_info": {}}, "node_errors": node_errors or {}}
    return JSONResponse(body, status_code=status)


def _render_error(error: BatchError) -> Response:
    if isinstance(error, WorkflowInvalid):
        return JSONResponse({"error": error.error, "node_errors": error.node_errors}, status_code=400)
    if isinstance(error, InvalidJob):
        return _comfy_error(400, "invalid_prompt", str(error), error.field or "")
    return _comfy_error(error.status, error.code, str(error), error.field or "")


def comfy_endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    return endpoint(handler, _render_error)


def _number(record: JobRecord) -> int:
    """ComfyUI's queue number: the job's creation time in milliseconds (it orders prompts)."""
    return int(record.created_at * 1000)


def _queue_item(record: JobRecord) -> list[Any]:
    params = record.params
    extra = {**params.get("extra_data", {}), "client_id": params.get("client_id")}
    return [_number(record), record.id, params["prompt"], extra, params.get("outputs", [])]


def _outputs(record: JobRecord, stage: Stage | None) -> dict[str, Any]:
    """Each output node's images as ComfyUI lists them (the subfolder is the prompt id)."""
    if stage is None or record.status is not JobStatus.FINISHED:
        return {}
    return {
        node: {"images": [{"filename": image["filename"], "subfolder": record.id, "type": image["type"]} for image in output["images"]]}
        for node, output in stage.outputs.items()
    }


def _failure(record: JobRecord, stage: Stage | None) -> dict[str, Any]:
    node = stage.current if stage is not None else None
    node_type = record.params["prompt"].get(node, {}).get("class_type") if node else None
    exception_type, _, message = (record.error or "").partition(": ")
    if not message:
        exception_type, message = "Exception", record.error or ""
    return {
        "prompt_id": record.id,
        "node_id": node,
        "node_type": node_type,
        "executed": list(stage.done) if stage else [],
        "exception_message": message,
        "exception_type": exception_type,
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
    }


def _timestamp(seconds: float | None) -> int:
    return int((seconds or time.time()) * 1000)


def _end_messages(record: JobRecord, stage: Stage | None) -> list[tuple[str, dict[str, Any]]]:
    """What ComfyUI sends when a prompt ends, in its order (the final `executing` None comes after)."""
    if record.status is JobStatus.FINISHED:
        return [("execution_success", {"prompt_id": record.id, "timestamp": _timestamp(record.finished_at)})]
    if record.status is JobStatus.CANCELLED:
        failure = _failure(record, stage)
        keys = ("prompt_id", "node_id", "node_type", "executed")
        return [("execution_interrupted", {**{key: failure[key] for key in keys}, "timestamp": _timestamp(record.finished_at)})]
    return [("execution_error", {**_failure(record, stage), "timestamp": _timestamp(record.finished_at)})]


def history_entry(record: JobRecord, stage: Stage | None) -> dict[str, Any]:
    started = {"prompt_id": record.id, "timestamp": _timestamp(record.started_at)}
    messages: list[list[Any]] = [["execution_start", started], ["execution_cached", {"nodes": [], **started}]]
    messages += [[name, data] for name, data in _end_messages(record, stage)]
    success = record.status is JobStatus.FINISHED
    return {
        "prompt": _queue_item(record),
        "outputs": _outputs(record, stage),
        "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
        "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node} for node in _outputs(record, stage)},
    }


# --- HTTP ---------------------------------------------------------------------------------------------


@comfy_endpoint
async def post_prompt(request: Request) -> Response:
    service = service_of(request)
    body = await read_json(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return _comfy_error(400, "no_prompt", "No prompt provided")
    if "prompt_id" in body:
        return _comfy_error(400, "invalid_prompt", "prompt_id is chosen by this server; leave it out and read it from the answer")
    front = body.get("front", False)
    if not isinstance(front, bool):
        return _comfy_error(400, "invalid_prompt", f"front must be true or false, got {front!r}")
    params: dict[str, Any] = {"prompt": body["prompt"], "extra_data": body.get("extra_data", {})}
    if body.get("client_id") is not None:
        params["client_id"] = body["client_id"]
    job = {"kind": KIND, "params": params, "priority": "high" if front else "normal"}
    try:
        record, _ = await asyncio.to_thread(service.create, job)
    except InvalidJob as error:
        raise _as_sent(error) from None
    hub(request.app).follow(record.id, record.params.get("client_id"))
    return JSONResponse({"prompt_id": record.id, "number": _number(record), "node_errors": {}})


def _as_sent(error: InvalidJob) -> InvalidJob:
    """A refusal of the queued job as one of the /prompt body: "prompt", not the job's "params.prompt"."""
    if isinstance(error, WorkflowInvalid) or not (error.field or "").startswith("params."):
        return error  # a graph's own refusal is ComfyUI's node_errors already
    field = error.field.removeprefix("params.")  # type: ignore[union-attr]
    return InvalidJob(str(error).replace(error.field, field, 1), field=field)  # type: ignore[arg-type]


@comfy_endpoint
async def get_prompt(request: Request) -> Response:
    remaining = await asyncio.to_thread(service_of(request).store.count, KIND, ACTIVE)
    return JSONResponse({"exec_info": {"queue_remaining": remaining}})


async def prompt_route(request: Request) -> Response:
    return await (post_prompt if request.method == "POST" else get_prompt)(request)


@comfy_endpoint
async def get_queue(request: Request) -> Response:
    store = service_of(request).store
    running = await asyncio.to_thread(store.list, JobStatus.RUNNING, service_of(request).config.max_queued, None, KIND)
    pending = await asyncio.to_thread(store.list, JobStatus.QUEUED, service_of(request).config.max_queued, None, KIND)
    pending.sort(key=lambda record: (-record.priority, record.created_at))
    return JSONResponse({"queue_running": [_queue_item(r) for r in running], "queue_pending": [_queue_item(r) for r in pending]})


@comfy_endpoint
async def post_queue(request: Request) -> Response:
    """{"clear": true} cancels every waiting prompt; {"delete": [ids]} the waiting ones named."""
    service = service_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidJob("the body must be an object with clear or delete")
    doomed: list[str] = []
    if body.get("clear") is True:
        queued = await asyncio.to_thread(service.store.list, JobStatus.QUEUED, service.config.max_queued, None, KIND)
        doomed += [record.id for record in queued]
    delete = body.get("delete", [])
    if not isinstance(delete, list) or not all(isinstance(item, str) for item in delete):
        raise InvalidJob("delete must be a list of prompt ids", field="delete")
    doomed += delete
    for job_id in doomed:
        with contextlib.suppress(BatchError):  # gone, or already running or ended: ComfyUI ignores those too
            record = await asyncio.to_thread(service.store.get, job_id)
            if record.kind == KIND and record.status is JobStatus.QUEUED:
                await asyncio.to_thread(service.store.cancel, job_id)
    return Response(status_code=200)


async def queue_route(request: Request) -> Response:
    return await (post_queue if request.method == "POST" else get_queue)(request)


@comfy_endpoint
async def interrupt(request: Request) -> Response:
    """Stops the running prompt (or the one named by {"prompt_id": …}) at its next sampler step or node."""
    body = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise InvalidJob("prompt_id must be a string", field="prompt_id")
    await asyncio.to_thread(service_of(request).store.request_cancel_running, KIND, prompt_id)
    return Response(status_code=200)


def _in_history(record: JobRecord) -> bool:
    """Whether ComfyUI would list this prompt in /history: it ended, after it started (one deleted from
    the queue before it ran leaves no history)."""
    return record.status.terminal and record.started_at is not None


@comfy_endpoint
async def history(request: Request) -> Response:
    service = service_of(request)
    prompt_id = request.path_params.get("prompt_id")
    if prompt_id is not None:
        try:
            record = await asyncio.to_thread(service.store.get, prompt_id)
        except JobNotFound:
            return JSONResponse({})
        if record.kind != KIND or not _in_history(record):
            return JSONResponse({})
        stage = await asyncio.to_thread(service.store.stage_of, record.id)
        return JSONResponse({record.id: history_entry(record, stage)})
    raw = request.query_params.get("max_items", str(MAX_HISTORY))
    if not raw.isdigit():
        raise InvalidJob(f"max_items must be a whole number, got {raw!r}", field="max_items")
    records = await asyncio.to_thread(service.store.list, None, min(int(raw), MAX_HISTORY), None, KIND, ENDED)
    entries = {}
    for record in reversed(records):  # oldest first, as ComfyUI's dict is ordered
        if not _in_history(record):
            continue
        entries[record.id] = history_entry(record, await asyncio.to_thread(service.store.stage_of, record.id))
    return JSONResponse(entries)


@comfy_endpoint
async def view(request: Request) -> Response:
    service = service_of(request)
    filename = request.query_params.get("filename", "")
    subfolder = request.query_params.get("subfolder", "")
    folder = request.query_params.get("type", "output")
    if folder == "input":
        path = service.uploads.path(f"{subfolder}/{filename}" if subfolder else filename)
        if path is None:
            raise JobNotFound(f"no uploaded image {filename!r} in {subfolder!r}")
        return FileResponse(path)
    if folder not in ("output", "temp"):
        raise InvalidJob(f"type must be input, output or temp, got {folder!r}", field="type")
    try:
        record = await asyncio.to_thread(service.store.get, subfolder)
    except JobNotFound:
        raise JobNotFound(f"no output {filename!r}: the subfolder is the prompt id, and {subfolder!r} is none") from None
    stage = await asyncio.to_thread(service.store.stage_of, record.id)
    for output in (stage.outputs.values() if stage and record.status is JobStatus.FINISHED else ()):
        for image in output["images"]:
            if image["filename"] == filename and image["type"] == folder:
                path = result_path(service.config.results_dir, record.id, image["index"])
                if path.is_file():
                    return FileResponse(path, media_type="image/png")
    raise JobNotFound(f"prompt {record.id} has no {folder} image {filename!r}")


@comfy_endpoint
async def upload_image(request: Request) -> Response:
    service = service_of(request)
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise InvalidJob("the form needs a file field named image", field="image")
        folder = str(form.get("type") or "input")
        if folder != "input":
            raise InvalidJob(f"uploads go to the input folder, not {folder!r}", field="type")
        data = await upload.read()
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        name, subfolder = await asyncio.to_thread(
            service.uploads.save, upload.filename or "", data, str(form.get("subfolder") or ""), overwrite
        )
    finally:
        await form.close()
    return JSONResponse({"name": name, "subfolder": subfolder, "type": "input"})


@comfy_endpoint
async def object_info(request: Request) -> Response:
    catalog = await asyncio.to_thread(service_of(request)._accept_context().catalog)
    images = await asyncio.to_thread(catalog.images)
    catalog = dataclasses.replace(catalog, images=lambda: images)  # listed once, in the thread
    wanted = request.path_params.get("node_class")
    if wanted is not None:
        node = REGISTRY.get(wanted)
        return JSONResponse({} if node is None else {wanted: node.object_info(catalog)})
    return JSONResponse({name: node.object_info(catalog) for name, node in REGISTRY.items()})


@comfy_endpoint
async def system_stats(request: Request) -> Response:
    device = service_of(request).model.placement.device
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * page_size
    total_vram = free_vram = 0
    name = "cpu"
    if device.type == "cuda":
        free_vram, total_vram = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    return JSONResponse(
        {
            "system": {
                "os": os.name if os.name != "posix" else platform.system().lower(),
                "ram_total": pages * page_size,
                "ram_free": free,
                "comfyui_version": "streamcanvas",
                "python_version": sys.version,
                "pytorch_version": torch.__version__,
                "embedded_python": False,
                "argv": [],
            },
            "devices": [
                {"name": name, "type": device.type, "index": device.index or 0, "vram_total": total_vram, "vram_free": free_vram,
                 "torch_vram_total": total_vram, "torch_vram_free": free_vram}
            ],
        }
    )


@comfy_endpoint
async def embeddings(request: Request) -> Response:
    return JSONResponse([])


# --- /ws ----------------------------------------------------------------------------------------------


@dataclass
class Followed:
    """What a client has been told about one prompt."""

    client_id: str | None
    started: bool = False
    node: str | None = None
    announced: int = 0
    """How many nodes, in run order, have had their `executing` (in this attempt)."""
    attempt: int = 0
    progress: tuple[int, int] = (0, 0)


@dataclass
class Client:
    websocket: WebSocket
    outbox: asyncio.Queue[str | bytes | dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(OUTBOX))

    def send(self, message: str | bytes | dict[str, Any]) -> bool:
        """Queue a message; False when the client is too far behind (it is then disconnected)."""
        try:
            self.outbox.put_nowait(message)
            return True
        except asyncio.QueueFull:
            return False

    def close_soon(self) -> None:
        """End the connection: what is still waiting is dropped, the sender stops at the sentinel."""
        while not self.outbox.empty():
            self.outbox.get_nowait()
        self.outbox.put_nowait(None)


class ComfyHub:
    """Follows the prompts of /ws clients and turns job state into ComfyUI messages. One per app; its
    polling task runs only while a client is connected."""

    def __init__(self, service: BatchService) -> None:
        self.service = service
        self.clients: dict[str, Client] = {}
        self.followed: dict[str, Followed] = {}
        self.remaining: int | None = None
        self.task: asyncio.Task[None] | None = None

    def follow(self, prompt_id: str, client_id: str | None) -> None:
        """Follow a prompt for a connected client (one that connects later finds its prompts in the
        store when it does). A full table follows no more: /history still has every outcome."""
        if client_id is None or client_id not in self.clients or len(self.followed) >= MAX_FOLLOWED:
            return
        self.followed.setdefault(prompt_id, Followed(client_id))

    async def serve(self, websocket: WebSocket) -> None:
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        previous = self.clients.pop(client_id, None)
        if previous is not None:
            previous.close_soon()  # the same id reconnected: the old connection ends
        client = Client(websocket)
        self.clients[client_id] = client
        active = await asyncio.to_thread(self.service.store.list, None, self.service.config.max_queued, None, KIND, ACTIVE)
        for record in active:  # prompts queued before a restart of this server, or before this connection
            if record.params.get("client_id") == client_id:
                self.follow(record.id, client_id)
        remaining = len(active)
        client.send({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}})
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._poll(), name="comfyui-hub")
        receiver = asyncio.create_task(self._drain(websocket, client))
        try:
            while True:
                message = await client.outbox.get()
                if message is None:
                    break
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_json(message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            receiver.cancel()
            if self.clients.get(client_id) is client:
                del self.clients[client_id]
                for prompt_id in [p for p, followed in self.followed.items() if followed.client_id == client_id]:
                    del self.followed[prompt_id]  # a reconnect finds them in the store again
            # A client that already left makes Starlette raise WebSocketDisconnect on the close frame.
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.close()

    async def _drain(self, websocket: WebSocket, client: Client) -> None:
        """Read (and ignore) what the client sends, so that a closed connection is noticed."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                await websocket.receive_text()
        client.close_soon()

    async def _poll(self) -> None:
        while self.clients:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - the database is briefly unavailable: sample again next tick
                logger.warning("comfyui hub: sampling jobs failed", exc_info=True)
            await asyncio.sleep(POLL_S)

    def _read(self) -> tuple[int, list[tuple[str, JobRecord | None, Stage | None]]]:
        store = self.service.store
        remaining = store.count(KIND, ACTIVE)
        states = []
        for prompt_id in list(self.followed):
            try:
                record, stage = store.snapshot(prompt_id)
            except JobNotFound:
                states.append((prompt_id, None, None))
                continue
            states.append((prompt_id, record, stage))
        return remaining, states

    async def _tick(self) -> None:
        remaining, states = await asyncio.to_thread(self._read)
        for prompt_id, record, stage in states:
            followed = self.followed.get(prompt_id)
            if followed is None:
                continue
            if record is None:
                del self.followed[prompt_id]
                continue
            messages = await self._messages(record, stage, followed)
            client = self.clients.get(followed.client_id or "")
            if client is not None:
                for message in messages:
                    if not client.send(message):
                        logger.warning("comfyui /ws client %s fell %d messages behind: disconnected", followed.client_id, OUTBOX)
                        client.close_soon()
                        break
            if record.status.terminal:
                del self.followed[prompt_id]
        if remaining != self.remaining:
            self.remaining = remaining
            status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}}
            for client in list(self.clients.values()):
                client.send(status)

    async def _messages(self, record: JobRecord, stage: Stage | None, followed: Followed) -> list[str | bytes | dict[str, Any]]:
        out: list[str | bytes | dict[str, Any]] = []

        def add(kind: str, data: dict[str, Any]) -> None:
            out.append({"type": kind, "data": data})

        if record.status is JobStatus.QUEUED or record.started_at is None:
            return out  # waiting, or deleted from the queue before it ran (ComfyUI says nothing of those)
        if not followed.started:
            followed.started = True
            started = {"prompt_id": record.id, "timestamp": _timestamp(record.started_at)}
            add("execution_start", started)
            add("execution_cached", {"nodes": [], **started})
        if record.attempts != followed.attempt:  # a retried attempt runs the nodes again
            followed.attempt, followed.announced, followed.node, followed.progress = record.attempts, 0, None, (0, 0)
        if stage is not None:
            # Every node gets its `executing`, in run order, also those that started and ended between
            # two samples (the stage lists the nodes done).
            ran = list(stage.done) + ([stage.current] if stage.current is not None else [])
            for node in ran[followed.announced :]:
                add("executing", {"node": node, "display_node": node, "prompt_id": record.id})
            if len(ran) > followed.announced:
                followed.announced = len(ran)
                followed.node = ran[-1]
                followed.progress = (0, 0)
        # The step count belongs to the stage read with it (it starts again with each node).
        if record.status is JobStatus.RUNNING and record.step and (record.step, record.steps) != followed.progress:
            followed.progress = (record.step, record.steps)
            add("progress", {"value": record.step, "max": record.steps, "prompt_id": record.id, "node": followed.node})
            if record.params.get("preview"):
                preview = await asyncio.to_thread(self.service.store.preview, record.id)
                if preview:
                    out.append(struct.pack(">II", PREVIEW_IMAGE, JPEG) + preview)
        if record.status.terminal:
            if record.status is JobStatus.FINISHED:
                for node, output in _outputs(record, stage).items():
                    add("executed", {"node": node, "display_node": node, "output": output, "prompt_id": record.id})
            for kind, data in _end_messages(record, stage):
                add(kind, data)
            add("executing", {"node": None, "display_node": None, "prompt_id": record.id})
        return out


def hub(app: Any) -> ComfyHub:
    existing = getattr(app.state, "comfyui_hub", None)
    if existing is None:
        existing = app.state.comfyui_hub = ComfyHub(app.state.batch)
    return existing


async def websocket_endpoint(websocket: WebSocket) -> None:
    try:
        check_api_key(websocket)
    except BatchError:
        await websocket.close(code=1008, reason="an API key is required")
        return
    await hub(websocket.app).serve(websocket)


def comfyui_routes() -> list[Route | WebSocketRoute]:
    return [
        Route("/prompt", prompt_route, methods=["GET", "POST"], max_body_size=MAX_BODY_BYTES),
        Route("/queue", queue_route, methods=["GET", "POST"]),
        Route("/interrupt", interrupt, methods=["POST"]),
        Route("/history", history, methods=["GET"]),
        Route("/history/{prompt_id:str}", history, methods=["GET"]),
        Route("/view", view, methods=["GET"]),
        Route("/upload/image", upload_image, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        Route("/object_info", object_info, methods=["GET"]),
        Route("/object_info/{node_class:str}", object_info, methods=["GET"]),
        Route("/system_stats", system_stats, methods=["GET"]),
        Route("/embeddings", embeddings, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
