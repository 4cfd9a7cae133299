"""A WebRTC session against a real server, run inside a network namespace of its own.

aioice never offers 127.0.0.1 as a host candidate, so WebRTC cannot run over plain loopback; and a
test must not send traffic to this machine's real interfaces. So `tests/test_webrtc.py` runs this
script under `unshare -n`: it brings up a private veth pair (10.213.0.1/2), starts the server, and
drives an aiortc peer: a generated video track in, rendered frames out, protocol messages on the data
channel. Every packet stays inside the namespace, which disappears with the process. Prints JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time

import httpx
import msgpack
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame

SIZE = 128


def network() -> None:
    for command in (
        "ip link set lo up",
        "ip link add v0 type veth peer name v1",
        "ip addr add 10.213.0.1/24 dev v0",
        "ip addr add 10.213.0.2/24 dev v1",
        "ip link set v0 up",
        "ip link set v1 up",
    ):
        subprocess.run(command.split(), check=True)


class PatternTrack(VideoStreamTrack):
    """A moving square on a background whose colour the scenario switches."""

    def __init__(self) -> None:
        super().__init__()
        self.colour = (220, 30, 30)
        self.count = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.empty((240, 320, 3), np.uint8)
        image[:] = self.colour
        x = (self.count * 4) % 280
        image[100:140, x : x + 40] = 255
        self.count += 1
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def scenario(port: int) -> dict:
    result: dict = {}
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("control")
    messages: list[dict] = []
    channel.on("message", lambda data: messages.append(msgpack.unpackb(data)))
    source = PatternTrack()
    pc.addTrack(source)
    frames: list[tuple[float, np.ndarray]] = []

    @pc.on("track")
    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def consume() -> None:
            while True:
                frame = await track.recv()
                frames.append((time.monotonic(), frame.to_ndarray(format="rgb24")))

        asyncio.ensure_future(consume())

    await pc.setLocalDescription(await pc.createOffer())
    hello = {"protocol": [1], "width": SIZE, "height": SIZE, "params": {"prompt": "a red house"}}
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"http://127.0.0.1:{port}/v1/webrtc/offer",
            json={"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "hello": hello},
        )
        result["status"] = response.status_code
        answer = response.json()
        result["ready"] = answer.get("ready")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        deadline = time.monotonic() + 60
        while len(frames) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        result["connection"] = pc.connectionState
        result["candidates"] = sorted({line.split()[4] for line in answer["sdp"].splitlines() if line.startswith("a=candidate")})

        result["size"] = list(frames[-1][1].shape) if frames else None
        await asyncio.sleep(3)
        frames_before = len(frames)
        channel.send(msgpack.packb({"type": "ping", "seq": 900, "t": 1.5}))
        channel.send(msgpack.packb({"type": "params", "seq": 901, "changes": {"prompt": "a blue lake"}}))
        channel.send(msgpack.packb({"type": "params", "seq": 902, "changes": {"steps": 99}}))
        channel.send(b"\xc1")
        await asyncio.sleep(3)
        result["frames"] = len(frames)
        result["frames_after_params"] = len(frames) - frames_before
        result["messages"] = [{k: v for k, v in m.items() if k != "image"} for m in messages]
        info = (await http.get(f"http://127.0.0.1:{port}/v1/info")).json()
        result["sessions_during"] = info["sessions"]
        timestamps = [stamp for stamp, _ in frames]
        result["fps"] = round((len(timestamps) - 1) / (timestamps[-1] - timestamps[0]), 2) if len(timestamps) > 1 else 0
        await pc.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = (await http.get(f"http://127.0.0.1:{port}/v1/info")).json()
            if info["sessions"] == 0:
                break
            await asyncio.sleep(0.2)
        result["sessions_after"] = info["sessions"]
        result["slots_free_after"] = info["slots_free"]
        result["whip"] = await whip_and_whep(http, port)
    return result


async def whip_and_whep(http: httpx.AsyncClient, port: int) -> dict:
    """Publish with WHIP (send-only video, parameters in the URL), watch with WHEP (receive-only)."""
    base = f"http://127.0.0.1:{port}"
    outcome: dict = {}
    publisher = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    publisher.addTransceiver(PatternTrack(), direction="sendonly")
    await publisher.setLocalDescription(await publisher.createOffer())
    published = await http.post(
        f"{base}/v1/whip",
        params={"prompt": "a harbour", "width": SIZE, "height": SIZE, "strength": 0.6},
        content=publisher.localDescription.sdp,
        headers={"Content-Type": "application/sdp"},
    )
    outcome["whip_status"] = published.status_code
    outcome["whip_content_type"] = published.headers.get("content-type")
    outcome["whip_location"] = published.headers.get("location")
    await publisher.setRemoteDescription(RTCSessionDescription(sdp=published.text, type="answer"))
    session_id = published.headers["x-streamcanvas-session"]
    viewer_token = published.headers["x-streamcanvas-viewer-token"]

    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer.addTransceiver("video", direction="recvonly")
    received: list[tuple[int, int]] = []

    @viewer.on("track")
    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def consume() -> None:
            while True:
                frame = await track.recv()
                received.append((frame.width, frame.height))

        asyncio.ensure_future(consume())

    await viewer.setLocalDescription(await viewer.createOffer())
    watched = await http.post(
        f"{base}/v1/sessions/{session_id}/whep",
        content=viewer.localDescription.sdp,
        headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {viewer_token}"},
    )
    outcome["whep_status"] = watched.status_code
    outcome["whep_location"] = watched.headers.get("location")
    await viewer.setRemoteDescription(RTCSessionDescription(sdp=watched.text, type="answer"))
    deadline = time.monotonic() + 60
    while len(received) < 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    outcome["whep_frames"] = len(received)
    outcome["whep_size"] = list(received[-1]) if received else None
    outcome["patch_status"] = (await http.patch(f"{base}{watched.headers['location']}", content=b"")).status_code
    outcome["delete_whep"] = (await http.delete(f"{base}{watched.headers['location']}")).status_code
    outcome["delete_whip"] = (await http.delete(f"{base}{published.headers['location']}")).status_code
    outcome["delete_again"] = (await http.delete(f"{base}{published.headers['location']}")).status_code
    await viewer.close()
    await publisher.close()
    outcome["sessions_after"] = (await http.get(f"{base}/v1/info")).json()["sessions"]
    return outcome


@contextlib.contextmanager
def running_server(port: int, log: str, *extra: str):  # type: ignore[no-untyped-def]
    with open(log, "ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamcanvas.realtime_server.cli", "serve", "--port", str(port),
             "--resolution", f"{SIZE}x{SIZE}", "--threads", "2", "--log-level", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            yield server
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> None:
    port, log = int(sys.argv[1]), sys.argv[2]
    network()
    # The server offers only v0's address: the setting a deployment uses to advertise chosen addresses.
    with running_server(port, log, "--ice-host-address", "10.213.0.1"):
        print(json.dumps(asyncio.run(asyncio.wait_for(scenario(port), 150))))


if __name__ == "__main__":
    main()
