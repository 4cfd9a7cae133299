"""What differs between the transports, and must still come out alike: WebSocket, and WebRTC with a
camera track as its canvas and its frames on the video track (the way the webcam page runs it).

Both are thin adapters over one session core. The protocol-level tests themselves (bad input, slots
and the line, realtime behaviour) run over both through the `transport` fixture and
`transport_clients.open_session`; these are the ones where the WebRTC side uses its media tracks. WebRTC runs over loopback here: the server offers only 127.0.0.1
(--ice-host-address) and this process's own ICE does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import msgpack
import pytest
from aiortc import VideoStreamTrack
from av import VideoFrame

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, make_canvas
from transport_clients import LOOPBACK_ARGS, hello_fields, open_session, rtc_session, use_loopback_ice


@pytest.fixture(scope="module")
def loopback_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    use_loopback_ice()
    process = start_server(cache_dir, artifacts_dir, "transports", "--slots", "2", *LOOPBACK_ARGS)
    yield process
    process.stop()


class CanvasTrack(VideoStreamTrack):
    """A camera that shows one still canvas."""

    def __init__(self) -> None:
        super().__init__()
        self.image = make_canvas(TEST_RESOLUTION, 1)

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


@contextlib.asynccontextmanager
async def connect(transport: str, server: ServerProcess, **hello: Any) -> AsyncIterator[Client]:
    """A session over `transport`; over WebRTC with a camera (CanvasTrack) and frames on the video
    track only, as a browser's webcam page runs it."""
    if transport == "websocket":
        async with open_session(transport, server, **hello) as client:
            yield client
    else:
        async with rtc_session(server, hello_fields(**hello), CanvasTrack()) as client:
            yield client


async def test_parameters_and_references_alike(loopback_server: ServerProcess, transport: str) -> None:
    async with connect(transport, loopback_server) as client:
        await client.send_raw(msgpack.packb({"type": "params", "seq": 41, "changes": {"prompt": "a fox", "strength": 0.7}}))
        await client.send_raw(msgpack.packb({"type": "params", "seq": 42, "changes": {"strength": 3.0}}))
        error = await client.expect("error")
        assert (error["code"], error["ref_seq"], error["field"]) == ("invalid_value", 42, "strength")
        await client.send_raw(msgpack.packb({"type": "record", "seq": 43, "action": "start"}))
        started = await client.expect("recording")
        assert started["state"] == "started" and started["ref_seq"] == 43
        await client.send_raw(msgpack.packb({"type": "record", "seq": 44, "action": "stop"}))
        stopped = await client.expect("recording")
        assert stopped["state"] == "stopped" and stopped["ref_seq"] == 44
        assert (await client.ping())["type"] == "pong"
    info = loopback_server.info()
    for _ in range(50):
        if info["sessions"] == 0:
            break
        await asyncio.sleep(0.1)
        info = loopback_server.info()
    assert info["sessions"] == 0 and info["slots_free"] == 2


async def open_sessions(server: ServerProcess) -> int:
    for _ in range(50):
        info = server.info()
        if info["session_places_free"] == info["session_capacity"]:
            break
        await asyncio.sleep(0.1)
    return server.info()["sessions"]


async def test_a_full_server_turns_either_transport_away_and_a_freed_slot_takes_either(
    loopback_server: ServerProcess, transport: str
) -> None:
    """Two slots, one taken over each transport; a third session over `transport` is refused (a busy
    message over WebSocket, 503 busy for a WebRTC offer, which cannot wait in line inside one HTTP
    request); once one ends, the third gets its place."""
    assert await open_sessions(loopback_server) == 0
    async with contextlib.AsyncExitStack() as stack:
        holders = [
            await stack.enter_async_context(connect("websocket", loopback_server)),
            await stack.enter_async_context(connect("webrtc", loopback_server)),
        ]
        assert all(holder.ready["type"] == "ready" for holder in holders)
        assert loopback_server.info()["session_places_free"] == 0
        if transport == "websocket":
            async with Client.connect(loopback_server.ws_url) as third:
                await third.send_raw(msgpack.packb({"type": "hello", "protocol": [1]}))
                busy = await third.expect("busy")
                assert busy["slots_total"] == 2
        else:
            with pytest.raises(AssertionError, match="503"):
                async with rtc_session(loopback_server, hello_fields()):
                    pass
        await stack.aclose()  # both holders leave
    async with connect(transport, loopback_server) as third:
        assert third.ready["type"] == "ready"
    assert await open_sessions(loopback_server) == 0


async def test_frames_are_rendered_and_counted_alike(loopback_server: ServerProcess, transport: str) -> None:
    """Input in (a canvas message, or the video track's frames), frames out (frame messages, or the
    video track), and the same stats on the control channel either way."""
    async with connect(transport, loopback_server, params={"prompt": "a red house"}) as client:
        if transport == "websocket":
            await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, 1)))
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            message = await client.recv(keep_stats=True)
            if message["type"] == "stats" and message["frames"] > 0:
                break
            assert asyncio.get_running_loop().time() < deadline, "no stats with frames"
        assert message["inputs"] >= 1 and message["timings_ms"]["inference_ms"] > 0
        if transport == "webrtc":
            # The frames went out on the video track, so none was encoded for the data channel.
            assert message["timings_ms"]["encode_ms"] == 0


async def test_recording_mistakes_are_answered_alike(loopback_server: ServerProcess, transport: str) -> None:
    async with connect(transport, loopback_server) as client:
        await client.send_raw(msgpack.packb({"type": "record", "seq": 1, "action": "stop"}))
        assert (await client.expect("error"))["code"] == "not_ready"
        await client.send_raw(msgpack.packb({"type": "record", "seq": 2, "action": "pause"}))
        assert (await client.expect("error"))["field"] == "action"
        await client.send_raw(msgpack.packb({"type": "record", "seq": 3, "action": "start"}))
        await client.expect("recording")
        await client.send_raw(msgpack.packb({"type": "record", "seq": 4, "action": "start"}))
        assert (await client.expect("error"))["code"] == "not_ready"


async def test_a_recording_holds_the_frames_over_either_transport(
    loopback_server: ServerProcess, transport: str, tmp_path: Path
) -> None:
    """The recorder rides along in every render job: a WebRTC session, whose frames are never encoded
    for its data channel, records them all the same."""
    async with connect(transport, loopback_server, params={"prompt": "a red house"}) as client:
        await client.send_raw(msgpack.packb({"type": "record", "seq": 1, "action": "start"}))
        started = await client.expect("recording")
        if transport == "websocket":
            for seed in range(3):
                await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, seed)))
        else:
            frames = 0
            while frames < 3:  # the video track keeps drawing; the stats count the frames rendered
                message = await client.recv(keep_stats=True)
                frames = message["frames"] if message["type"] == "stats" else frames
        await client.send_raw(msgpack.packb({"type": "record", "seq": 2, "action": "stop"}))
        while (stopped := await client.recv())["type"] != "recording":
            assert stopped["type"] == "frame", stopped
        assert stopped["recording_id"] == started["recording_id"] and stopped["frames"] >= 3
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(
                f"{loopback_server.base_url}{stopped['url']}", headers={"Authorization": f"Bearer {client.ready['token']}"}
            )
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    path = tmp_path / "recording.mp4"
    path.write_bytes(response.content)
    with av.open(str(path)) as container:
        decoded = [(frame.width, frame.height) for frame in container.decode(video=0)]
    assert len(decoded) == stopped["frames"] and set(decoded) == {(TEST_RESOLUTION, TEST_RESOLUTION)}
