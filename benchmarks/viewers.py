"""What MJPEG viewers cost: one session streamed to 0, 1 and 20 viewers.

    python -m streamcanvas.benchmarks.viewers --resolution 256 --seconds 10

A real server on a loopback port, one controlling client sending canvases at a steady rate, and N
viewers reading the session's MJPEG stream in this process. For each N: the session's fps, the
server's CPU time per rendered frame (from /proc), the frames each viewer received, and the bytes
served. Bounded in time; all traffic on 127.0.0.1. Prints JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import click
import httpx
import simplejpeg
import websockets

from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import Canvas, Hello, ImagePayload, parse_server_message, serialize
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import PROMPT, describe_machine, make_canvases, running_server


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def watch(url: str, count_from: float, stop_at: float, counts: list[int], sizes: list[int]) -> None:
    index = len(counts)
    counts.append(0)
    async with httpx.AsyncClient(timeout=None) as http:
        async with http.stream("GET", url) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                now = time.monotonic()
                if now >= stop_at:
                    return
                if now >= count_from:
                    sizes.append(len(chunk))
                    counts[index] += chunk.count(b"--streamcanvasframe\r\n")


async def run(url: str, base_url: str, pid: int, size: int, viewers: int, rate_hz: float, seconds: float) -> dict[str, Any]:
    payloads = [simplejpeg.encode_jpeg(canvas, quality=90) for canvas in make_canvases(size)]
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=30) as connection:
        await connection.send(serialize(Hello(protocol=(1,), width=size, height=size, codec=ImageFormat.JPEG, params={"prompt": PROMPT})))
        ready = parse_server_message(await connection.recv())
        mjpeg = f"{base_url}/v1/sessions/{ready['session_id']}/mjpeg?token={ready['viewer_token']}"
        frames: list[float] = []

        async def receive() -> None:
            while True:
                message = parse_server_message(await connection.recv())
                if message["type"] == "frame":
                    frames.append(time.monotonic())

        receiver = asyncio.create_task(receive())
        warm_until = time.monotonic() + 2
        stop_at = warm_until + seconds
        counts: list[int] = []
        sizes: list[int] = []
        watchers = [asyncio.create_task(watch(mjpeg, warm_until, stop_at, counts, sizes)) for _ in range(viewers)]
        cpu_start = None
        seq = 0
        try:
            while time.monotonic() < stop_at:
                if cpu_start is None and time.monotonic() >= warm_until:
                    cpu_start, frames_start = cpu_seconds(pid), len(frames)
                seq += 1
                await connection.send(serialize(Canvas(image=ImagePayload(ImageFormat.JPEG, payloads[seq % len(payloads)]), seq=seq)))
                await asyncio.sleep(1 / rate_hz)
            cpu = cpu_seconds(pid) - cpu_start
            rendered = len(frames) - frames_start
            await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 10)
        finally:
            receiver.cancel()
            for task in watchers:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await receiver
    return {
        "viewers": viewers,
        "session_fps": round(rendered / seconds, 2),
        "server_cpu_ms_per_frame": round(cpu / rendered * 1000, 1) if rendered else None,
        "frames_per_viewer": percentiles(counts, (50, 0)) if counts else None,
        "mjpeg_bytes_served": sum(sizes),
    }


@click.command()
@click.option("--resolution", default=256, show_default=True)
@click.option("--seconds", default=10.0, show_default=True, help="Measured seconds per viewer count.")
@click.option("--rate", "rate_hz", default=15.0, show_default=True, help="Canvases per second from the controlling client.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def main(resolution: int, seconds: float, rate_hz: float, output: Path | None) -> None:
    """Measure the cost of 0, 1 and 20 MJPEG viewers of one session; prints JSON."""
    runs = []
    with running_server(resolution, 1) as url:
        base_url = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
        pid = _server_pid(base_url)
        for viewers in (0, 1, 20):
            runs.append(asyncio.run(run(url, base_url, pid, resolution, viewers, rate_hz, seconds)))
    report = {
        "benchmark": "viewers",
        "machine": describe_machine(),
        "config": {"resolution": resolution, "seconds": seconds, "rate_hz": rate_hz},
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    click.echo(text)
    if output is not None:
        output.write_text(text + "\n")


def _server_pid(base_url: str) -> int:
    port = base_url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes().split(b"\0")
                if b"serve" in command and port.encode() in command:
                    return int(entry.name)
    raise RuntimeError("cannot find the server process")


if __name__ == "__main__":
    main()
