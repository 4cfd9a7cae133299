"""The WebSocket transport: a thin adapter that moves bytes between a socket and a `Session`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streamcanvas.codecs.messages import Busy, Error, serialize
from streamcanvas.sessions.manager import TooManyConnections
from streamcanvas.sessions.session import CloseReason, Session, SessionState

from .connections import SLOW_CONSUMER_CLOSE
from .runtime import Runtime

logger = logging.getLogger(__name__)

CLOSE_CODES = {
    CloseReason.CLIENT_LEFT: 1000,
    CloseReason.IDLE: 1001,
    CloseReason.ERROR: 1008,
    CloseReason.SHUTDOWN: 1012,
    CloseReason.BUSY: 1013,
    CloseReason.REPLACED: 4001,
}
_SEND_DRAIN_S = 5.0
_GONE = (WebSocketDisconnect, RuntimeError, OSError)
"""What sending raises once the client has gone: Starlette turns the server's OSError into
WebSocketDisconnect, and refuses (RuntimeError) to send after a disconnect it has seen."""


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Cross-site WebSocket hijacking guard: browsers always send Origin; accept it only when it is this
    server itself or in the allow-list. Clients that are not browsers send no Origin and are let through
    (they are not what the attack uses)."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    host = websocket.headers.get("host")
    parts = urlsplit(origin)
    return host is not None and parts.scheme in ("http", "https") and parts.netloc == host


async def stream_endpoint(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    if not origin_allowed(websocket, runtime.settings.allowed_origins):
        logger.warning("refused WebSocket from origin %s", websocket.headers.get("origin"))
        await websocket.close(code=1008)  # before accept: the handshake is answered with HTTP 403
        return
    await websocket.accept()
    if not runtime.ready:
        await _refuse(websocket, runtime, f"the server is {runtime.readiness.value}; try again shortly")
        return
    try:
        session = runtime.manager.open("websocket")
    except TooManyConnections as error:
        await _refuse(websocket, runtime, str(error))
        return
    sender = asyncio.create_task(_send_loop(websocket, session), name=f"send-{session.id}")
    try:
        await _receive_loop(websocket, session)
    finally:
        session.close(CloseReason.CLIENT_LEFT)  # no-op if the session already chose its reason
        try:
            await asyncio.wait_for(sender, _SEND_DRAIN_S)
        except (TimeoutError, asyncio.CancelledError):
            sender.cancel()
        if websocket.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(*_GONE):  # the peer went away while we were closing
                await websocket.close(code=CLOSE_CODES[session.close_reason or CloseReason.CLIENT_LEFT])


async def _receive_loop(websocket: WebSocket, session: Session) -> None:
    """Hand every message to the session until either side ends it (the session enforces the idle
    timeout itself, for every transport)."""
    ended = asyncio.ensure_future(session.wait_closed())
    try:
        while session.state not in (SessionState.CLOSING, SessionState.CLOSED):
            receiving = asyncio.ensure_future(websocket.receive())
            await asyncio.wait((receiving, ended), return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                return
            message = receiving.result()
            if message["type"] == "websocket.disconnect":
                # 1008 "slow_consumer" comes from the connection itself: the client stopped reading.
                slow = (message.get("code"), message.get("reason")) == SLOW_CONSUMER_CLOSE
                session.close(CloseReason.ERROR if slow else CloseReason.CLIENT_LEFT)
                return
            data = message.get("bytes")
            if data is None:
                session.send_control(
                    Error(
                        code="malformed_message",
                        message="text messages are not part of the protocol; send binary MsgPack messages",
                    )
                )
                continue
            await session.handle(data)
    finally:
        ended.cancel()


async def _send_loop(websocket: WebSocket, session: Session) -> None:
    try:
        while (payload := await session.next_outgoing()) is not None:
            await websocket.send_bytes(payload)
    except _GONE:
        session.close(CloseReason.CLIENT_LEFT)


async def _refuse(websocket: WebSocket, runtime: Runtime, reason: str) -> None:
    manager = runtime.manager
    busy = Busy(retry_after_s=manager.config.busy_retry_after_s, slots_total=manager.pool.size)
    try:
        await websocket.send_bytes(serialize(busy))
        await websocket.send_bytes(serialize(Error(code="busy", message=reason, fatal=True)))
        await websocket.close(code=CLOSE_CODES[CloseReason.BUSY])
    except _GONE:
        pass  # the client left before hearing why
