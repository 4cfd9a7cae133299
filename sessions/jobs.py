"""What passes between a session and the slot that renders it, and nothing else.

A slot's worker thread never sees a `Session`. It sees `RenderClient`s: something that hands over a
`RenderJob` (a self-contained copy of everything one frame needs, down to how the frame is encoded and
who wants it) and takes back the finished frame, a skip or a failure. The session is one such client;
tests drive a slot with their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamcanvas.codecs.images import ImageFormat
from streamcanvas.pipelines.stream import StreamParams

from .broadcast import BroadcastFrame


@dataclass(frozen=True)
class InputMark:
    number: int
    """Server-side input counter: every canvas, delta or params message is one input."""
    client_seq: int | None
    received_at: float


class FrameSink(Protocol):
    """Takes rendered frames on the worker thread without blocking it (a `Recorder`)."""

    def offer(self, rgb: np.ndarray) -> None: ...


@dataclass(frozen=True)
class RenderJob:
    """A copy of everything one frame needs, taken under the client's lock."""

    image: np.ndarray | None
    """H×W×3 uint8 RGB canvas; None for txt2img."""
    newest: InputMark
    taken_at: float
    params: StreamParams
    img2img: bool
    width: int
    height: int
    dropped: int
    """Inputs superseded since the last job, never rendered (latest-wins)."""
    fresh: bool
    """False when re-rendering the same input to flush it through the stream batch."""
    codec: ImageFormat = ImageFormat.JPEG
    quality: int = 80
    wants_message: bool = True
    """Whether the client takes frames as `frame` messages; False when they reach it another way (a
    WebRTC video track): then the frame is neither encoded in `codec` nor serialised."""
    wants_jpeg: bool = False
    """Whether anyone watches as JPEG (MJPEG, OBS): the frame is then encoded once for all of them."""
    recorder: FrameSink | None = None
    model: str | None = None
    """The session's model, a name in the server's models (None: the default)."""
    layer: np.ndarray | None = None
    """The session's control layer (H×W×3 uint8), for controls whose source is "layer"; None until sent."""


@dataclass(frozen=True)
class DeliveredFrame:
    payload: bytes | None
    """The serialised `frame` message; None when the job did not want one."""
    answers: InputMark | None
    """The input this frame is the first to fully show, if any: latency is counted for it."""
    timings: dict[str, float]


class RenderClient(Protocol):
    """The slot's view of whatever it renders for. Called from the slot's worker thread, and with
    `overlap_decode` `has_input`, `deliver` and `report_failure` also from its decode thread, at the
    same time as the worker's calls: an implementation guards its own state (a `Session` takes its lock
    or hands the call to the event loop)."""

    id: str

    @property
    def closed(self) -> bool: ...

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        """Call `wake()` (from any thread) whenever a new input arrives or the client closes."""

    def take_job(self, settled: bool, flush: bool) -> RenderJob | None:
        """The newest input if it has not been taken yet; else, with `flush` and a stream that has not
        settled, the same input again (to push it through the stream batch); else None. Never waits."""

    def has_input(self) -> bool:
        """Whether an input is waiting that has not been taken (without taking it)."""

    def deliver(self, frame: DeliveredFrame, dropped_inputs: int, viewer_frame: BroadcastFrame) -> None: ...

    def report_skipped(self, dropped_inputs: int) -> None: ...

    def report_failure(self, description: str, ref_seq: int | None) -> None: ...
