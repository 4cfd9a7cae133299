"""Video outputs for viewers: the per-session MJPEG stream, read by unmodified clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av
import httpx
import pytest
import simplejpeg
import websockets

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, make_canvas
from streamcanvas.codecs.messages import RenewTokens, Resume

SIZE = TEST_RESOLUTION


def mjpeg_url(server: ServerProcess, ready: dict, token: str | None = None) -> str:
    token = ready["viewer_token"] if token is None else token
    return f"{server.base_url}/v1/sessions/{ready['session_id']}/mjpeg?token={token}"


@contextlib.asynccontextmanager
async def streaming_session(server: ServerProcess) -> AsyncIterator[tuple[Client, dict, asyncio.Task[None]]]:
    """A controlling client that keeps sending new canvases, so there are frames to watch."""
    async with Client.connect(server.ws_url) as client:
        ready = await client.hello(codec="png")  # viewers still get JPEG

        async def keep_drawing() -> None:
            seed = 0
            while True:
                seed += 1
                await client.send_canvas(make_canvas(SIZE, seed))
                await asyncio.sleep(0.15)

        drawing = asyncio.create_task(keep_drawing())
        try:
            yield client, ready, drawing
        finally:
            drawing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawing


async def read_parts(url: str, count: int) -> tuple[str, list[tuple[dict[str, str], bytes]]]:
    """Read `count` parts of a multipart stream by hand, checking the framing byte by byte."""
    parts = []
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("GET", url) as response:
            assert response.status_code == 200, await response.aread()
            content_type = response.headers["content-type"]
            boundary = content_type.split("boundary=")[1]
            buffer = b""
            stream = response.aiter_bytes()
            while len(parts) < count:
                while b"\r\n\r\n" not in buffer:
                    buffer += await anext(stream)
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode().split("\r\n")
                assert lines[0] == f"--{boundary}", lines
                headers = dict(line.split(": ", 1) for line in lines[1:])
                length = int(headers["Content-Length"])
                while len(buffer) < length + 2:
                    buffer += await anext(stream)
                body, trailer, buffer = buffer[:length], buffer[length : length + 2], buffer[length + 2 :]
                assert trailer == b"\r\n"
                parts.append((headers, body))
    return content_type, parts


async def test_mjpeg_parts_are_framed_for_every_player(server: ServerProcess) -> None:
    async with streaming_session(server) as (_, ready, _drawing):
        content_type, parts = await read_parts(mjpeg_url(server, ready), 3)
    assert content_type == "multipart/x-mixed-replace; boundary=streamcanvasframe"
    assert "--" not in content_type.split("boundary=")[1]
    for headers, body in parts:
        assert headers["Content-Type"] == "image/jpeg"
        height, width, _, _ = simplejpeg.decode_jpeg_header(body)
        assert (width, height) == (SIZE, SIZE)


async def test_pyav_reads_the_stream_as_an_unmodified_client(server: ServerProcess) -> None:
    def decode_frames(url: str, count: int) -> list[tuple[int, int]]:
        container = av.open(url, format="mpjpeg", timeout=30)
        try:
            sizes = []
            for frame in container.decode(video=0):
                sizes.append((frame.width, frame.height))
                if len(sizes) == count:
                    return sizes
            return sizes
        finally:
            container.close()

    async with streaming_session(server) as (_, ready, _drawing):
        sizes = await asyncio.to_thread(decode_frames, mjpeg_url(server, ready), 4)
    assert sizes == [(SIZE, SIZE)] * 4


async def test_many_viewers_at_once_and_streams_end_with_the_session(server: ServerProcess) -> None:
    async with streaming_session(server) as (client, ready, drawing):
        urls = [mjpeg_url(server, ready)] * 10 + [mjpeg_url(server, ready, token=ready["token"])]
        results = await asyncio.gather(*(read_parts(url, 2) for url in urls))
        for _, parts in results:
            for _, body in parts:
                assert simplejpeg.decode_jpeg_header(body)[:2] == (SIZE, SIZE)
        drawing.cancel()
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("GET", mjpeg_url(server, ready)) as response:
                await client.connection.close()
                received = b""
                async for chunk in response.aiter_bytes():  # ends when the session does
                    received += chunk
        assert received.startswith(b"--streamcanvasframe")


async def test_viewer_access_needs_the_right_token(server: ServerProcess) -> None:
    async with Client.connect(server.ws_url) as one, Client.connect(server.ws_url) as other:
        ready = await one.hello()
        other_ready = await other.hello()
        async with httpx.AsyncClient(timeout=10) as http:
            base = f"{server.base_url}/v1/sessions/{ready['session_id']}/mjpeg"
            missing = await http.get(base)
            assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
            assert "Bearer" in missing.headers["www-authenticate"]
            assert (await http.get(base, params={"token": "not-a-token"})).status_code == 401
            foreign = await http.get(base, params={"token": other_ready["viewer_token"]})
            assert foreign.status_code == 403 and "another session" in foreign.json()["message"]
            unknown = await http.get(f"{server.base_url}/v1/sessions/nope/mjpeg", params={"token": ready["viewer_token"]})
            assert unknown.status_code == 404
            async with http.stream("GET", base, headers={"Authorization": f"Bearer {ready['viewer_token']}"}) as ok:
                assert ok.status_code == 200


async def test_a_resumed_session_keeps_its_id_so_viewer_links_go_on(server: ServerProcess) -> None:
    """A client that reconnects (a new size, a dropped network) and resumes its session with the old
    control token gets the same session id: the viewer link made before shows the new session. The old
    connection, if the server had not seen it end, is told and closed; a token that does not control
    that id resumes nothing and leaves it alone."""
    async with streaming_session(server) as (first, ready, drawing):
        link = mjpeg_url(server, ready)
        await read_parts(link, 1)
        drawing.cancel()
        async with Client.connect(server.ws_url) as second, Client.connect(server.ws_url) as stranger:
            refused = await stranger.hello(resume=Resume(ready["session_id"], ready["viewer_token"]))
            assert refused["resumed"] is False and refused["session_id"] != ready["session_id"]
            resumed = await second.hello(width=SIZE + 64, height=SIZE + 64, resume=Resume(ready["session_id"], ready["token"]))
            assert resumed["resumed"] is True and resumed["session_id"] == ready["session_id"] and resumed["width"] == SIZE + 64
            while (replaced := await first.recv())["type"] == "frame":
                pass  # frames it had been sent before
            assert (replaced["type"], replaced["code"], replaced["fatal"]) == ("error", "replaced", True), replaced["type"]
            with pytest.raises(websockets.ConnectionClosed):
                await first.recv()
            assert first.connection.close_code == 4001
            await second.send_canvas(make_canvas(SIZE + 64, 3))
            _, parts = await read_parts(link, 1)  # the same link, the new session's frames
            assert simplejpeg.decode_jpeg_header(parts[0][1])[:2] == (SIZE + 64, SIZE + 64)
            assert server.info()["sessions"] == 2


@pytest.fixture(scope="module")
def short_token_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(cache_dir, artifacts_dir, "short-tokens", env={"STREAMCANVAS_TOKEN_TTL_S": "1"})
    yield process
    process.stop()


async def test_expired_viewer_tokens_are_refused(short_token_server: ServerProcess) -> None:
    async with Client.connect(short_token_server.ws_url) as client:
        ready = await client.hello()
        await asyncio.sleep(2.2)
        async with httpx.AsyncClient(timeout=10) as http:
            expired = await http.get(mjpeg_url(short_token_server, ready))
            assert expired.status_code == 401 and "expired" in expired.json()["message"]
            # The live session asks for fresh tokens; a link made from them works again.
            await client.send(RenewTokens(seq=4))
            tokens = await client.expect("tokens")
            assert tokens["ref_seq"] == 4 and tokens["ttl_s"] == 1.0
            async with http.stream("GET", mjpeg_url(short_token_server, {**ready, **tokens})) as renewed:
                assert renewed.status_code == 200
