"""One session's rendered frames, fanned out to any number of viewers at the cost of one encode.

The slot's worker hands over every frame it renders (the RGB array, and its JPEG while someone
watches); the broadcast keeps only the newest. Every viewer — an MJPEG stream, a WHEP peer, whatever
comes next — is a `Subscription`: it counts against the session's viewer limit from the moment it is
admitted, gets the newest frame at once (encoded on demand if nobody watched when it was rendered), and
then each newer one. A viewer that falls behind skips frames instead of queueing them: latest-wins, with
nothing buffered but the one newest frame. When the session ends, every subscription ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BroadcastFrame:
    seq: int
    rgb: np.ndarray
    width: int
    height: int
    jpeg: bytes | None = None
    """Set when someone watched as it was rendered; otherwise encoded when a viewer first needs it."""


class TooManyViewers(Exception):
    pass


class FrameBroadcast:
    """Event-loop only. Each publish sets the current "next frame" event and starts a new one."""

    def __init__(self, max_viewers: int) -> None:
        self.max_viewers = max_viewers
        self.viewers = 0
        self.jpeg_viewers = 0
        self.latest: BroadcastFrame | None = None
        self.closed = False
        self._next = asyncio.Event()

    @property
    def wanted(self) -> bool:
        """Whether anyone wants JPEG (an MJPEG viewer), read by the worker thread to skip the encode
        otherwise (a stale read only costs or saves one frame's encode)."""
        return self.jpeg_viewers > 0

    def publish(self, frame: BroadcastFrame) -> None:
        self.latest = frame
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._next = self._next, asyncio.Event()
        event.set()

    def subscribe(self, viewer: bool = True, jpeg: bool = True) -> Subscription:
        """Admit one consumer now, or raise TooManyViewers. `viewer=False` is for the session's own
        client (its WebRTC output track), which does not count against the viewer limit; `jpeg=False`
        for consumers that encode the RGB frames themselves (video tracks)."""
        if self.closed:
            raise TooManyViewers("the session has ended")
        if viewer:
            if self.viewers >= self.max_viewers:
                raise TooManyViewers(f"this session already has {self.viewers} viewers, the limit")
            self.viewers += 1
        if jpeg:
            self.jpeg_viewers += 1
        return Subscription(self, viewer, jpeg)


class Subscription:
    """One consumer's view of a broadcast: iterate for the newest frame now, then each newer one."""

    def __init__(self, broadcast: FrameBroadcast, counted: bool, jpeg: bool) -> None:
        self._broadcast = broadcast
        self._counted = counted
        self._jpeg = jpeg
        self._seen = 0

    def close(self) -> None:
        if self._counted:
            self._counted = False
            self._broadcast.viewers -= 1
        if self._jpeg:
            self._jpeg = False
            self._broadcast.jpeg_viewers -= 1

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> BroadcastFrame:
        broadcast = self._broadcast
        while not broadcast.closed:
            frame = broadcast.latest
            if frame is not None and frame.seq > self._seen:
                self._seen = frame.seq
                return frame
            await broadcast._next.wait()
        self.close()
        raise StopAsyncIteration


async def jpeg_of(frame: BroadcastFrame, encode: Callable[[np.ndarray], bytes]) -> bytes:
    """The frame's JPEG: the one encoded for viewers when it was rendered, or one made now, off the loop."""
    if frame.jpeg is not None:
        return frame.jpeg
    return await asyncio.to_thread(encode, frame.rgb)
