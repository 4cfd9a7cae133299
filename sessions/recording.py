"""Recording a session's output to an MP4 file (H.264 through PyAV), off the render path.

The slot's worker offers each rendered frame; a recorder thread of its own encodes them. The queue
between them is bounded: if the encoder falls behind, frames are dropped (and counted) rather than
queued, and timestamps come from when each frame was rendered, so a recording with drops plays at the
right speed, just with fewer frames.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_QUEUE_FRAMES = 16
_TIME_BASE = Fraction(1, 1000)
_MIN_FRAME_MS = 10
"""Frames closer than this are spaced out (no real stream renders faster than 100 fps)."""
_STOP = None


@dataclass(frozen=True)
class RecordingSummary:
    path: Path
    frames: int
    dropped: int
    duration_s: float
    bytes: int
    truncated: bool
    error: str | None


class RecordingFailed(Exception):
    pass


class Recorder:
    def __init__(self, path: Path, width: int, height: int, max_seconds: float) -> None:
        import av  # PyAV: only needed once someone records

        self.path = path
        self.width = width
        self.height = height
        self.max_seconds = max_seconds
        self.frames = 0
        self.dropped = 0
        self.truncated = False
        self.error: str | None = None
        self._first: float | None = None
        self._last_pts = -_MIN_FRAME_MS  # so the first frame is at 0
        self._stopped = False
        self._queue: queue.Queue[tuple[float, np.ndarray] | None] = queue.Queue(maxsize=_QUEUE_FRAMES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(path), mode="w", format="mp4")
            # No B-frames: with render-time (variable) timestamps, reordered frames can get a decode
            # time after their presentation time, which the MP4 muxer refuses.
            self._stream = self._container.add_stream(
                "libx264", options={"preset": "veryfast", "crf": "20", "bf": "0"}
            )
        except (av.FFmpegError, OSError, ValueError) as error:
            raise RecordingFailed(f"cannot record to {path}: {error}") from None
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuv420p"
        # Timestamps in milliseconds, from when each frame was rendered (not a fixed frame rate). The
        # stream's own time base may be changed by the muxer once it writes the header, so frames are
        # stamped with this constant one, never with `self._stream.time_base`.
        self._stream.time_base = _TIME_BASE
        self._stream.codec_context.time_base = _TIME_BASE
        self._thread = threading.Thread(target=self._run, name=f"recorder-{path.stem}", daemon=True)
        self._thread.start()

    def offer(self, rgb: np.ndarray) -> None:
        """Called by the slot worker for each frame; never blocks."""
        if self._stopped:
            return
        try:
            self._queue.put_nowait((time.monotonic(), rgb))
        except queue.Full:
            self.dropped += 1

    def stop(self) -> RecordingSummary:
        """Finish the file (blocks until the encoder is done: call it off the event loop)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)
            self._thread.join()
        size = self.path.stat().st_size if self.path.exists() else 0
        duration = max(0, self._last_pts) / 1000
        return RecordingSummary(self.path, self.frames, self.dropped, duration, size, self.truncated, self.error)

    def _run(self) -> None:
        import av

        try:
            while (item := self._queue.get()) is not _STOP:
                stamp, rgb = item
                self._encode(av, stamp, rgb)
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        except (av.FFmpegError, OSError, ValueError) as error:  # a full disk, a removed directory
            logger.exception("recording %s failed", self.path)
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self._container.close()

    def _encode(self, av, stamp: float, rgb: np.ndarray) -> None:  # type: ignore[no-untyped-def]
        if self._first is None:
            self._first = stamp
        elapsed = stamp - self._first
        if elapsed > self.max_seconds:
            self.truncated = True
            return
        pts = max(self._last_pts + _MIN_FRAME_MS, round(elapsed * 1000))  # milliseconds, increasing
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = pts
        frame.time_base = _TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self._last_pts = pts
        self.frames += 1
