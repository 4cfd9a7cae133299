"""WebRTC beside WebSocket, same server, same run: fps and latency of one streaming client each.

    python -m streamcanvas.benchmarks.realtime_webrtc --resolution 256 --seconds 10

The server runs with `--ice-host-address 127.0.0.1`, and this process limits its own ICE candidates
the same way, so the WebRTC media flows over loopback like everything else here. Each client sends
new input at --rate per second for --seconds after a warm-up: the WebSocket client JPEG canvases, the
WebRTC client a generated 640x480 video track. Reported for both: frames received per second, the
server's own input-to-frame latency (its stats), and the client-measured latency.

WebRTC frames carry no sequence number back, so the input track draws its own: a white bar in one of
`SLOTS` places, the next place for each new input. The default model (the trained toy model) renders
the canvas where it was drawn, so the client reads the bar's place off each frame it receives and times
the first frame that shows an input against when that input was sent (media path included, both ways).
With `SLOTS` places an input is told apart from the ones `SLOTS` inputs before and after it, which is
unambiguous while the latency stays under `SLOTS / rate` seconds. Prints JSON.
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
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import PROMPT, describe_machine, run_scenario, running_server


SLOTS = 8
"""Places of the bar across the input frame: input n draws it in place n % SLOTS."""


class PacedPattern(MediaStreamTrack):
    """A 640x480 video track at `rate_hz`: dark grey, with a full-height white bar in place n % SLOTS."""

    kind = "video"

    def __init__(self, rate_hz: float) -> None:
        super().__init__()
        self.interval = 1 / rate_hz
        self.count = 0
        self.started = time.monotonic()
        self.sent_at: dict[int, float] = {}

    async def recv(self) -> VideoFrame:
        due = self.started + self.count * self.interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        image = np.full((480, 640, 3), 40, np.uint8)
        width = 640 // SLOTS
        place = self.count % SLOTS
        image[:, place * width : (place + 1) * width] = 255
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = round((time.monotonic() - self.started) * 90_000)
        frame.time_base = fractions.Fraction(1, 90_000)
        self.sent_at[self.count] = time.monotonic()
        if len(self.sent_at) > 4 * SLOTS:  # bounded: only the latest inputs can still be shown
            del self.sent_at[min(self.sent_at)]
        self.count += 1
        return frame


def bar_place(rgb: np.ndarray) -> int | None:
    """Which of the SLOTS places the bar is in, or None if no place stands out (a frame mid-change)."""
    columns = rgb.astype(np.float64).mean(axis=(0, 2))
    places = np.array([part.mean() for part in np.array_split(columns, SLOTS)])
    ranked = np.sort(places)
    return int(places.argmax()) if ranked[-1] - ranked[-2] > 0.5 * (ranked[-1] - ranked[0]) and ranked[-1] - ranked[0] > 30 else None


def attribute(place: int, received: float, sent_at: dict[int, float]) -> int | None:
    """The newest input sent before `received` whose bar is in `place`."""
    candidates = [n for n, sent in sent_at.items() if n % SLOTS == place and sent <= received]
    return max(candidates) if candidates else None


async def webrtc_client(base_url: str, size: int, rate_hz: float, warmup_s: float, seconds: float) -> dict[str, Any]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("control")
    stats: list[dict] = []
    channel.on("message", lambda data: stats.append(msgpack.unpackb(data)))
    pattern = PacedPattern(rate_hz)
    pc.addTrack(pattern)
    received: list[float] = []
    latencies: list[tuple[float, float]] = []  # (received at, latency in ms) of each input's first frame
    shown = {"newest": -1, "unreadable": 0}

    @pc.on("track")
    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def consume() -> None:
            with contextlib.suppress(Exception):
                while True:
                    frame = await track.recv()
                    now = time.monotonic()
                    received.append(now)
                    place = bar_place(frame.to_ndarray(format="rgb24"))
                    if place is None:
                        shown["unreadable"] += 1
                        continue
                    number = attribute(place, now, pattern.sent_at)
                    if number is not None and number > shown["newest"]:
                        shown["newest"] = number
                        latencies.append((now, (now - pattern.sent_at[number]) * 1000))

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
    sent_before = pattern.count
    await asyncio.sleep(seconds)
    sent_in_window = pattern.count - sent_before
    window = [stamp for stamp in received if stamp >= measure_from]
    measured = [latency for stamp, latency in latencies if stamp >= measure_from]
    last = next((message for message in reversed(stats[stats_from:]) if message["type"] == "stats"), {})
    await pc.close()
    return {
        "fps_received": round(len(window) / seconds, 2),
        "client_latency_ms": percentiles(measured),
        "inputs_seen": len(measured),
        "inputs_sent": sent_in_window,
        "unreadable_frames": shown["unreadable"],
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
