"""The Starlette application: health, info and the real-time WebSocket endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import torch
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from streamcanvas.batch_fallback.a1111 import a1111_routes
from streamcanvas.batch_fallback.api import batch_routes
from streamcanvas.batch_fallback.comfyui import comfyui_routes
from streamcanvas.codecs.messages import PROTOCOL_VERSIONS

from .http import DEFAULT_MAX_BODY_BYTES, EXCEPTION_HANDLERS, JSONContentTooLarge, TrustedHosts
from .outputs import output_routes
from .runtime import Runtime
from .web import web_routes
from .webrtc import advertise_only, webrtc_routes
from .websocket import stream_endpoint

WEBSOCKET_PATH = "/v1/stream"


async def healthz(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    body = {"status": runtime.readiness.value}
    if runtime.failure:
        body["error"] = runtime.failure
    return JSONResponse(body, status_code=200 if runtime.ready else 503)


async def info(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    jobs = await asyncio.to_thread(runtime.batch.store.counts)
    width, height = runtime.settings.size
    body = {
        "status": runtime.readiness.value,
        "model": runtime.model.describe(),
        "models": list(runtime.models.names),
        "device": runtime.model.placement.description,
        "backend": runtime.model.backend.describe(),
        "torch_threads": torch.get_num_threads(),
        "resolution": {"width": width, "height": height},
        "max_resolution": runtime.settings.max_resolution,
        "warmup_ms": runtime.warmup_ms,
        "websocket": WEBSOCKET_PATH,
        "auth": "api_key" if runtime.settings.api_keys else "none",
        **runtime.manager.info(),
        "styles": list(runtime.styles),
        "sharing": runtime.sharing.describe() if runtime.sharing is not None else {"policy": "fixed"},
        "batch": {"queue": runtime.batch.queue.mode, "jobs": jobs, "live_sessions_rendering": runtime.batch.live_sessions},
    }
    body["protocol_versions"] = list(PROTOCOL_VERSIONS)
    return JSONResponse(body)


async def models(request: Request) -> JSONResponse:
    """The models a session may pick (`hello.model`, a batch job's `model`): the first is the default."""
    runtime: Runtime = request.app.state.runtime
    return JSONResponse({"models": runtime.models.describe(), "memory_budget_bytes": runtime.models.budget})


async def styles(request: Request) -> JSONResponse:
    """The style presets a session may pick (`"style": NAME` in its params), with the fields each sets."""
    runtime: Runtime = request.app.state.runtime
    return JSONResponse({"styles": [preset.describe() for preset in runtime.styles.values()]})


def create_app(runtime: Runtime) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if runtime.settings.ice_host_addresses:
            advertise_only(runtime.settings.ice_host_addresses)
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/v1/info", info),
            Route("/v1/styles", styles),
            Route("/v1/models", models),
            WebSocketRoute(WEBSOCKET_PATH, stream_endpoint),
            *output_routes(),
            *batch_routes(),
            *a1111_routes(),
            *comfyui_routes(),
            *webrtc_routes(runtime.settings.allowed_origins),
            *web_routes(),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(TrustedHosts, allowed=runtime.settings.trusted_hosts),
            Middleware(JSONContentTooLarge),
            # Every route's body is capped (routes that take uploads declare a larger limit of their own).
            Middleware(RequestBodyLimitMiddleware, max_body_size=DEFAULT_MAX_BODY_BYTES),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.runtime = runtime
    app.state.batch = runtime.batch
    return app
