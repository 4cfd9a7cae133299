"""Requests and connections that never complete hold nothing for long (docs/limits.md).

A real server on loopback with short limits: oversized bodies (the server's memory is measured), half-
sent requests on real sockets, a WebSocket client that stops reading, viewers of sessions that end.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from conftest import TEST_RESOLUTION, start_server
from streamcanvas.realtime_server.connections import LINGER_BYTES, LINGER_S
from helpers import Client, ServerProcess, decode_frame, make_canvas

READ_TIMEOUT_S = 2.0
MAX_PENDING = 30
SLOW_CONSUMER_S = 2.0
SIZE = TEST_RESOLUTION
MB = 1024 * 1024


@pytest.fixture(scope="module")
def guarded(cache_dir: Path, artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    blocker = tmp_path_factory.mktemp("recordings") / "a-file"
    blocker.write_text("a file where the recordings directory should be")
    process = start_server(
        cache_dir, artifacts_dir, "hardening",
        "--slots", "1",
        "--http-read-timeout", str(READ_TIMEOUT_S),
        "--max-pending-requests", str(MAX_PENDING),
        "--slow-consumer-timeout", str(SLOW_CONSUMER_S),
        env={
            "STREAMCANVAS_RECORDINGS_DIR": str(blocker / "recordings"),
            "STREAMCANVAS_STATS_INTERVAL_S": "0.25",
            "STREAMCANVAS_MAX_VIEWERS": "1",
        },
    )  # fmt: skip
    yield process
    process.stop()


def rss_mb(server: ServerProcess) -> float:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_body(server: ServerProcess, head: str, chunks: Iterator[bytes], limit_s: float = 20.0) -> tuple[bytes, int]:
    """Send a request head and then body chunks until the server answers or closes; (answer, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=limit_s) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        deadline = time.monotonic() + limit_s
        answer = b""
        for chunk in chunks:
            if time.monotonic() > deadline:
                break
            try:
                answer += sock.recv(65536)
                break  # the server answered before the body was done
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                break
        sock.settimeout(5)
        try:
            # The whole answer: its head, then as much body as it declares (the two may arrive apart).
            while not _complete(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError, OSError):
            pass
    return answer, sent


def _complete(answer: bytes) -> bool:
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def megabytes(total_mb: int, size: int = MB) -> Iterator[bytes]:
    block = b"x" * size
    for _ in range(total_mb * MB // size):
        yield block


def chunked(total_mb: int) -> Iterator[bytes]:
    block = b"x" * (64 * 1024)
    framed = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    for _ in range(total_mb * 16):
        yield framed


@pytest.mark.parametrize("path", ["/v1/whip", "/v1/webrtc/offer", "/v1/sessions/nope/whep"])
def test_a_huge_body_is_refused_without_being_read(guarded: ServerProcess, path: str) -> None:
    before = rss_mb(guarded)
    content_type = "application/json" if path.endswith("offer") else "application/sdp"
    declared = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {300 * MB}\r\n\r\n"
    answer, sent = send_body(guarded, declared, megabytes(300))
    status = answer.split(b" ", 2)[1] if answer else b""
    assert status == b"413", answer[:300]  # the declared length alone is enough
    assert b'"payload_too_large"' in answer and b"connection: close" in answer.lower()
    assert sent < 100 * MB, f"the client got {sent} bytes in before the answer"
    streamed = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent = send_body(guarded, streamed, chunked(300))
    status = answer.split(b" ", 2)[1] if answer else b""
    # WHEP checks the viewer's credentials (here: an unknown session) before it reads a byte.
    assert status == (b"404" if "whep" in path else b"413"), answer[:300]
    assert rss_mb(guarded) - before < 40, "the server buffered the body"
    assert httpx.get(f"{guarded.base_url}/healthz").status_code == 200


def test_a_body_that_keeps_coming_after_the_answer_ends_the_connection(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/sessions/nope/whep HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"4\r\nv=0\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404"), answer
        closed = False
        deadline = time.monotonic() + LINGER_S + 3  # what comes after the answer is dropped for LINGER_S at most
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"4\r\nxxxx\r\n")
                sock.settimeout(0.2)
                closed = sock.recv(65536) == b""
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        assert closed, "the server went on reading a body it had already answered"


def response_head(sock: socket.socket, request: bytes) -> bytes:
    """Send `request` and read the answer's status line and headers, lower-cased."""
    sock.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    return answer.split(b"\r\n\r\n")[0].lower()


def test_an_answer_before_the_body_says_the_connection_closes(guarded: ServerProcess) -> None:
    """A client told that a connection answered before its body arrived stays open sends its next
    request into the lingering close and gets no answer (httpx: "Server disconnected without sending
    a response" on a WHEP offer after a 401 on the same connection)."""
    request = b"POST /v1/sessions/nope/whep HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\nContent-Length: 3\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        head = response_head(sock, request)
        assert head.startswith(b"http/1.1 404") and b"\r\nconnection: close" in head, head
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        # The same request with its body: the body was read, and the connection is kept alive.
        head = response_head(sock, request + b"v=0")
        assert head.startswith(b"http/1.1 404") and b"connection: close" not in head, head


async def test_a_client_still_sending_its_body_reads_the_early_answer(guarded: ServerProcess) -> None:
    """An answer given before the body was read (a 413 here) reaches a client that is still sending
    that body: a plain close with unread bytes resets the connection, and a client mid-send then loses
    the answer (httpx's async client raised ReadError for about one 1 MiB offer in three before the
    server closed with a lingering close)."""
    offer = b"v=0\r\n" + b"a=x-pad:" + b"p" * MB + b"\r\n"
    outcomes: list[str] = []
    async with httpx.AsyncClient(base_url=guarded.base_url, timeout=10) as http:
        for _ in range(40):
            try:
                response = await http.post("/v1/whip", content=offer, headers={"content-type": "application/sdp"})
                outcomes.append(str(response.status_code))
            except httpx.HTTPError as error:
                outcomes.append(type(error).__name__)
    assert outcomes == ["413"] * 40, outcomes


def test_lingering_after_an_early_answer_is_bounded(guarded: ServerProcess) -> None:
    """What is dropped after an early answer is bounded in bytes (a client that never stops) and in
    time (a client that stalls), and the answer comes first either way."""
    head = f"POST /v1/whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\nContent-Length: {1024 * MB}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(head.encode())
        block, sent, ended = b"x" * MB, 0, False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                sock.sendall(block)
                sent += len(block)
            except (ConnectionResetError, BrokenPipeError):
                ended = True
                break
        assert ended, f"the server went on dropping a body for 20 s ({sent / MB:.0f} MiB)"
        # The kernel's buffers on both ends hold some megabytes beyond what the server read.
        assert sent < LINGER_BYTES + 64 * MB, f"{sent / MB:.0f} MiB were taken after the answer"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"v=0\r\n")
        answer = b""
        started = time.monotonic()
        while chunk := sock.recv(65536):  # the answer, then the end of the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - started < LINGER_S + 3, "a stalled client's connection was held past the lingering time"
    assert httpx.get(f"{guarded.base_url}/healthz").status_code == 200


def test_the_413_names_the_limit(guarded: ServerProcess) -> None:
    response = httpx.post(
        f"{guarded.base_url}/v1/whip", content=b"v=0\r\n" * 20000, headers={"content-type": "application/sdp"}
    )
    assert response.status_code == 413
    assert response.json() == {"error": "payload_too_large", "message": "the body is over the limit of 65536 bytes"}


def test_half_sent_requests_are_answered_408_and_closed(guarded: ServerProcess) -> None:
    sockets = []
    try:
        for index in range(MAX_PENDING - 5):
            sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
            if index % 2:
                sock.sendall(b"POST /v1/whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")  # head never finished
            else:
                sock.sendall(b"POST /v1/whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\nContent-Length: 100\r\n\r\nv=0")
            sockets.append(sock)
        started = time.monotonic()
        answers = []
        for sock in sockets:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            answers.append(data)
        assert time.monotonic() - started < READ_TIMEOUT_S + 3
        assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[:3]
        # A connection that sends nothing at all is closed too.
        silent = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
        sockets.append(silent)
        assert silent.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{guarded.base_url}/healthz").status_code == 200


def test_half_sent_requests_cannot_lock_other_clients_out(cache_dir: Path, artifacts_dir: Path) -> None:
    """With the cap of half-received requests reached, each new connection ends the oldest of them
    (a server with a long read deadline, so that only the cap can end them)."""
    server = start_server(cache_dir, artifacts_dir, "eviction", "--http-read-timeout", "60", "--max-pending-requests", "10")
    sockets = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            sockets.append(sock)
            time.sleep(0.01)
        for index in range(3):
            assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
            evicted = sockets[index].recv(4096)
            assert evicted.startswith(b"HTTP/1.1 408"), evicted
            assert b"other requests are waiting" in evicted
            refill = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # back at the cap
            refill.sendall(b"GET /healthz HTTP/1.1\r\n")
            sockets.append(refill)
        assert tcp_state(sockets[3]) == 1  # the others are still being waited for
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


async def slots_free(server: ServerProcess) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"{server.base_url}/v1/info")).json()["slots_free"]


async def test_a_websocket_client_that_stops_reading_gets_slow_consumer(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url, max_queue=2) as client:
        await client.hello(width=SIZE, height=SIZE)
        stopped_reading = time.monotonic()

        async def keep_drawing() -> None:
            for index in range(400):
                await client.send_canvas(make_canvas(SIZE, index % 7))
                await asyncio.sleep(0.05)

        drawing = asyncio.create_task(keep_drawing())
        freed_after = None
        while time.monotonic() - stopped_reading < 4 * SLOW_CONSUMER_S + 5:
            if await slots_free(guarded) == 1:
                freed_after = time.monotonic() - stopped_reading
                break
            await asyncio.sleep(0.2)
        drawing.cancel()
        assert freed_after is not None, "the slot of a client that stopped reading was not freed"
        assert freed_after <= SLOW_CONSUMER_S + 2
        # Reading again now (within the 5 s before the reset), the client finds the error and the code.
        errors = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                message = await client.recv(timeout=10)
                if message["type"] == "error":
                    errors.append(message)
        assert [error["code"] for error in errors] == ["slow_consumer"] and errors[0]["fatal"] is True
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_a_client_that_never_reads_again_is_reset(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url, max_queue=2) as client:
        await client.hello(width=SIZE, height=SIZE)
        sock = client.connection.transport.get_extra_info("socket")
        for index in range(60):
            await client.send_canvas(make_canvas(SIZE, index % 5))
            await asyncio.sleep(0.05)
        client.connection.transport.pause_reading()  # not even the library reads now
        deadline = time.monotonic() + SLOW_CONSUMER_S + 5 + 6
        state = None
        while time.monotonic() < deadline:
            state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
            if state != 1:  # TCP_ESTABLISHED
                break
            await asyncio.sleep(0.25)
        assert state != 1, "the server kept the connection of a client that never reads"


async def test_a_new_mjpeg_viewer_gets_the_newest_frame_at_once_and_the_stream_ends_with_the_session(
    guarded: ServerProcess,
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        async with Client.connect(guarded.ws_url) as client:
            ready = await client.hello(width=SIZE, height=SIZE, codec="jpeg")
            shown = decode_frame(await client.frame_for(await client.send_canvas(make_canvas(SIZE, 5))))
            await asyncio.sleep(1.0)  # the session is idle: nothing new will be rendered
            url = f"{guarded.base_url}/v1/sessions/{ready['session_id']}/mjpeg?token={ready['viewer_token']}"
            async with http.stream("GET", url) as stream:
                assert stream.status_code == 200
                body = b""
                parts = stream.aiter_bytes()
                started = time.monotonic()
                while body.count(b"\xff\xd9") < 1:
                    body += await asyncio.wait_for(anext(parts), 3)
                assert time.monotonic() - started < 3
                jpeg = body[body.index(b"\xff\xd8") : body.index(b"\xff\xd9") + 2]
                seen = decode_frame({"codec": "jpeg", "image": jpeg})
                assert abs(seen.astype(int) - shown.astype(int)).mean() < 8  # the session's newest frame
                await client.connection.close()
                ended = time.monotonic()
                async for data in parts:
                    body += data
                assert time.monotonic() - ended < 3, "the MJPEG stream outlived its session"
                assert body.endswith(b"--streamcanvasframe--\r\n")
    # The access log has the request, not the token in its query string (whoever reads the log would
    # have the session's viewer link).
    log = guarded.log()
    assert f"/v1/sessions/{ready['session_id']}/mjpeg?token=[redacted]" in log
    assert ready["viewer_token"] not in log


def _handshake(server: ServerProcess, host: str, origin: str) -> bytes:
    """The status line a raw WebSocket handshake with this Host and Origin gets."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"GET /v1/stream HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_a_host_name_the_server_does_not_answer_to_is_refused(guarded: ServerProcess) -> None:
    """DNS rebinding: a page on another site whose name is re-pointed at 127.0.0.1 sends its own name as
    Host and as Origin. The Origin check alone let it open sessions; the Host check refuses it, on HTTP
    and at the WebSocket handshake, while loopback names pass."""
    port = guarded.port
    with httpx.Client(base_url=guarded.base_url, timeout=10) as http:
        refused = http.get("/v1/info", headers={"host": f"evil.example:{port}"})
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_host", refused.text
        assert "--allowed-host evil.example" in refused.json()["message"]
        assert http.post("/v1/jobs", headers={"host": "evil.example"}, json={}).status_code == 400
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"app.localhost:{port}", f"[::1]:{port}"):
            assert http.get("/v1/info", headers={"host": host}).status_code == 200, host
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # HTTP/1.0 with no Host: no browser's
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert _handshake(guarded, f"evil.example:{port}", f"http://evil.example:{port}") == b"HTTP/1.1 403 Forbidden"
    assert _handshake(guarded, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == b"HTTP/1.1 101 Switching Protocols"


@pytest.mark.parametrize(
    ("host", "allowed", "trusted"),
    [
        ("127.0.0.1", [], {"localhost", "127.0.0.1", "::1"}),
        ("127.0.0.1", ["box.lan:8000", "[fd00::5]"], {"localhost", "127.0.0.1", "::1", "box.lan", "fd00::5"}),
        ("127.0.0.1", ["*"], None),
        ("0.0.0.0", [], None),  # bound beyond loopback: any name, unless listed
        ("0.0.0.0", ["box.lan"], {"localhost", "127.0.0.1", "::1", "0.0.0.0", "box.lan"}),
        ("::1", [], {"localhost", "127.0.0.1", "::1"}),
    ],
)
def test_the_host_names_a_server_answers_to(host: str, allowed: list[str], trusted: set[str] | None) -> None:
    from streamcanvas.realtime_server.settings import Settings

    names = Settings(host=host, allowed_hosts=allowed).trusted_hosts
    assert (None if names is None else set(names)) == trusted


async def test_recording_to_an_unwritable_directory_is_a_typed_error(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url) as client:
        await client.hello(width=SIZE, height=SIZE)
        await client.connection.send(msgpack.packb({"type": "record", "action": "start", "seq": 4}))
        error = await client.expect("error")
        assert error["code"] == "recording_failed" and error["fatal"] is False and error["ref_seq"] == 4
        assert (await client.ping())["type"] == "pong"  # the session goes on
    assert "Traceback" not in guarded.log()


async def test_hello_comes_first_even_for_ping(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url) as client:
        await client.connection.send(msgpack.packb({"type": "ping", "seq": 1, "t": 1.0}))
        error = await client.expect("error")
        assert error["code"] == "not_ready" and error["fatal"] is False and error["ref_seq"] == 1
        await client.hello(width=SIZE, height=SIZE)
        assert (await client.ping())["type"] == "pong"


async def test_stats_stop_when_the_stream_is_idle(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url) as client:
        await client.hello(width=SIZE, height=SIZE)
        await client.frame_for(await client.send_canvas(make_canvas(SIZE, 2)))
        arrivals = []
        started = time.monotonic()
        while time.monotonic() - started < 4:
            try:
                message = await client.recv(timeout=0.5, keep_stats=True)
            except TimeoutError:
                continue
            if message["type"] == "stats":
                arrivals.append((time.monotonic() - started, message["fps"]))
        assert arrivals, "stats come while frames flow"
        assert not [t for t, _ in arrivals if t > 3], f"stats kept coming while idle: {arrivals}"
        assert arrivals[-1][1] == 0  # the last one said the stream had stopped


async def test_dropping_the_socket_at_any_moment_logs_no_server_error(guarded: ServerProcess) -> None:
    for attempt in range(8):
        async with Client.connect(guarded.ws_url) as client:
            if attempt % 2:
                await client.connection.send(msgpack.packb({"type": "hello", "protocol": [99]}))  # fatal
            else:
                await client.hello(width=SIZE, height=SIZE)
                await client.send_canvas(make_canvas(SIZE, attempt))
            client.connection.transport.abort()
    deadline = time.monotonic() + 10
    while await slots_free(guarded) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    log = guarded.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log


def tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)


async def read_everything(client: Client) -> None:
    while True:
        await client.recv(timeout=60)


async def test_an_mjpeg_viewer_that_stops_reading_is_reset_and_gives_its_place_back(guarded: ServerProcess) -> None:
    async with Client.connect(guarded.ws_url) as client, httpx.AsyncClient(timeout=10) as http:
        ready = await client.hello(width=SIZE, height=SIZE, codec="jpeg", quality=95)
        path = f"/v1/sessions/{ready['session_id']}/mjpeg?token={ready['viewer_token']}"
        reading = asyncio.create_task(read_everything(client))  # the session's own client keeps reading
        viewer = socket.socket()
        viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few frames
        viewer.connect(("127.0.0.1", guarded.port))
        viewer.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert viewer.recv(64).startswith(b"HTTP/1.1 200")
        # The only viewer place is taken (STREAMCANVAS_MAX_VIEWERS=1) ...
        assert (await http.get(f"{guarded.base_url}{path}")).status_code == 503
        # ... and the viewer reads no more while frames keep coming.
        started = time.monotonic()
        index = 0
        while tcp_state(viewer) == 1 and time.monotonic() - started < SLOW_CONSUMER_S + 15:
            index += 1
            await client.send_canvas(noise(index))  # big frames: the buffers fill sooner
            await asyncio.sleep(0.05)
        assert tcp_state(viewer) != 1, "the server kept a viewer that does not read"
        viewer.close()
        reading.cancel()
        async with http.stream("GET", f"{guarded.base_url}{path}") as again:
            assert again.status_code == 200  # the place was given back


def test_shutdown_is_not_held_up_by_a_client_that_does_not_read(cache_dir: Path, artifacts_dir: Path) -> None:
    server = start_server(cache_dir, artifacts_dir, "shutdown", "--slots", "1")

    async def stall_then_stop() -> float:
        async with Client.connect(server.ws_url, max_queue=2) as client:
            await client.hello(width=SIZE, height=SIZE)
            for index in range(40):
                await client.send_canvas(make_canvas(SIZE, index % 5))
                await asyncio.sleep(0.05)
            client.connection.transport.pause_reading()
            assert server.process is not None
            server.process.terminate()
            started = time.monotonic()
            while server.process.poll() is None and time.monotonic() - started < 30:
                await asyncio.sleep(0.2)
            return time.monotonic() - started

    try:
        took = asyncio.run(stall_then_stop())
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode is not None
    assert took < 20, f"the server took {took:.1f} s to stop"
