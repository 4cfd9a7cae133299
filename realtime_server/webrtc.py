"""The WebRTC transport (aiortc): the same sessions as the WebSocket, with video in and video out.

Signalling is one JSON request, in the shape browsers and aiortc's examples use:

    POST /v1/webrtc/offer  {"sdp": "...", "type": "offer", "hello": {...the hello message's fields...}}
    → 200 {"sdp": "...", "type": "answer", "session_id": "...", "ready": {...the ready message...}}

The client's video track (a camera, a screen, a generated stream) becomes the session's canvas, newest
frame wins; the rendered frames go back on a video track; a data channel carries the protocol's other
MsgPack messages both ways (params, ping, record; ready-time errors, stats, pongs). The session is the
one the WebSocket uses: only the bytes move differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from fractions import Fraction

import msgpack
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from streamcanvas.codecs.messages import Error, parse_server_message
from streamcanvas.sessions.manager import TooManyConnections
from streamcanvas.sessions.session import CloseReason, Session, SessionState

from .runtime import Runtime

logger = logging.getLogger(__name__)

_VIDEO_CLOCK = 90_000
_CHANNEL_QUEUE = 64
_MAX_SDP_BYTES = 64 * 1024


class RenderedTrack(MediaStreamTrack):
    """The session's rendered frames as a video track: always the newest frame, honest timestamps."""

    kind = "video"

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self._frames = session.broadcast.subscribe()
        self._started: float | None = None

    async def recv(self) -> VideoFrame:
        try:
            frame = await anext(self._frames)
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        now = time.monotonic()
        if self._started is None:
            self._started = now
        video = VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        video.pts = round((now - self._started) * _VIDEO_CLOCK)  # when it was ready, not a fixed rate
        video.time_base = Fraction(1, _VIDEO_CLOCK)
        return video


class PeerSession:
    """One RTCPeerConnection bound to one Session, and the tasks that move its bytes."""

    def __init__(self, runtime: Runtime, session: Session) -> None:
        self.runtime = runtime
        self.session = session
        servers = [RTCIceServer(urls=url) for url in runtime.settings.ice_servers]
        # An explicit list: RTCConfiguration(iceServers=None) would add a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.tasks: set[asyncio.Task[None]] = set()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_CHANNEL_QUEUE)
        self.channel = None
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    def spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self.spawn(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                rgb = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                await self.session.video_frame(rgb)

    def _on_datachannel(self, channel) -> None:  # type: ignore[no-untyped-def]
        self.channel = channel

        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            if isinstance(message, str):
                message = message.encode()  # not MsgPack: the session answers malformed_message
            try:
                self.inbox.put_nowait(message)
            except asyncio.QueueFull:
                self.session.send_control(
                    Error(code="too_many_messages", message=f"more than {_CHANNEL_QUEUE} messages waiting; one was dropped")
                )

        self.spawn(self._handle_inbox())
        self.spawn(self._send_outgoing())

    async def _handle_inbox(self) -> None:
        while True:
            await self.session.handle(await self.inbox.get())

    async def _send_outgoing(self) -> None:
        while (payload := await self.session.next_outgoing()) is not None:
            if self.channel is not None and self.channel.readyState == "open":
                self.channel.send(payload)
        await self.close()

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def close(self) -> None:
        self.session.close(CloseReason.CLIENT_LEFT)
        self.runtime.peers.discard(self)
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.pc.close()


def _problem(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


async def offer(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if not request.headers.get("content-type", "").startswith("application/json"):
        return _problem(415, "unsupported_media_type", "send the offer as application/json")
    if not runtime.ready:
        return _problem(503, "busy", f"the server is {runtime.readiness.value}")
    body = await request.body()
    if len(body) > _MAX_SDP_BYTES:
        return _problem(413, "message_too_large", f"the offer is over {_MAX_SDP_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as error:
        return _problem(400, "malformed_message", f"not JSON: {error}")
    if not isinstance(document, dict) or document.get("type") != "offer" or not isinstance(document.get("sdp"), str):
        return _problem(400, "invalid_field", "expected {\"type\": \"offer\", \"sdp\": \"...\", \"hello\": {...}}")
    hello = document.get("hello", {"protocol": [1]})
    if not isinstance(hello, dict):
        return _problem(400, "invalid_field", "'hello' must be an object with the hello message's fields")
    hello = {**hello, "type": "hello", "queue": False}  # no waiting in line over one HTTP request

    try:
        session = runtime.manager.open("webrtc")
    except TooManyConnections as error:
        return _problem(503, "busy", str(error))
    session.frames_to_client = False
    await session.handle(msgpack.packb(hello, use_bin_type=True))
    first = await asyncio.wait_for(session.next_outgoing(), 5)
    answer_to_hello = parse_server_message(first) if first else {"type": "error", "code": "closed"}
    if answer_to_hello["type"] != "ready":
        session.close(CloseReason.ERROR)
        if answer_to_hello["type"] == "busy":
            return _problem(503, "busy", "all slots are busy", busy=answer_to_hello)
        status = 401 if answer_to_hello.get("code") == "unauthorized" else 400
        return _problem(status, answer_to_hello.get("code", "error"), answer_to_hello.get("message", "hello refused"))

    peer = PeerSession(runtime, session)
    runtime.peers.add(peer)
    try:
        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=document["sdp"], type="offer"))
        peer.pc.addTrack(RenderedTrack(session))
        await peer.pc.setLocalDescription(await peer.pc.createAnswer())
    except (ValueError, TypeError, AttributeError) as error:  # aiortc's errors for SDP it cannot use
        await peer.close()
        return _problem(400, "invalid_sdp", f"the offer could not be used: {error}")
    if session.state not in (SessionState.READY, SessionState.STREAMING):
        await peer.close()
        return _problem(409, "closed", "the session ended during negotiation")
    description = peer.pc.localDescription
    return JSONResponse({"sdp": description.sdp, "type": description.type, "session_id": session.id, "ready": answer_to_hello})


def webrtc_routes() -> list[Route]:
    return [Route("/v1/webrtc/offer", offer, methods=["POST"])]
