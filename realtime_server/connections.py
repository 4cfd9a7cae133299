"""Connection guards uvicorn does not have: read deadlines for HTTP requests, and slow WebSocket readers.

uvicorn's own settings cover what they can (keep-alive timeout, WebSocket size, ping interval and pong
timeout). Two things it has no setting for are added here as subclasses of its protocol classes, the
extension point its `http=` and `ws=` options take:

- **HTTP read deadline.** A request must send its head within `read_timeout_s` of the connection
  opening (or of its first byte, on a kept-alive connection), then never pause more than
  `read_timeout_s` between body bytes, and finish its body within `BODY_DEADLINE_FACTOR` times that;
  otherwise it gets `408` and the connection is closed. At most `max_pending` connections may be in
  that state (connected, request not yet fully received) at once; when one more arrives, the one that
  has been arriving longest gets `408` and is closed, so a flood of idle sockets cannot lock others
  out. A response sent before its request's body was read (413, 401, 404 …) says `connection: close`
  (a client that reused the connection would send its next request into the closing socket and get
  no answer) and ends the connection with a *lingering close*: the answer is sent and the sending
  side shut (FIN), then what the client is still sending is read and thrown away for at most
  `LINGER_S` seconds and `LINGER_BYTES` bytes, and only then is the socket closed. Closing at once
  with unread bytes in the kernel's buffer makes it send a TCP reset, and a reset that reaches the
  client while it is still sending makes it throw the answer away unread (a 1 MiB offer got
  `ReadError` instead of 413 about one time in three). A `408` (the client stalled) closes at once.
- **HTTP write deadline.** A response (an MJPEG stream, say) that the client does not read for
  `write_timeout_s` — the transport's buffer stays full — is ended with a TCP reset.
- **Slow WebSocket readers.** uvicorn pings each WebSocket; a pong comes back only after the client has
  read everything sent before the ping. When the pong is overdue, the client is sent the protocol's
  `slow_consumer` error and a close frame (code 1008), behind whatever it has not read yet, and the
  application is told at once (so the session and its slot are freed); if the client still has not
  answered the close after `close_timeout_s`, the TCP connection is reset rather than left waiting
  for a flush that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)

SLOW_CONSUMER_CLOSE = (1008, "slow_consumer")


def _raw_response(status: int, phrase: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


TRANSPORT_SCOPE_KEY = "streamcanvas.transport"
"""Where a request's scope carries its connection's transport, for `limit_send_buffer`."""
BODY_DEADLINE_FACTOR = 6
"""A request body must be complete within this many read timeouts of its head (60 s by default)."""
LINGER_S = 2.0
"""How long a connection answered before its body was read keeps reading (and dropping) that body."""
LINGER_BYTES = 16 * 1024 * 1024
"""How much of such a body is read and dropped at most before the connection is closed anyway."""


def _reset(transport: asyncio.BaseTransport) -> None:
    """Drop a connection with a TCP reset: with unsent data queued, even an aborted socket would
    otherwise linger in the kernel, still trying to deliver it to a client that does not read."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def limit_send_buffer(scope: Any, size: int) -> None:
    """Cap the kernel's send buffer of this request's connection (for a long-lived response such as an
    MJPEG stream). Linux grows a socket's send buffer to megabytes; a live stream wants little queued
    (what is queued is latency), and the write deadline can only start once the buffers are full."""
    transport = scope.get(TRANSPORT_SCOPE_KEY)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class _LingeringTransport:
    """The transport uvicorn's protocol and request cycle see: `close()` lingers (see the module's
    docstring) while a request's body is still arriving; everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self._protocol.lingering or self._transport.is_closing():
            return
        if self._protocol.receiving_body and self._transport.can_write_eof():
            self._protocol.linger()
        else:
            self._transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read and write deadlines and a cap on unfinished requests."""

    read_timeout_s: ClassVar[float] = 10.0
    write_timeout_s: ClassVar[float] = 15.0
    max_pending: ClassVar[int] = 128
    pending: ClassVar[dict[GuardedHttpProtocol, None]] = {}
    """Connections whose request is being received, oldest first (a dict keeps insertion order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingered_bytes = 0
        self.lingering = False
        self.receiving_body = False
        """A request's head has been parsed and its body has not all arrived."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        if len(self.pending) >= self.max_pending:
            oldest = next(iter(self.pending))
            logger.warning("%d requests are being received; the oldest one is ended", len(self.pending))
            oldest._read_timed_out(evicted=True)
        self._expect_bytes()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[TRANSPORT_SCOPE_KEY] = self.transport  # type: ignore[literal-required]
        self._expect_bytes()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._done_reading()  # a WebSocket: its own protocol takes the connection over
        else:
            self._close_if_answered_early(self.cycle)
            self.receiving_body = True
            self._body_deadline = self.loop.time() + BODY_DEADLINE_FACTOR * self.read_timeout_s
            self._arm()  # now the body, if any: no gap longer than the deadline

    @staticmethod
    def _close_if_answered_early(cycle: Any) -> None:
        """A response that starts before its request's body has all arrived says `connection: close`:
        the connection ends with a lingering close after it (see `on_response_complete`), and a client
        told it stays open could send its next request into that close and get no answer at all."""
        send = cycle.send

        async def send_closing_early(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False
            await send(message)

        cycle.send = send_closing_early

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm()

    def on_message_complete(self) -> None:
        self.receiving_body = False
        super().on_message_complete()
        self._done_reading()

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)
            return
        self._lingered_bytes += len(data)
        if self._lingered_bytes > LINGER_BYTES:
            self._stop_lingering()

    def eof_received(self) -> bool | None:
        if self.lingering:
            self._stop_lingering()  # the client has sent everything: nothing left to drop
        return super().eof_received()

    def linger(self) -> None:
        """The answer is out before the request's body was read: shut the sending side, drop what still
        arrives for a bounded time and amount, then close (a lingering close, as HTTP servers do)."""
        self.lingering = True
        self._done_reading()
        transport = self.transport._transport  # type: ignore[attr-defined]
        transport.write_eof()  # a FIN after the answer: the client knows the answer is complete
        transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self._stop_lingering)

    def _stop_lingering(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.transport._transport.close()  # type: ignore[attr-defined]

    def on_response_complete(self) -> None:
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (401, 404, 413 …): reading the rest only to throw it
            # away would let a client hold the connection as long as it keeps sending.
            self._done_reading()
            self.transport.close()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done_reading()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        logger.info("a response was not read for %g s; the connection is reset", self.write_timeout_s)
        _reset(self.transport)

    def _expect_bytes(self) -> None:
        self.pending[self] = None
        self._body_deadline = 0.0
        self._arm()

    def _arm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        delay = self.read_timeout_s
        if self._body_deadline:
            delay = max(0.0, min(delay, self._body_deadline - self.loop.time()))
        self._read_timer = self.loop.call_later(delay, self._read_timed_out)

    def _done_reading(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self.pending.pop(self, None)

    def _read_timed_out(self, evicted: bool = False) -> None:
        self._read_timer = None
        if not evicted and self.flow is not None and self.flow.read_paused:
            self._arm()  # we paused reading (the application has not taken the body yet): not the client's fault
            return
        self.pending.pop(self, None)
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            reason = "other requests are waiting" if evicted else f"the deadline is {self.read_timeout_s:g} s"
            self._answer_and_close(408, "Request Timeout", "request_timeout", f"the request was not received in time ({reason})")
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, phrase: str, code: str, message: str) -> None:
        self.transport.write(_raw_response(status, phrase, code, message))
        self.receiving_body = False  # a client that stalled gets no lingering: it is not sending
        self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol that ends slow readers with the protocol's own error and close code."""

    stalled_message: ClassVar[bytes | None] = None
    """Sent to a client that stopped reading, before the close frame (the `slow_consumer` error)."""
    close_timeout_s: ClassVar[float] = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.close_timeout_s

    def keepalive_timeout(self) -> None:
        """The pong is overdue: the client has not read what was sent before the ping."""
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        if self.stalled_message is not None:
            self.conn.send_binary(self.stalled_message)
        self.conn.send_close(*SLOW_CONSUMER_CLOSE)
        self.transport.write(b"".join(self.conn.data_to_send()))  # queued behind the unread data
        self.close_sent = True
        code, reason = SLOW_CONSUMER_CLOSE
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self._reset_later()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self._reset_later()

    def handle_close(self, event: Any) -> None:
        super().handle_close(event)
        if self.transport.is_closing():
            self._reset_later()  # our echo of the client's close may sit behind data it never reads

    def shutdown(self) -> None:
        super().shutdown()
        self._reset_later()

    def _reset_later(self) -> None:
        """If the close handshake has not finished by then, reset the connection: a plain close would
        wait for the unread data to drain, which a client that does not read never lets happen."""
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, _reset, self.transport)


def http_protocol(read_timeout_s: float, write_timeout_s: float, max_pending: int) -> type[GuardedHttpProtocol]:
    """A protocol class for uvicorn's `http=` option with these limits (and its own count of requests)."""
    attributes = {
        "read_timeout_s": read_timeout_s,
        "write_timeout_s": write_timeout_s,
        "max_pending": max_pending,
        "pending": {},
    }
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), attributes)


def websocket_protocol(stalled_message: bytes, close_timeout_s: float) -> type[GuardedWebSocketProtocol]:
    attributes = {"stalled_message": stalled_message, "close_timeout_s": close_timeout_s}
    return type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), attributes)
