"""HTTP plumbing shared by the server's own endpoints: one error type, its handler, tokens and bodies.

Every HTTP error the live server answers is an `HTTPProblem`, raised anywhere below an endpoint and
turned into the documented JSON shape `{"error": code, "message": text, ...}` by one handler. Request
bodies are capped by Starlette's own body limit (`max_body_size`, app-wide and per route): a declared
`Content-Length` over the cap is refused before a byte is read, and a chunked body is refused as soon as
it passes the cap, so no endpoint ever holds more than its limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="streamcanvas"'}
DEFAULT_MAX_BODY_BYTES = 64 * 1024
"""Bodies of every route that does not declare its own limit (the SDP and JSON signalling bodies)."""

# Starlette's own HTTP errors (routing, body limit) in the JSON shape, with stable codes.
_STARLETTE_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


class HTTPProblem(Exception):
    """An HTTP error answer: status, stable code, a message for people, extra JSON fields, headers.

    A 401 always carries `WWW-Authenticate` (RFC 9110 §11.6.1), whichever endpoint raised it.
    """

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: object
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra
        self.headers = {**(AUTHENTICATE if status == 401 else {}), **(headers or {})}

    def response(self) -> JSONResponse:
        body = {"error": self.code, "message": str(self), **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def problem_handler(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPProblem)
    return error.response()


def payload_too_large(limit: int | None) -> HTTPProblem:
    text = f"the body is over the limit of {limit} bytes" if limit else "the body is too large"
    return HTTPProblem(413, "payload_too_large", text, headers={"Connection": "close"})  # the rest is not read


async def starlette_error_handler(request: Request, error: Exception) -> Response:
    """Starlette's HTTPExceptions (no route, wrong method, body over its limit): JSON under the APIs,
    plain text for the page's files."""
    assert isinstance(error, HTTPException)
    headers = dict(error.headers or {})
    if not request.url.path.startswith(("/v1/", "/sdapi/")):
        return PlainTextResponse(error.detail, status_code=error.status_code, headers=headers)
    if error.status_code == 413:
        return payload_too_large(request.scope.get("starlette.max_body_size")).response()
    code = _STARLETTE_CODES.get(error.status_code, "http_error")
    message = f"no route {request.url.path}" if error.status_code == 404 else error.detail
    return HTTPProblem(error.status_code, code, message, headers=headers).response()


class JSONContentTooLarge:
    """Starlette's body limit (`max_body_size`) answers 413 in plain text when the declared length is
    over it, whatever the endpoint said; the API's errors are JSON. This ASGI middleware, outside the
    limit, answers `payload_too_large` instead."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the rest of the plain-text answer
            headers = dict(message.get("headers", []))
            if message["type"] == "http.response.start" and message["status"] == 413 and not headers.get(
                b"content-type", b""
            ).startswith(b"application/json"):
                replaced = True
                responder = scope.get("starlette._body_limit_responder")
                await payload_too_large(getattr(responder, "max_body_size", None)).response()(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, send_json)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host: str) -> str:
    """The name in a Host header, lower-cased and without its port: `[::1]:8000` → `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0] if host.count(":") == 1 else host


class TrustedHosts:
    """DNS-rebinding guard: a request (HTTP or WebSocket) whose Host is not one this server answers to
    is refused before any route sees it. A page on another site whose name is re-pointed at 127.0.0.1
    sends its own name as Host, and as Origin too, so the Origin check alone lets it through.

    `allowed` None: any Host (a server bound beyond loopback with no --allowed-host). Names under
    `.localhost` always resolve to loopback (RFC 6761), so they cannot be rebound and are allowed too.
    Starlette's TrustedHostMiddleware is not used: it cuts a Host at its first colon, which refuses
    every IPv6 address."""

    def __init__(self, app: ASGIApp, allowed: Collection[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed is None else frozenset(host_name(host) for host in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        name = host_name(Headers(scope=scope).get("host", ""))
        # No Host at all (an HTTP/1.0 request) is no browser's: browsers always send one, so it is let through.
        if not name or name in self.allowed or name.endswith(".localhost"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403 at the handshake
            return
        message = f"this server does not answer to the host {name!r}; start it with --allowed-host {name} if it should"
        await HTTPProblem(400, "invalid_host", message).response()(scope, receive, send)


async def disconnect_handler(_request: Request, _error: Exception) -> Response:
    """The client went away while sending its body: nobody is left to answer, so answer nothing useful."""
    return Response(status_code=400)


EXCEPTION_HANDLERS = {
    HTTPProblem: problem_handler,
    HTTPException: starlette_error_handler,
    ClientDisconnect: disconnect_handler,
}


def bearer_token(request: Request) -> str | None:
    """`Authorization: Bearer …`, else `?token=…` (for players that cannot set headers); None if neither."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.query_params.get("token") or None


def check_api_key(request: Request, api_keys: Collection[str]) -> str | None:
    """The request's bearer API key when the server has keys; HTTPProblem 401 when it is missing or wrong.

    Endpoints call this before reading their body, so a request without credentials costs nothing.
    """
    if not api_keys:
        return None
    token = bearer_token(request)
    if token is None:
        raise HTTPProblem(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in api_keys):
        raise HTTPProblem(401, "unauthorized", "the API key is not valid")
    return token


def require_content_type(request: Request, content_type: str) -> None:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != content_type:
        raise HTTPProblem(415, "unsupported_media_type", f"send the body as {content_type}")
