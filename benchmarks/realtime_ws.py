"""Real-time WebSocket benchmark: the server against the same pipeline driven in-process.

    python -m streamcanvas.benchmarks.realtime_ws --resolution 256 --seconds 10

Runs, in one process and one after the other so they never compete for the CPU:
1. `bare`: a StreamPipeline rendering a cycle of distinct canvases back to back, no server (fps and
   per-frame time), alternating with the `steady` server run below in --rounds rounds, so that both
   see the same drift in this machine's speed;
2. a real `streamcanvas serve` child process on a free loopback port, and N WebSocket clients in this
   process sending JPEG canvases in three patterns:
   - `steady`: each client sends canvases at the bare fps, like a camera at the model's speed;
   - `flood`: each client sends 4x faster than that (the server must drop, not queue);
   - `lockstep`: each client waits for the frame that answers its canvas before sending the next,
     like the browser canvas pacing itself by the server's frames.
Latency is measured by the client, from sending a canvas to receiving the first frame that fully shows
it (the frame's `input_seq`). With the trained toy model the frame shows its canvas, so the picture
checks that attribution: `attribution` counts the sampled frames whose picture is closest to the canvas
their `input_seq` names, among all the canvases sent. Everything is bounded in time; all traffic stays
on 127.0.0.1.
Prints one JSON document (and writes it with --output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
import simplejpeg
import torch
import websockets

from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import Canvas, Hello, ImagePayload, parse_server_message, serialize
from streamcanvas.pipelines.backends import BACKENDS, BackendConfig, prepare_backend
from streamcanvas.pipelines.loading import ModelSpec, inference_threads, load_model
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
from streamcanvas.sessions.stats import percentiles

PROMPT = "a watercolor landscape with mountains"
CANVAS_COUNT = 16
ATTRIBUTION_SAMPLES = 48
"""Frames per client whose picture is compared with the canvases (decoded after the run, off the clock)."""


def describe_machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def make_canvases(size: int, count: int = CANVAS_COUNT) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    canvases = []
    for index in range(count):
        canvas = np.stack([(x + index * 7) % 256, (y * 3 + index) % 256, np.full_like(x, 40 * index % 256)], -1)
        canvas = canvas.astype(np.uint8)
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            canvas[y0 : y0 + size // 4, x0 : x0 + size // 4] = rng.integers(0, 255, 3)
        canvases.append(canvas)
    return canvases


class BareRun:
    """The same pipeline the server runs, driven in this process with no server in between."""

    def __init__(self, size: int, warmup_frames: int, backend: str) -> None:
        self.model = load_model(ModelSpec())
        config = BackendConfig(name=backend, threads=inference_threads(None), measure_side=size)  # type: ignore[arg-type]
        self.model.backend = prepare_backend(self.model, config)
        self.stream = StreamPipeline(self.model, size, size)
        self.stream.configure(StreamParams(prompt=PROMPT), img2img=True)
        self.canvases = make_canvases(size)
        self.frames = 0
        self.seconds = 0.0
        self.frame_ms: list[float] = []
        for _ in range(warmup_frames):
            self._render()

    def _render(self) -> None:
        self.stream.render(self.canvases[self.frames % len(self.canvases)], tag=self.frames)
        self.frames += 1

    def run(self, seconds: float) -> float:
        """Render back to back for `seconds`; returns this run's fps."""
        frames_before, started = self.frames, time.perf_counter()
        while time.perf_counter() - started < seconds:
            frame_started = time.perf_counter()
            self._render()
            self.frame_ms.append((time.perf_counter() - frame_started) * 1000)
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        return (self.frames - frames_before) / elapsed

    def summary(self, runs: list[float]) -> dict[str, Any]:
        return {
            "fps": round(len(self.frame_ms) / self.seconds, 2),
            "fps_per_round": [round(fps, 2) for fps in runs],
            "frame_ms": percentiles(self.frame_ms),
            "model": self.model.describe(),
            "backend": self.model.backend.describe(),
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(size: int, slots: int, *extra: str):  # type: ignore[no-untyped-def]
    port = free_port()
    command = [
        sys.executable, "-m", "streamcanvas.realtime_server.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--resolution", f"{size}x{size}",
        "--slots", str(slots), "--log-level", "warning", *extra,
    ]  # fmt: skip
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the server runs, and a full pipe blocks
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready within 180 s")
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/v1/stream"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@dataclass
class ClientResult:
    frames: int = 0
    sent: int = 0
    answered: int = 0
    latency_ms: list[float] = field(default_factory=list)
    server_stats: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[int, bytes]] = field(default_factory=list)
    """(input_seq, JPEG) of the first measured frames, for `attribution`."""


def _thumbnail(pixels: np.ndarray, side: int = 16) -> np.ndarray:
    """Luminance block means on a side × side grid: the picture's layout, whatever the prompt tints it."""
    height, width = pixels.shape[:2]
    luma = pixels[: height // side * side, : width // side * side].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return luma.reshape(side, height // side, side, width // side).mean(axis=(1, 3)).ravel()


def attribution(samples: list[tuple[int, bytes]], canvases: list[np.ndarray]) -> dict[str, int]:
    """How many frames look most like the canvas their input_seq names (canvas seq % count), among all
    the canvases. Canvases are compared by what sets each apart from the others (their mean taken
    out), frames likewise (the sampled frames' mean taken out)."""
    if not samples:
        return {"frames_checked": 0, "picture_shows_input_seq": 0}
    references = np.stack([_thumbnail(canvas) for canvas in canvases])
    references -= references.mean(axis=0)
    frames = np.stack([_thumbnail(simplejpeg.decode_jpeg(jpeg)) for _, jpeg in samples])
    frames -= frames.mean(axis=0)
    scores = frames @ references.T / (np.linalg.norm(frames, axis=1)[:, None] * np.linalg.norm(references, axis=1)[None, :] + 1e-9)
    named = np.array([seq % len(canvases) for seq, _ in samples])
    return {"frames_checked": len(samples), "picture_shows_input_seq": int((scores.argmax(axis=1) == named).sum())}


async def run_client(
    url: str, size: int, payloads: list[bytes], rate_hz: float | None, warmup_s: float, seconds: float,
    params: dict[str, Any] | None = None,
) -> ClientResult:
    """One client. rate_hz=None means lockstep: send the next canvas once the previous one is answered."""
    result = ClientResult()
    sent_at: dict[int, float] = {}
    answered_event = asyncio.Event()
    highest_answered = 0
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=30) as connection:
        await connection.send(serialize(Hello(protocol=(1,), width=size, height=size, codec=ImageFormat.JPEG, quality=80, params={"prompt": PROMPT, **(params or {})})))
        ready = parse_server_message(await asyncio.wait_for(connection.recv(), 30))
        if ready["type"] != "ready":
            raise RuntimeError(f"not ready: {ready}")
        started = time.monotonic()
        measure_from = started + warmup_s
        stop_at = measure_from + seconds

        async def receive() -> None:
            nonlocal highest_answered
            while True:
                message = parse_server_message(await connection.recv())
                now = time.monotonic()
                if message["type"] == "stats":
                    result.server_stats = message
                    continue
                if message["type"] != "frame":
                    raise RuntimeError(f"unexpected message: {message}")
                if now >= measure_from:
                    result.frames += 1
                seq = message["input_seq"]
                if seq is not None and now >= measure_from and len(result.samples) < ATTRIBUTION_SAMPLES:
                    result.samples.append((seq, message["image"]))
                if seq is not None and seq > highest_answered:
                    highest_answered = seq
                    answered_event.set()
                    if seq in sent_at and sent_at[seq] >= measure_from:
                        result.answered += 1
                        result.latency_ms.append((now - sent_at[seq]) * 1000)

        receiver = asyncio.create_task(receive())
        seq = 0
        try:
            while time.monotonic() < stop_at:
                seq += 1
                answered_event.clear()
                sent_at[seq] = time.monotonic()
                if sent_at[seq] >= measure_from:
                    result.sent += 1
                await connection.send(serialize(Canvas(image=ImagePayload(ImageFormat.JPEG, payloads[seq % len(payloads)]), seq=seq)))
                if rate_hz is None:
                    with contextlib.suppress(TimeoutError):
                        while highest_answered < seq:
                            await asyncio.wait_for(answered_event.wait(), max(0.01, stop_at - time.monotonic()))
                            answered_event.clear()
                else:
                    await asyncio.sleep(max(0.0, sent_at[seq] + 1 / rate_hz - time.monotonic()))
            await asyncio.sleep(1.5)  # let the last frames and a stats message arrive
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await receiver
    return result


async def run_scenario(
    url: str, size: int, clients: int, rate_hz: float | None, warmup_s: float, seconds: float,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    canvases = make_canvases(size)
    payloads = [simplejpeg.encode_jpeg(canvas, quality=90) for canvas in canvases]
    results = await asyncio.gather(
        *(run_client(url, size, payloads, rate_hz, warmup_s, seconds, params) for _ in range(clients))
    )
    latency = [value for result in results for value in result.latency_ms]
    sent = sum(result.sent for result in results)
    answered = sum(result.answered for result in results)
    return {
        "clients": clients,
        "seconds": seconds,
        "send_rate_hz_per_client": round(rate_hz, 2) if rate_hz else "lockstep",
        "server_fps": round(sum(result.frames for result in results) / seconds, 2),
        "latency_samples_ms": latency,
        "inputs_sent": sent,
        "inputs_answered": answered,
        "dropped": sent - answered,
        "server_dropped_inputs": sum(result.server_stats.get("dropped_inputs", 0) for result in results),
        "latency_ms": percentiles(latency),
        "server_timings_ms": results[0].server_stats.get("timings_ms", {}),
        "attribution": attribution([sample for result in results for sample in result.samples], canvases),
    }


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(item["seconds"] for item in rounds)
    latency = [value for item in rounds for value in item["latency_samples_ms"]]
    merged = {
        "clients": rounds[0]["clients"],
        "seconds": seconds,
        "send_rate_hz_per_client": rounds[0]["send_rate_hz_per_client"],
        "server_fps": round(sum(item["server_fps"] * item["seconds"] for item in rounds) / seconds, 2),
        "server_fps_per_round": [item["server_fps"] for item in rounds],
        "latency_samples_ms": latency,
        "latency_ms": percentiles(latency),
        "server_timings_ms": rounds[-1]["server_timings_ms"],
    }
    for key in ("inputs_sent", "inputs_answered", "dropped", "server_dropped_inputs"):
        merged[key] = sum(item[key] for item in rounds)
    merged["attribution"] = {key: sum(item["attribution"][key] for item in rounds) for key in rounds[0]["attribution"]}
    return merged


@click.command()
@click.option("--resolution", default=256, show_default=True, help="Square frame size in pixels.")
@click.option("--clients", default=1, show_default=True, help="Concurrent clients (the server gets as many slots).")
@click.option("--seconds", default=15.0, show_default=True, help="Measured seconds per run.")
@click.option("--warmup", "warmup_s", default=3.0, show_default=True, help="Unmeasured seconds at the start of each server run.")
@click.option("--rounds", default=3, show_default=True, help="Alternations of bare and steady runs (seconds split between them).")
@click.option("--flood-factor", default=4.0, show_default=True, help="How much faster than bare fps the flood client sends.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKENDS), help="The backend of the bare loop and the server.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
def main(
    resolution: int, clients: int, seconds: float, warmup_s: float, rounds: int, flood_factor: float, backend: str,
    output: Path | None,
) -> None:
    """Benchmark the real-time WebSocket path against the bare pipeline; prints JSON."""
    started = time.time()
    bare_run = BareRun(resolution, warmup_frames=8, backend=backend)
    round_s = seconds / rounds
    bare_rounds = [bare_run.run(round_s)]
    rate = bare_rounds[0]
    scenarios: dict[str, Any] = {}
    steady_rounds = []
    with running_server(resolution, clients, "--backend", backend) as url:
        # This machine's speed drifts; bare and steady alternate so they are compared under the same drift.
        for index in range(rounds):
            if index:
                bare_rounds.append(bare_run.run(round_s))
            steady_rounds.append(asyncio.run(run_scenario(url, resolution, clients, rate, warmup_s, round_s)))
        for name, rate_hz in (("flood", rate * flood_factor), ("lockstep", None)):
            scenarios[name] = asyncio.run(run_scenario(url, resolution, clients, rate_hz, warmup_s, seconds))
    bare = bare_run.summary(bare_rounds)
    scenarios = {"steady": merge_rounds(steady_rounds), **scenarios}
    steady, flood = scenarios["steady"], scenarios["flood"]
    report = {
        "benchmark": "realtime_ws",
        "machine": describe_machine(),
        "config": {"resolution": resolution, "clients": clients, "seconds": seconds, "rounds": rounds, "warmup_s": warmup_s, "prompt": PROMPT, "codec": "jpeg q80", "backend": backend},
        "bare": bare,
        "scenarios": scenarios,
        "bare_fps": bare["fps"],
        "server_fps": steady["server_fps"],
        "ratio": round(steady["server_fps"] / bare["fps"], 3) if bare["fps"] else None,
        "latency_ms": steady["latency_ms"],
        "dropped": steady["dropped"],
        "flood_p99_over_steady_p99": round(flood["latency_ms"]["p99"] / steady["latency_ms"]["p99"], 2) if steady["latency_ms"]["p99"] else None,
        "wall_s": round(time.time() - started, 1),
    }
    for scenario in scenarios.values():
        scenario.pop("latency_samples_ms")
    emit_report(report, output)


def emit_report(report: dict[str, Any], output: Path | None) -> None:
    """Print a benchmark's JSON, and write it to `output` if given."""
    text = json.dumps(report, indent=2)
    click.echo(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


if __name__ == "__main__":
    main()
