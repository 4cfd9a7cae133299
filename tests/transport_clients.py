"""Protocol clients over either transport, for tests that must hold alike on both.

A session over WebSocket says `hello` in its first message; over WebRTC the hello rides in the offer
(`POST /v1/webrtc/offer`) and the data channel carries every other message as the same MsgPack bytes.
`open_session` hides that difference: it yields a `helpers.Client` past its hello, whose carrier is the
WebSocket or the data channel. The WebRTC client asks for `frame_messages` (so frames come on the data
channel too, exact, as over a WebSocket) and sends a video track that never draws, so the canvas is
what `canvas` and `delta` messages make it. ICE is restricted to 127.0.0.1 on both ends: call
`use_loopback_ice()` before the first peer connection, and start the server with
`--ice-host-address 127.0.0.1`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgpack
import websockets
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from helpers import Client, ServerProcess
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.realtime_server.webrtc import advertise_only

TRANSPORTS = ("websocket", "webrtc")
LOOPBACK_ARGS = ("--ice-host-address", "127.0.0.1")
"""What a server started for these clients needs: ICE candidates on loopback only."""


class ChannelClosed(Exception):
    """The data channel (or its peer connection) closed: WebRTC's ConnectionClosed."""


CLOSED = (websockets.ConnectionClosed, ChannelClosed)
"""What a client's recv raises once the server has ended the session, over either transport."""


def use_loopback_ice() -> None:
    advertise_only(["127.0.0.1"])  # this process's aiortc peers, like the server, use loopback only


class DataChannel:
    """An RTCDataChannel with a WebSocket connection's send/recv, as `helpers.Client` uses them."""

    def __init__(self, channel: Any, inbox: asyncio.Queue[bytes | str | None]) -> None:
        self.channel = channel
        self.inbox = inbox

    async def send(self, data: bytes | str) -> None:
        if self.channel.readyState != "open":
            raise ChannelClosed(f"the data channel is {self.channel.readyState}")
        self.channel.send(data)

    async def recv(self) -> bytes | str:
        message = await self.inbox.get()
        if message is None:
            self.inbox.put_nowait(None)  # every later recv sees the close too
            raise ChannelClosed("the data channel closed")
        return message


class SilentTrack(MediaStreamTrack):
    """A camera that never delivers a frame: the offer has its video m-line, the canvas stays the
    messages' own."""

    kind = "video"

    async def recv(self) -> Any:
        await asyncio.Event().wait()
        raise MediaStreamError


def hello_fields(**fields: Any) -> dict[str, Any]:
    """A hello as the offer's JSON carries it: the defaults `Client.hello` uses, enums as strings."""
    fields.setdefault("protocol", [1])
    fields.setdefault("codec", ImageFormat.PNG)
    return {name: value.value if isinstance(value, ImageFormat) else value for name, value in fields.items()}


async def post_offer(server: ServerProcess, pc: RTCPeerConnection, hello: dict[str, Any]) -> httpx.Response:
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            f"{server.base_url}/v1/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp, "hello": hello}
        )


@contextlib.asynccontextmanager
async def rtc_session(
    server: ServerProcess, hello: dict[str, Any], track: MediaStreamTrack | None = None
) -> AsyncIterator[Client]:
    """A WebRTC session: `hello` in the offer, then a Client over its data channel (`client.ready` is
    the answer's ready; `client.video_frames` counts the frames the rendered track delivered)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # an explicit empty list: no public STUN
    channel = pc.createDataChannel("control")
    inbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
    opened = asyncio.Event()
    channel.on("message", inbox.put_nowait)
    channel.on("open", opened.set)
    channel.on("close", lambda: inbox.put_nowait(None))
    pc.addTrack(track if track is not None else SilentTrack())
    client = Client(DataChannel(channel, inbox))  # type: ignore[arg-type]
    client.video_frames = 0  # type: ignore[attr-defined]
    drains: list[asyncio.Task[None]] = []

    async def drain(remote: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await remote.recv()
                client.video_frames += 1  # type: ignore[attr-defined]

    @pc.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        drains.append(asyncio.get_running_loop().create_task(drain(remote)))

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            inbox.put_nowait(None)

    try:
        response = await post_offer(server, pc, hello)
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        answer = response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await asyncio.wait_for(opened.wait(), 30)
        client.ready = answer["ready"]  # type: ignore[attr-defined]
        client.pc = pc  # type: ignore[attr-defined]
        yield client
    finally:
        for task in drains:
            task.cancel()
        await pc.close()


@contextlib.asynccontextmanager
async def open_session(transport: str, server: ServerProcess, **hello: Any) -> AsyncIterator[Client]:
    """A session past its hello over `transport`, with frames as messages either way."""
    if transport == "websocket":
        async with Client.connect(server.ws_url) as client:
            client.ready = await client.hello(**hello)  # type: ignore[attr-defined]
            yield client
    else:
        hello.setdefault("frame_messages", True)
        async with rtc_session(server, hello_fields(**hello)) as client:
            yield client


async def refused_hello(transport: str, server: ServerProcess, hello: dict[str, Any]) -> dict[str, Any]:
    """How a hello the server turns away is answered: the fatal error (or busy) a WebSocket gets before
    its close, or the problem body of the offer's HTTP answer, as {"code", "fatal" or "status", ...}."""
    if transport == "websocket":
        async with Client.connect(server.ws_url) as client:
            await client.send_raw(msgpack.packb(hello, use_bin_type=True))
            message = await client.recv(timeout=10)
            with contextlib.suppress(*CLOSED):  # nothing more may come before the close
                raise AssertionError(f"a message after the refusal: {await client.recv(timeout=10)}")
            closed = client.connection.close_code  # type: ignore[attr-defined]
            if message["type"] == "busy":
                return {"code": "busy", "busy": message, "close_code": closed}
            assert message["type"] == "error" and message["fatal"] is True, message
            return {"code": message["code"], "message": message["message"], "field": message["field"], "close_code": closed}
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("control")
    pc.addTrack(SilentTrack())
    try:
        response = await post_offer(server, pc, hello)
    finally:
        await pc.close()
    assert response.status_code in (400, 401, 503), f"{response.status_code} {response.text}"
    body = response.json()
    return {"code": body["error"], "message": body["message"], "field": body.get("field"), "status": response.status_code, "busy": body.get("busy")}

