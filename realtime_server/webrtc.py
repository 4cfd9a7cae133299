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
import uuid
from fractions import Fraction

import msgpack
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamcanvas.codecs.messages import Error, parse_server_message
from streamcanvas.sessions.manager import TooManyConnections
from streamcanvas.sessions.session import CloseReason, Session

from .outputs import VIEWER_ROLES, OutputError, authorized_session, bearer_token
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


def advertise_only(addresses: list[str]) -> None:
    """Make ICE offer host candidates on these addresses only (a deployment's public or LAN address,
    or 127.0.0.1 for a client on the same machine, which aioice otherwise never offers).

    aioice has no option for this; it asks one module function for the machine's addresses, so that
    function is replaced, for the whole process. Called once at start-up when the setting is given.
    """
    import ipaddress

    import aioice.ice

    chosen = [ipaddress.ip_address(address) for address in addresses]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(ip) for ip in chosen if (ip.version == 4 and use_ipv4) or (ip.version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = host_addresses
    logger.info("ICE host candidates limited to %s", ", ".join(addresses))


def _peer_connection(runtime: Runtime) -> RTCPeerConnection:
    servers = [RTCIceServer(urls=url) for url in runtime.settings.ice_servers]
    # An explicit list: RTCConfiguration(iceServers=None) would add a public STUN server.
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


class PeerSession:
    """One RTCPeerConnection bound to one Session, and the tasks that move its bytes."""

    kind = "whip"

    def __init__(self, runtime: Runtime, session: Session) -> None:
        self.runtime = runtime
        self.session = session
        self.resource_id = uuid.uuid4().hex
        runtime.peers[self.resource_id] = self
        self.pc = _peer_connection(runtime)
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
        """Take every frame off aiortc's (unbounded) receive queue at once, keep only the newest, and
        convert that one when the previous conversion is done: latest-wins, never a backlog."""
        newest: list[VideoFrame] = []
        arrived = asyncio.Event()

        async def convert() -> None:
            while True:
                await arrived.wait()
                arrived.clear()
                frame = newest.pop()
                rgb = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                await self.session.video_frame(rgb)

        converter = asyncio.get_running_loop().create_task(convert())
        try:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    newest[:] = [frame]
                    arrived.set()
        finally:
            converter.cancel()

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
        self.runtime.peers.pop(self.resource_id, None)
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.pc.close()


class ViewerPeer:
    """A WHEP viewer: one RTCPeerConnection sending a session's rendered track, nothing more."""

    kind = "whep"

    def __init__(self, runtime: Runtime, session: Session) -> None:
        self.runtime = runtime
        self.resource_id = uuid.uuid4().hex
        runtime.peers[self.resource_id] = self
        self.pc = _peer_connection(runtime)
        self.track = RenderedTrack(session)
        self.pc.on("connectionstatechange", self._on_state)

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def close(self) -> None:
        self.runtime.peers.pop(self.resource_id, None)
        self.track.stop()
        await self.pc.close()


def _problem(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


async def _read_offer(request: Request, content_type: str) -> bytes | JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if not request.headers.get("content-type", "").startswith(content_type):
        return _problem(415, "unsupported_media_type", f"send the offer as {content_type}")
    if not runtime.ready:
        return _problem(503, "busy", f"the server is {runtime.readiness.value}")
    body = await request.body()
    if len(body) > _MAX_SDP_BYTES:
        return _problem(413, "message_too_large", f"the offer is over {_MAX_SDP_BYTES} bytes")
    return body


async def _open_session(runtime: Runtime, hello: dict) -> tuple[Session, dict] | JSONResponse:
    """A session for a WebRTC peer, past its hello: (session, ready) or the HTTP answer refusing it."""
    try:
        session = runtime.manager.open("webrtc")
    except TooManyConnections as error:
        return _problem(503, "busy", str(error))
    session.frames_to_client = False
    hello = {**hello, "type": "hello", "queue": False}  # no waiting in line over one HTTP request
    await session.handle(msgpack.packb(hello, use_bin_type=True))
    first = await asyncio.wait_for(session.next_outgoing(), 5)
    answer = parse_server_message(first) if first else {"type": "error", "code": "closed", "message": "closed"}
    if answer["type"] == "ready":
        return session, answer
    session.close(CloseReason.ERROR)
    if answer["type"] == "busy":
        return _problem(503, "busy", "all slots are busy", busy=answer)
    status = 401 if answer.get("code") == "unauthorized" else 400
    return _problem(status, answer.get("code", "error"), answer.get("message", "hello refused"))


async def _answer(peer: PeerSession | ViewerPeer, sdp: str, rendered: RenderedTrack | None) -> str | JSONResponse:
    try:
        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(transceiver.kind == "video" for transceiver in peer.pc.getTransceivers()):
            raise ValueError("the offer has no video m-line")
        if rendered is not None:
            peer.pc.addTrack(rendered)
        await peer.pc.setLocalDescription(await peer.pc.createAnswer())
    except (ValueError, TypeError, AttributeError) as error:  # aiortc's errors for SDP it cannot use
        await peer.close()
        return _problem(400, "invalid_sdp", f"the offer could not be used: {error}")
    return peer.pc.localDescription.sdp


async def offer(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    body = await _read_offer(request, "application/json")
    if isinstance(body, JSONResponse):
        return body
    try:
        document = json.loads(body)
    except ValueError as error:
        return _problem(400, "malformed_message", f"not JSON: {error}")
    if not isinstance(document, dict) or document.get("type") != "offer" or not isinstance(document.get("sdp"), str):
        return _problem(400, "invalid_field", 'expected {"type": "offer", "sdp": "...", "hello": {...}}')
    hello = document.get("hello", {"protocol": [1]})
    if not isinstance(hello, dict):
        return _problem(400, "invalid_field", "'hello' must be an object with the hello message's fields")
    opened = await _open_session(runtime, hello)
    if isinstance(opened, JSONResponse):
        return opened
    session, ready = opened
    peer = PeerSession(runtime, session)
    answer = await _answer(peer, document["sdp"], RenderedTrack(session))
    if isinstance(answer, JSONResponse):
        return answer
    return JSONResponse({"sdp": answer, "type": "answer", "session_id": session.id, "ready": ready})


# --- WHIP (RFC 9725) ingest and WHEP egress --------------------------------------------------------

_WHIP_PARAMS = {"prompt": str, "negative_prompt": str, "strength": float, "steps": int, "seed": int, "guidance_scale": float}


def _ice_links(runtime: Runtime) -> dict[str, str]:
    links = [f'<{url}>; rel="ice-server"' for url in runtime.settings.ice_servers]
    return {"Link": ", ".join(links)} if links else {}


def _sdp_created(runtime: Runtime, location: str, sdp: str, extra: dict[str, str]) -> Response:
    headers = {"Location": location, **_ice_links(runtime), **extra}
    return Response(sdp, status_code=201, media_type="application/sdp", headers=headers)


async def whip(request: Request) -> Response:
    """Publish a video stream; the server renders it. Parameters ride on the URL's query string."""
    runtime: Runtime = request.app.state.runtime
    body = await _read_offer(request, "application/sdp")
    if isinstance(body, JSONResponse):
        return body
    query = request.query_params
    hello: dict = {"protocol": [1], "params": {}}
    try:
        for name in ("width", "height"):
            if name in query:
                hello[name] = int(query[name])
        for name, kind in _WHIP_PARAMS.items():
            if name in query:
                hello["params"][name] = kind(query[name])
    except ValueError as error:
        return _problem(400, "invalid_field", f"a query parameter is not a number: {error}")
    token = bearer_token(request)
    if token:
        hello["api_key"] = token
    opened = await _open_session(runtime, hello)
    if isinstance(opened, JSONResponse):
        return opened
    session, ready = opened
    peer = PeerSession(runtime, session)
    answer = await _answer(peer, body.decode(errors="replace"), None)
    if isinstance(answer, JSONResponse):
        return answer
    return _sdp_created(
        runtime,
        f"/v1/whip/{peer.resource_id}",
        answer,
        {
            "X-Streamcanvas-Session": session.id,
            "X-Streamcanvas-Control-Token": ready["token"],
            "X-Streamcanvas-Viewer-Token": ready["viewer_token"],
        },
    )


async def whep(request: Request) -> Response:
    """Watch a session's rendered video; the bearer token is its viewer (or control) token."""
    runtime: Runtime = request.app.state.runtime
    body = await _read_offer(request, "application/sdp")
    if isinstance(body, JSONResponse):
        return body
    try:
        session = authorized_session(request, VIEWER_ROLES)
    except OutputError as error:
        return error.response()
    if session.broadcast.full:
        return _problem(503, "too_many_viewers", "this session has as many viewers as it allows")
    viewer = ViewerPeer(runtime, session)
    answer = await _answer(viewer, body.decode(errors="replace"), viewer.track)
    if isinstance(answer, JSONResponse):
        return answer
    return _sdp_created(runtime, f"/v1/whep/{viewer.resource_id}", answer, {})


async def resource(request: Request) -> Response:
    """DELETE ends a WHIP/WHEP resource; PATCH (trickle ICE, ICE restart) is not supported."""
    runtime: Runtime = request.app.state.runtime
    peer = runtime.peers.get(request.path_params["resource_id"])
    if peer is None or peer.kind != request.path_params["kind"]:
        return _problem(404, "unknown_resource", "no such WHIP/WHEP resource (it may have ended)")
    if request.method == "DELETE":
        await peer.close()
        return Response(status_code=200)
    return Response(
        status_code=405,
        headers={"Allow": "DELETE"},
        content="trickle ICE and ICE restarts are not supported: all candidates are in the answer",
    )


def webrtc_routes() -> list[Route]:
    return [
        Route("/v1/webrtc/offer", offer, methods=["POST"]),
        Route("/v1/whip", whip, methods=["POST"]),
        Route("/v1/sessions/{session_id:str}/whep", whep, methods=["POST"]),
        Route("/v1/{kind:str}/{resource_id:str}", resource, methods=["DELETE", "PATCH"]),
    ]
