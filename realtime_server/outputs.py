"""Video outputs for viewers: a per-session MJPEG stream that OBS, VLC, ffmpeg and `<img>` can play.

Viewers need the session's viewer (or control) token, from `ready.viewer_token`, as `?token=` or an
`Authorization: Bearer` header. Every viewer gets the newest frame as it comes (a slow one skips
frames); the frames are encoded once, whatever the number of viewers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from streamcanvas.sessions.broadcast import TooManyViewers
from streamcanvas.sessions.manager import TokenRejected
from streamcanvas.sessions.session import Session

from .runtime import Runtime

# RFC 2046: the boundary parameter carries no leading "--"; each part starts with "--" + boundary.
BOUNDARY = "streamcanvasframe"
VIEWER_ROLES = ("viewer", "control")


class OutputError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="streamcanvas"'} if self.status == 401 else None
        return JSONResponse({"error": self.code, "message": str(self)}, status_code=self.status, headers=headers)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("token")


def check_token(request: Request, session_id: str, roles: tuple[str, ...]) -> None:
    """The request carries a valid token of one of `roles` for this session, or OutputError."""
    runtime: Runtime = request.app.state.runtime
    token = bearer_token(request)
    if not token:
        raise OutputError(401, "unauthorized", f"a {' or '.join(roles)} token is required (?token= or Authorization: Bearer)")
    try:
        runtime.manager.tokens.verify(token, session_id, roles)
    except TokenRejected as error:
        status, code = (403, "forbidden") if error.forbidden else (401, "unauthorized")
        raise OutputError(status, code, str(error)) from None


def authorized_session(request: Request, roles: tuple[str, ...]) -> Session:
    runtime: Runtime = request.app.state.runtime
    session_id = request.path_params["session_id"]
    session = runtime.manager.sessions.get(session_id)
    if session is None:
        raise OutputError(404, "unknown_session", f"no live session {session_id!r}")
    check_token(request, session_id, roles)
    return session


def _part(jpeg: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
    return head + jpeg + b"\r\n"


async def mjpeg(request: Request) -> Response:
    try:
        session = authorized_session(request, VIEWER_ROLES)
    except OutputError as error:
        return error.response()
    if session.broadcast.full:
        return OutputError(503, "too_many_viewers", "this session has as many viewers as it allows").response()

    async def parts() -> AsyncIterator[bytes]:
        try:
            async for frame in session.broadcast.subscribe():
                yield _part(frame.jpeg)
        except TooManyViewers:
            return

    return StreamingResponse(
        parts(),
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"},
    )


async def recording(request: Request) -> Response:
    """A finished recording of the session, for its controlling client (the control token)."""
    runtime: Runtime = request.app.state.runtime
    session_id = request.path_params["session_id"]
    recording_id = request.path_params["recording_id"]
    try:
        check_token(request, session_id, ("control",))  # recordings outlive their session
    except OutputError as error:
        return error.response()
    if not (session_id.isalnum() and recording_id.isalnum()):
        return OutputError(404, "unknown_recording", "no such recording").response()
    path = runtime.manager.config.recordings_dir / f"{session_id}-{recording_id}.mp4"
    if not path.is_file():
        return OutputError(404, "unknown_recording", "no such recording (or it is still being written)").response()
    return FileResponse(path, media_type="video/mp4", filename=f"streamcanvas-{recording_id}.mp4")


def output_routes() -> list[Route]:
    return [
        Route("/v1/sessions/{session_id:str}/mjpeg", mjpeg),
        Route("/v1/sessions/{session_id:str}/recordings/{recording_id:str}.mp4", recording),
    ]
