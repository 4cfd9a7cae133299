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
import collections
import contextlib
import json
import logging
import math
import time
import uuid
from fractions import Fraction
from typing import ClassVar

import msgpack
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from av import VideoFrame
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamcanvas.codecs.messages import Error, parse_server_message
from streamcanvas.sessions.broadcast import BroadcastFrame, Subscription, TooManyViewers
from streamcanvas.sessions.mailbox import Latest
from streamcanvas.sessions.manager import TooManyConnections
from streamcanvas.sessions.session import CloseReason, Session

from .http import HTTPProblem, check_api_key, require_content_type
from .outputs import VIEWER_ROLES, authorized_session
from .runtime import Runtime

logger = logging.getLogger(__name__)

_VIDEO_CLOCK = 90_000
_UNSENT_MESSAGES = 8
"""Messages kept for a data channel that is not open yet (a WHIP publisher never opens one): the oldest go."""
_CHANNEL_QUEUE = 64
_REPEAT_S = 0.5


class RenderedTrack(MediaStreamTrack):
    """The session's rendered frames as a video track: always the newest frame, honest timestamps.
    The track ends when the session does."""

    kind = "video"

    def __init__(self, frames: Subscription) -> None:
        super().__init__()
        self._frames = frames
        self._started: float | None = None
        self._last: BroadcastFrame | None = None

    async def recv(self) -> VideoFrame:
        """The next frame; while the session renders nothing new, the newest one again every
        _REPEAT_S (a receiver shows a frame only once the next one starts arriving, so a viewer
        that joins an idle session would otherwise see nothing)."""
        try:
            if self._last is None:
                frame = await anext(self._frames)
            else:
                frame = await asyncio.wait_for(anext(self._frames), _REPEAT_S)
        except TimeoutError:
            frame = self._last
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        assert frame is not None
        self._last = frame
        now = time.monotonic()
        if self._started is None:
            self._started = now
        video = VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        video.pts = round((now - self._started) * _VIDEO_CLOCK)  # when it was ready, not a fixed rate
        video.time_base = Fraction(1, _VIDEO_CLOCK)
        return video

    def stop(self) -> None:
        self._frames.close()
        super().stop()


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
    servers = [
        RTCIceServer(urls=server.url, username=server.username, credential=server.credential)
        for server in runtime.settings.ice_server_list
    ]
    # An explicit list: RTCConfiguration(iceServers=None) would add a public STUN server.
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


class Peer:
    """One RTCPeerConnection tied to one session, with the guarantees every WebRTC resource has:

    - it must reach "connected" within `webrtc_connect_timeout_s` of its answer, or it is closed;
    - it ends when the session ends (the session's own peer, and every WHEP viewer of it);
    - closing it, for whatever reason, releases everything it holds, once.
    """

    kind: ClassVar[str]

    def __init__(self, runtime: Runtime, session: Session) -> None:
        self.runtime = runtime
        self.session = session
        self.resource_id = uuid.uuid4().hex
        self.pc = _peer_connection(runtime)
        self.tasks: set[asyncio.Task[None]] = set()
        self.track: RenderedTrack | None = None
        """The rendered video this peer sends, if any."""
        self.closed = False
        self._connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._on_state)

    def spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        if self.closed:  # e.g. a data channel that opens while the connection is being closed
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self) -> None:
        """Called once the answer is made: the resource exists and its deadline runs from now."""
        self.runtime.peers[self.resource_id] = self
        self.spawn(self._watch())

    async def _watch(self) -> None:
        """Close the peer when its session ends, or when it has not connected by the deadline."""
        timeout = self.runtime.settings.webrtc_connect_timeout_s
        connected = asyncio.ensure_future(self._connected.wait())
        ended = asyncio.ensure_future(self.session.wait_closed())
        try:
            await asyncio.wait((connected, ended), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not connected.done() and not ended.done():
                logger.info("%s %s: the peer did not connect within %g s; closed", self.kind, self.resource_id, timeout)
            else:
                await ended
        finally:
            connected.cancel()
            ended.cancel()
        await self.close()

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            await self.close()

    def release(self) -> None:
        """What the peer holds besides the connection."""
        if self.track is not None:
            self.track.stop()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.runtime.peers.pop(self.resource_id, None)
        self.release()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await self.pc.close()
        except Exception as error:  # noqa: BLE001 - aiortc can fail to tear down what it half-built
            logger.info("%s %s: closing the peer connection failed: %s: %s", self.kind, self.resource_id, type(error).__name__, error)


class PeerSession(Peer):
    """A client's own session over WebRTC: its video in, the rendered video out, the protocol's other
    messages on a data channel."""

    kind = "whip"

    def __init__(self, runtime: Runtime, session: Session, send_video: bool) -> None:
        super().__init__(runtime, session)
        if send_video:  # the session's own output: not a viewer, and never JPEG
            self.track = RenderedTrack(session.broadcast.subscribe(viewer=False, jpeg=False))
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_CHANNEL_QUEUE)
        self.channel = None
        self.unsent: collections.deque[bytes] = collections.deque(maxlen=_UNSENT_MESSAGES)
        """Messages taken from the session before the data channel opened (the newest few): a txt2img
        session's one frame is often rendered while the channel is still opening."""
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)

    def release(self) -> None:
        super().release()
        self.session.close(CloseReason.CLIENT_LEFT)  # no-op when the session ended first

    def start(self) -> None:
        super().start()
        # The session's outgoing messages are taken from the start, data channel or not (a WHIP
        # publisher has none): they go out once a channel is open, and never pile up.
        self.spawn(self._send_outgoing())

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self.spawn(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        """Take every frame off aiortc's (unbounded) receive queue at once, keep only the newest, and
        convert that one when the previous conversion is done: latest-wins, never a backlog."""
        newest: Latest[VideoFrame] = Latest()

        async def convert() -> None:
            while (frame := await newest.get()) is not None:
                rgb = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                await self.session.video_frame(rgb)

        converter = asyncio.get_running_loop().create_task(convert())
        try:
            with contextlib.suppress(MediaStreamError):
                while True:
                    newest.put(await track.recv())
        finally:
            newest.close()
            converter.cancel()

    def _on_datachannel(self, channel) -> None:  # type: ignore[no-untyped-def]
        self.channel = channel
        if channel.readyState == "open":
            self._send_unsent()
        else:
            channel.on("open", self._send_unsent)

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

    async def _handle_inbox(self) -> None:
        while True:
            await self.session.handle(await self.inbox.get())

    async def _send_outgoing(self) -> None:
        while (payload := await self.session.next_outgoing()) is not None:
            self.unsent.append(payload)
            if self.channel is not None and self.channel.readyState == "open":
                self._send_unsent()
        await self.close()

    def _send_unsent(self) -> None:
        while self.unsent and self.channel is not None and self.channel.readyState == "open":
            self.channel.send(self.unsent.popleft())


class ViewerPeer(Peer):
    """A WHEP viewer: one RTCPeerConnection sending a session's rendered track, nothing more. It counts
    against the session's viewer limit from the moment it is admitted."""

    kind = "whep"

    def __init__(self, runtime: Runtime, session: Session, frames: Subscription) -> None:
        super().__init__(runtime, session)
        self.track = RenderedTrack(frames)


def _busy(runtime: Runtime, message: str, busy: dict | None = None) -> HTTPProblem:
    """503 `busy`, whatever the cause (loading, the connection limit, every slot taken): with
    `retry_after_s` and the `Retry-After` header, and, when the slots are the cause, the hello's `busy`."""
    retry_after_s = busy["retry_after_s"] if busy else runtime.manager.config.busy_retry_after_s
    extra = {"busy": busy} if busy else {}
    return HTTPProblem(503, "busy", message, headers={"Retry-After": str(math.ceil(retry_after_s))}, retry_after_s=retry_after_s, **extra)


async def _read_offer(request: Request, content_type: str) -> bytes:
    """The offer's bytes, once the request has passed every check that needs no body. The body itself is
    capped by the app's body limit (413 before a byte is read when Content-Length says more)."""
    runtime: Runtime = request.app.state.runtime
    require_content_type(request, content_type)
    if not runtime.ready:
        raise _busy(runtime, f"the server is {runtime.readiness.value}")
    return await request.body()


async def _open_session(runtime: Runtime, hello: dict) -> tuple[Session, dict]:
    """A session for a WebRTC peer, past its hello: (session, ready), or HTTPProblem refusing it."""
    try:
        session = runtime.manager.open("webrtc")
    except TooManyConnections as error:
        raise _busy(runtime, str(error)) from None
    try:
        session.frames_to_client = False
        hello = {**hello, "type": "hello", "queue": False}  # no waiting in line over one HTTP request
        try:
            message = msgpack.packb(hello, use_bin_type=True)
        except (OverflowError, ValueError, TypeError) as error:  # a number past 64 bits, a lone surrogate
            raise HTTPProblem(400, "invalid_value", f"the hello cannot be sent on: {error}") from None
        await session.handle(message)
        first = session.pending_control()
    except BaseException:
        session.close(CloseReason.ERROR)
        raise
    answer = parse_server_message(first) if first else {"type": "error", "code": "closed", "message": "closed"}
    if answer["type"] == "ready":
        return session, answer
    session.close(CloseReason.ERROR)
    if answer["type"] == "busy":
        raise _busy(runtime, "all slots are busy", answer)
    status = 401 if answer.get("code") == "unauthorized" else 400
    raise HTTPProblem(status, answer.get("code", "error"), answer.get("message", "hello refused"), field=answer.get("field"))


def _check_offer(sdp: str) -> None:
    """What aiortc accepts but cannot use: media without a DTLS fingerprint (its DTLS start fails later,
    in a task of its own, long after the answer was sent)."""
    description = SessionDescription.parse(sdp)
    for media in description.media:
        dtls = media.dtls
        if dtls is None or not dtls.fingerprints:
            raise ValueError(f"the {media.kind} m-line has no DTLS fingerprint")


def _session_peer(runtime: Runtime, session: Session, send_video: bool) -> PeerSession:
    try:
        return PeerSession(runtime, session, send_video)
    except BaseException:
        session.close(CloseReason.ERROR)
        raise


async def _answer(peer: Peer, sdp: str) -> str:
    """The SDP answer, with the peer started; on any failure the peer (and all it holds) is closed."""
    try:
        _check_offer(sdp)
        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(transceiver.kind == "video" for transceiver in peer.pc.getTransceivers()):
            raise ValueError("the offer has no video m-line")
        if peer.track is not None:
            peer.pc.addTrack(peer.track)
        await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        answer = peer.pc.localDescription.sdp
    except asyncio.CancelledError:
        await peer.close()
        raise
    except Exception as error:  # noqa: BLE001 - aiortc raises many types for SDP it cannot use; all are the offer's
        await peer.close()
        logger.info("refused an offer: %s: %s", type(error).__name__, error)
        raise HTTPProblem(400, "invalid_sdp", f"the offer could not be used: {error or type(error).__name__}") from None
    peer.start()
    return answer


async def offer(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    if request.method == "OPTIONS":
        return _options(_ALLOW_ENDPOINT, accepts_sdp=False)
    # The key may come as a bearer header (checked before the body is read) or in hello.api_key.
    token = check_api_key(request, runtime.settings.api_keys) if request.headers.get("authorization") else None
    body = await _read_offer(request, "application/json")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
        raise HTTPProblem(400, "malformed_message", f"not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("type") != "offer" or not isinstance(document.get("sdp"), str):
        raise HTTPProblem(400, "invalid_field", 'expected {"type": "offer", "sdp": "...", "hello": {...}}')
    hello = document.get("hello", {"protocol": [1]})
    if not isinstance(hello, dict):
        raise HTTPProblem(400, "invalid_field", "'hello' must be an object with the hello message's fields")
    if token and "api_key" not in hello:
        hello = {**hello, "api_key": token}
    session, ready = await _open_session(runtime, hello)
    peer = _session_peer(runtime, session, send_video=True)
    answer = await _answer(peer, document["sdp"])
    ice_servers = [server.as_rtc() for server in runtime.settings.ice_server_list]
    return JSONResponse(
        {"sdp": answer, "type": "answer", "session_id": session.id, "ready": ready, "ice_servers": ice_servers}
    )


# --- WHIP (RFC 9725) ingest and WHEP egress --------------------------------------------------------

_WHIP_PARAMS = {
    "prompt": str, "negative_prompt": str, "strength": float, "steps": int, "seed": int, "guidance_scale": float,
    "style": str, "transition_frames": int, "feedback": float,
}  # fmt: skip
"""The scalar parameters a WHIP publisher may set on its URL (the rest go in `params` messages)."""
_ALLOW_ENDPOINT = "OPTIONS, POST"
_ALLOW_RESOURCE = "OPTIONS, DELETE"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ice_links(runtime: Runtime) -> dict[str, str]:
    """RFC 9725 §4.6: one `Link: <url>; rel="ice-server"` per server, with TURN credentials."""
    links = []
    for server in runtime.settings.ice_server_list:
        link = f'<{server.url}>; rel="ice-server"'
        if server.username is not None:
            link += f"; username={_quoted(server.username)}; credential={_quoted(server.credential or '')}"
            link += '; credential-type="password"'
        links.append(link)
    return {"Link": ", ".join(links)} if links else {}


def _sdp_created(runtime: Runtime, location: str, sdp: str, extra: dict[str, str]) -> Response:
    headers = {"Location": location, **_ice_links(runtime), **extra}
    return Response(sdp, status_code=201, media_type="application/sdp", headers=headers)


def _options(allow: str, accepts_sdp: bool) -> Response:
    headers = {"Allow": allow}
    if accepts_sdp:
        headers["Accept-Post"] = "application/sdp"
    return Response(status_code=204, headers=headers)


_WHIP_HELLO = {"width": int, "height": int, "model": str}
"""The hello's own fields a WHIP publisher may set on its URL."""


def _whip_hello(request: Request) -> dict:
    """The hello a WHIP URL's query string asks for. A name that is neither a hello field nor one of
    `_WHIP_PARAMS`, a name given twice, or a number that is none, is refused naming it (as the hello
    itself refuses an unknown field): a misspelt `?strenght=` would otherwise be dropped unseen."""
    hello: dict = {"protocol": [1], "params": {}}
    for name, value in request.query_params.multi_items():
        if name == "token":
            continue  # the API key, for publishers that cannot set headers (check_api_key)
        kind = _WHIP_HELLO.get(name) or _WHIP_PARAMS.get(name)
        place, field = (hello, name) if name in _WHIP_HELLO else (hello["params"], f"params.{name}")
        if kind is None:
            known = ", ".join([*_WHIP_HELLO, *_WHIP_PARAMS, "token"])
            raise HTTPProblem(400, "invalid_field", f"unknown query parameter {name[:100]!r}; a WHIP URL takes {known}", field=name[:100])
        if name in place:
            raise HTTPProblem(400, "invalid_field", f"{name} is given twice", field=field)
        try:
            place[name] = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise HTTPProblem(400, "invalid_field", f"{name} must be {what}, got {value[:100]!r}", field=field) from None
    return hello


async def whip(request: Request) -> Response:
    """Publish a video stream; the server renders it. Parameters ride on the URL's query string."""
    runtime: Runtime = request.app.state.runtime
    if request.method == "OPTIONS":
        return _options(_ALLOW_ENDPOINT, accepts_sdp=True)
    token = check_api_key(request, runtime.settings.api_keys)
    hello = _whip_hello(request)
    if token:
        hello["api_key"] = token
    body = await _read_offer(request, "application/sdp")
    session, ready = await _open_session(runtime, hello)
    peer = _session_peer(runtime, session, send_video=False)
    answer = await _answer(peer, body.decode(errors="replace"))
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
    if request.method == "OPTIONS":
        return _options(_ALLOW_ENDPOINT, accepts_sdp=True)
    session = authorized_session(request, VIEWER_ROLES)
    body = await _read_offer(request, "application/sdp")
    if session.closed:
        raise HTTPProblem(404, "unknown_session", "the session ended while the offer was being read")
    try:
        frames = session.broadcast.subscribe(jpeg=False)  # the track encodes the frames itself
    except TooManyViewers as error:
        raise HTTPProblem(503, "too_many_viewers", str(error)) from None
    try:
        viewer = ViewerPeer(runtime, session, frames)
    except BaseException:
        frames.close()
        raise
    answer = await _answer(viewer, body.decode(errors="replace"))
    return _sdp_created(runtime, f"/v1/whep/{viewer.resource_id}", answer, {})


async def whip_resource(request: Request) -> Response:
    return await _resource(request, "whip")


async def whep_resource(request: Request) -> Response:
    return await _resource(request, "whep")


async def _resource(request: Request, kind: str) -> Response:
    """DELETE ends a WHIP/WHEP resource; PATCH (trickle ICE, ICE restart) is not supported."""
    runtime: Runtime = request.app.state.runtime
    peer = runtime.peers.get(request.path_params["resource_id"])
    if peer is None or peer.kind != kind:
        raise HTTPProblem(404, "unknown_resource", "no such WHIP/WHEP resource (it may have ended)")
    if request.method == "OPTIONS":
        return _options(_ALLOW_RESOURCE, accepts_sdp=False)
    if request.method == "DELETE":
        await peer.close()
        return Response(status_code=200)
    if request.method == "PATCH":
        message = "trickle ICE and ICE restarts are not supported: all candidates are in the answer"
    else:
        message = f"a WHIP/WHEP resource takes {_ALLOW_RESOURCE}, not {request.method}"
    raise HTTPProblem(405, "method_not_allowed", message, headers={"Allow": _ALLOW_RESOURCE})


_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_EXPOSED = ["Location", "Link", "Accept-Post", "X-Streamcanvas-Session", "X-Streamcanvas-Control-Token", "X-Streamcanvas-Viewer-Token"]


def webrtc_routes(allowed_origins: list[str]) -> list[Route]:
    """The signalling routes. Browsers on the origins in `allowed_origins` (--allowed-origin) may call
    them cross-origin (CORS, preflight included)."""
    cors = [
        Middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["POST", "DELETE", "PATCH", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=_EXPOSED,
        )
    ]
    return [
        Route("/v1/webrtc/offer", offer, methods=["POST", "OPTIONS"], middleware=cors),
        Route("/v1/whip", whip, methods=["POST", "OPTIONS"], middleware=cors),
        Route("/v1/sessions/{session_id:str}/whep", whep, methods=["POST", "OPTIONS"], middleware=cors),
        # Every method reaches the handler, so that a 405 names only what works (Allow: OPTIONS, DELETE).
        Route("/v1/whip/{resource_id:str}", whip_resource, methods=_EVERY_METHOD, middleware=cors),
        Route("/v1/whep/{resource_id:str}", whep_resource, methods=_EVERY_METHOD, middleware=cors),
    ]
