"""WebRTC beside WebSocket, same server, same run: fps and latency of one streaming client each.

    python -m streamcanvas.benchmarks.realtime_webrtc --resolution 256 --seconds 10

The server runs with `--ice-host-address 127.0.0.1`, and this process limits its own ICE candidates
the same way, so the WebRTC media flows over loopback like everything else here. Each client sends
new input at --rate per second for --seconds after a warm-up: the WebSocket client JPEG canvases, the
WebRTC client a generated 640x480 video track. Reported for both: frames received per second, the
server's own input-to-frame latency (its stats), and for WebSocket also the client-measured latency.
(The tiny test model's frames do not carry their input visibly, so WebRTC latency is the server's
figure plus the media path, which the client cannot attribute frame by frame.) Prints JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from pathlib import Path
from typing import Any

import click
import httpx
import msgpack
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from av import VideoFrame

from streamcanvas.realtime_server.webrtc import advertise_only

from .realtime_ws import PROMPT, describe_machine, run_scenario, running_server


class PacedPattern(MediaStreamTrack):
    kind = "video"

    def __init__(self, rate_hz: float) -> None:
        super().__init__()
        self.interval = 1 / rate_hz
        self.count = 0
        self.started = time.monotonic()

    async def recv(self) -> VideoFrame:
        due = self.started + self.count * self.interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        image = np.empty((480, 640, 3), np.uint8)
        image[:] = (40 * (self.count % 6), 90, 160)
        x = (self.count * 8) % 560
        image[200:280, x : x + 80] = 255
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = round((time.monotonic() - self.started) * 90_000)
        frame.time_base = fractions.Fraction(1, 90_000)
        self.count += 1
        return frame


async def webrtc_client(base_url: str, size: int, rate_hz: float, warmup_s: float, seconds: float) -> dict[str, Any]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("control")
    stats: list[dict] = []
    channel.on("message", lambda data: stats.append(msgpack.unpackb(data)))
    pc.addTrack(PacedPattern(rate_hz))
    received: list[float] = []

    @pc.on("track")
    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def consume() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await track.recv()
                    received.append(time.monotonic())

        asyncio.ensure_future(consume())

    await pc.setLocalDescription(await pc.createOffer())
    hello = {"protocol": [1], "width": size, "height": size, "params": {"prompt": PROMPT}}
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{base_url}/v1/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp, "hello": hello}
        )
        response.raise_for_status()
        answer = response.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    started = time.monotonic()
    await asyncio.sleep(warmup_s)
    measure_from = time.monotonic()
    stats_from = len(stats)
    await asyncio.sleep(seconds)
    window = [stamp for stamp in received if stamp >= measure_from]
    last = next((message for message in reversed(stats[stats_from:]) if message["type"] == "stats"), {})
    await pc.close()
    return {
        "fps_received": round(len(window) / seconds, 2),
        "server_latency_ms": last.get("latency_ms"),
        "server_fps": last.get("fps"),
        "server_timings_ms": last.get("timings_ms"),
        "dropped_inputs": last.get("dropped_inputs"),
        "connected_after_s": round(measure_from - started - warmup_s, 3),
    }


@click.command()
@click.option("--resolution", default=256, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--warmup", "warmup_s", default=3.0, show_default=True)
@click.option("--rate", "rate_hz", default=15.0, show_default=True, help="Inputs per second from each client.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def main(resolution: int, seconds: float, warmup_s: float, rate_hz: float, output: Path | None) -> None:
    """WebSocket and WebRTC clients against one server, one after the other; prints JSON."""
    advertise_only(["127.0.0.1"])
    with running_server(resolution, 1, "--ice-host-address", "127.0.0.1") as url:
        base_url = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
        websocket = asyncio.run(run_scenario(url, resolution, 1, rate_hz, warmup_s, seconds))
        websocket.pop("latency_samples_ms")
        webrtc = asyncio.run(webrtc_client(base_url, resolution, rate_hz, warmup_s, seconds))
    report = {
        "benchmark": "realtime_webrtc",
        "machine": describe_machine(),
        "config": {"resolution": resolution, "seconds": seconds, "warmup_s": warmup_s, "rate_hz": rate_hz},
        "websocket": websocket,
        "webrtc": webrtc,
    }
    text = json.dumps(report, indent=2)
    click.echo(text)
    if output is not None:
        output.write_text(text + "\n")


if __name__ == "__main__":
    main()
