"""One session's rendered frames, fanned out to any number of viewers at the cost of one encode.

The slot's worker publishes each frame's JPEG once (only while someone watches); every viewer awaits
the newest one. A viewer that falls behind skips frames instead of queueing them: latest-wins, per
viewer, with nothing buffered but the one newest frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BroadcastFrame:
    seq: int
    jpeg: bytes
    width: int
    height: int
    rgb: np.ndarray | None = None
    """The decoded frame as well, for video tracks (WebRTC) that encode it themselves."""


class TooManyViewers(Exception):
    pass


class FrameBroadcast:
    """Event-loop only. Each publish sets the current "next frame" event and starts a new one."""

    def __init__(self, max_viewers: int) -> None:
        self.max_viewers = max_viewers
        self.viewers = 0
        self.latest: BroadcastFrame | None = None
        self.closed = False
        self._next = asyncio.Event()

    @property
    def wanted(self) -> bool:
        """Read by the worker thread to skip the extra encode when nobody watches (a stale read only
        costs or saves one frame's encode)."""
        return self.viewers > 0

    @property
    def full(self) -> bool:
        return self.viewers >= self.max_viewers

    def publish(self, frame: BroadcastFrame) -> None:
        self.latest = frame
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._next = self._next, asyncio.Event()
        event.set()

    async def subscribe(self) -> AsyncIterator[BroadcastFrame]:
        """The newest frame now (if any), then each newer one as it comes, until the session ends."""
        if self.full:
            raise TooManyViewers(f"this session already has {self.viewers} viewers, the limit")
        self.viewers += 1
        try:
            seen = 0
            while not self.closed:
                frame = self.latest
                if frame is None or frame.seq <= seen:
                    await self._next.wait()
                    continue
                seen = frame.seq
                yield frame
        finally:
            self.viewers -= 1
