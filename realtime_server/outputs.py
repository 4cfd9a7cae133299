"""Video outputs for viewers: a per-session MJPEG stream that OBS, VLC, ffmpeg and `<img>` can play.

Viewers need the session's viewer (or control) token, from `ready.viewer_token`, as `?token=` or an
`Authorization: Bearer` header. A viewer is admitted against the session's one viewer limit (shared
with WHEP viewers), gets the newest frame at once and then each new one (a slow one skips frames); the
frames are encoded once, whatever the number of viewers. The stream, and its connection, end with the
session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from streamcanvas.codecs.images import ImageFormat, get_encoder
from streamcanvas.sessions.broadcast import Subscription, TooManyViewers, jpeg_of
from streamcanvas.sessions.manager import TokenRejected
from streamcanvas.sessions.session import Session
from streamcanvas.sessions.slots import VIEWER_JPEG_QUALITY

from .connections import limit_send_buffer
from .http import HTTPProblem, bearer_token
from .runtime import Runtime

# RFC 2046: the boundary parameter carries no leading "--"; each part starts with "--" + boundary.
BOUNDARY = "streamcanvasframe"
VIEWER_ROLES = ("viewer", "control")
MJPEG_SEND_BUFFER_BYTES = 256 * 1024
"""A few frames in flight to a viewer at most: latest-wins happens here, not in kernel buffers."""


def check_token(request: Request, session_id: str, roles: tuple[str, ...]) -> None:
    """The request carries a valid token of one of `roles` for this session, or HTTPProblem."""
    runtime: Runtime = request.app.state.runtime
    token = bearer_token(request)
    if not token:
        raise HTTPProblem(401, "unauthorized", f"a {' or '.join(roles)} token is required (?token= or Authorization: Bearer)")
    try:
        runtime.manager.tokens.verify(token, session_id, roles)
    except TokenRejected as error:
        status, code = (403, "forbidden") if error.forbidden else (401, "unauthorized")
        raise HTTPProblem(status, code, str(error)) from None


def authorized_session(request: Request, roles: tuple[str, ...]) -> Session:
    runtime: Runtime = request.app.state.runtime
    session_id = request.path_params["session_id"]
    session = runtime.manager.sessions.get(session_id)
    if session is None:
        raise HTTPProblem(404, "unknown_session", f"no live session {session_id!r}")
    check_token(request, session_id, roles)
    return session


def _part(jpeg: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
    return head + jpeg + b"\r\n"


def _encode_viewer_jpeg(rgb) -> bytes:  # type: ignore[no-untyped-def]
    return get_encoder(ImageFormat.JPEG).encode(rgb, VIEWER_JPEG_QUALITY)


class ViewerStream(StreamingResponse):
    """The MJPEG response: the viewer's place is given back however the response ends (finished, the
    client gone, or never started)."""

    MEDIA_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
    # The connection ends with the stream: a player sees the end at once, not after a keep-alive.
    HEADERS = {"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no", "Connection": "close"}

    def __init__(self, frames: Subscription) -> None:
        self.frames = frames
        super().__init__(self._parts(), media_type=self.MEDIA_TYPE, headers=self.HEADERS)

    async def _parts(self) -> AsyncIterator[bytes]:
        async for frame in self.frames:
            yield _part(await jpeg_of(frame, _encode_viewer_jpeg))
        yield f"--{BOUNDARY}--\r\n".encode()  # RFC 2046's close delimiter: the session has ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit_send_buffer(scope, MJPEG_SEND_BUFFER_BYTES)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.frames.close()


async def mjpeg(request: Request) -> Response:
    session = authorized_session(request, VIEWER_ROLES)
    if request.method == "HEAD":  # what a player would get, without taking a viewer's place
        return Response(status_code=200, headers=ViewerStream.HEADERS, media_type=ViewerStream.MEDIA_TYPE)
    try:
        frames = session.broadcast.subscribe()
    except TooManyViewers as error:
        raise HTTPProblem(503, "too_many_viewers", str(error)) from None
    return ViewerStream(frames)


async def recording(request: Request) -> Response:
    """A finished recording of the session, for its controlling client (the control token)."""
    runtime: Runtime = request.app.state.runtime
    session_id = request.path_params["session_id"]
    recording_id = request.path_params["recording_id"]
    check_token(request, session_id, ("control",))  # recordings outlive their session
    if not (session_id.isalnum() and recording_id.isalnum()):
        raise HTTPProblem(404, "unknown_recording", "no such recording")
    path = runtime.manager.config.recordings_dir / f"{session_id}-{recording_id}.mp4"
    if not path.is_file():
        raise HTTPProblem(404, "unknown_recording", "no such recording (or it is still being written)")
    return FileResponse(path, media_type="video/mp4", filename=f"streamcanvas-{recording_id}.mp4")


def output_routes() -> list[Route]:
    return [
        Route("/v1/sessions/{session_id:str}/mjpeg", mjpeg),
        Route("/v1/sessions/{session_id:str}/recordings/{recording_id:str}.mp4", recording),
    ]
