"""Test helpers: a real `streamcanvas serve` process on a loopback port, and a protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import simplejpeg
import websockets
from PIL import Image

from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import (
    Canvas,
    CanvasDelta,
    Hello,
    ImagePayload,
    Params,
    Patch,
    Ping,
    parse_server_message,
    serialize,
)

RECEIVE_TIMEOUT_S = 30.0

# Debian's Chromium, headless, as root and offline; fake camera and screen capture for the sources.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`streamcanvas serve` in a child process, on 127.0.0.1, with its log kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        command = [sys.executable, "-m", "streamcanvas.realtime_server.cli", "serve", "--port", str(self.port)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command + self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def info(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/v1/info", timeout=5).json()


def server_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["STREAMCANVAS_CACHE_DIR"] = str(cache_dir)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Client:
    """A protocol client over a real WebSocket. `recv()` skips stats unless asked for them."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection
        self.seq = 0
        self.stats: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        kwargs.setdefault("compression", None)
        async with websockets.connect(url, max_size=None, open_timeout=30, **kwargs) as ws:
            yield cls(ws)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def send(self, message: Any) -> None:
        await self.connection.send(serialize(message))

    async def send_raw(self, data: bytes | str) -> None:
        await self.connection.send(data)

    async def recv(self, timeout: float = RECEIVE_TIMEOUT_S, keep_stats: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the server in time")
            message = parse_server_message(await asyncio.wait_for(self.connection.recv(), remaining))
            if message["type"] == "stats" and not keep_stats:
                self.stats.append(message)
                continue
            return message

    async def expect(self, kind: str, timeout: float = RECEIVE_TIMEOUT_S) -> dict[str, Any]:
        message = await self.recv(timeout)
        assert message["type"] == kind, f"expected {kind}, got {message}"
        return message

    async def hello(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("protocol", (1,))
        fields.setdefault("codec", ImageFormat.PNG)
        await self.send(Hello(**fields))
        return await self.expect("ready")

    async def send_canvas(self, rgb: np.ndarray, image_format: ImageFormat = ImageFormat.PNG) -> int:
        seq = self.next_seq()
        await self.send(Canvas(image=encode_payload(rgb, image_format), seq=seq))
        return seq

    async def send_patch(self, x: int, y: int, rgb: np.ndarray) -> int:
        seq = self.next_seq()
        await self.send(CanvasDelta(patches=(Patch(x, y, encode_payload(rgb, ImageFormat.PNG)),), seq=seq))
        return seq

    async def send_params(self, **changes: Any) -> int:
        seq = self.next_seq()
        await self.send(Params(changes=changes, seq=seq))
        return seq

    async def frame_for(self, seq: int, timeout: float = RECEIVE_TIMEOUT_S) -> dict[str, Any]:
        """The first frame that answers input `seq` (earlier frames are skipped; errors raise)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.1, deadline - time.monotonic()))
            if message["type"] == "error":
                raise AssertionError(f"server error while waiting for a frame: {message}")
            if message["type"] == "frame" and message["input_seq"] is not None and message["input_seq"] >= seq:
                return message

    async def ping(self) -> dict[str, Any]:
        seq = self.next_seq()
        await self.send(Ping(t=time.time(), seq=seq))
        while True:
            message = await self.recv()
            if message["type"] == "pong" and message["seq"] == seq:
                return message


def encode_payload(rgb: np.ndarray, image_format: ImageFormat) -> ImagePayload:
    height, width = rgb.shape[:2]
    if image_format is ImageFormat.JPEG:
        return ImagePayload(image_format, simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=95))
    if image_format is ImageFormat.RAW:
        return ImagePayload(image_format, rgb.tobytes(), width, height)

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=image_format.value.upper())
    return ImagePayload(image_format, buffer.getvalue())


def decode_frame(frame: dict[str, Any]) -> np.ndarray:
    if frame["codec"] == "raw":
        return np.frombuffer(frame["image"], dtype=np.uint8).reshape(frame["height"], frame["width"], 3)
    if frame["codec"] == "jpeg":
        return simplejpeg.decode_jpeg(frame["image"], colorspace="RGB")
    return np.asarray(Image.open(io.BytesIO(frame["image"])).convert("RGB"))


def make_canvas(size: int, seed: int) -> np.ndarray:
    """A canvas with some structure (gradients and blocks), different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    canvas = np.stack([(x * 255 // size), (y * 255 // size), np.full_like(x, 128)], axis=-1).astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - size // 4, 2)
        canvas[y0 : y0 + size // 4, x0 : x0 + size // 4] = rng.integers(0, 255, 3)
    return canvas
