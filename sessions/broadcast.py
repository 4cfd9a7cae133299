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

from .mailbox import Latest


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
    """Event-loop only. The newest frame sits in a `Latest` box that every subscription watches."""

    def __init__(self, max_viewers: int) -> None:
        self.max_viewers = max_viewers
        self.viewers = 0
        self.jpeg_viewers = 0
        self.frames: Latest[BroadcastFrame] = Latest()

    @property
    def wanted(self) -> bool:
        """Whether anyone wants JPEG (an MJPEG viewer), read by the worker thread to skip the encode
        otherwise (a stale read only costs or saves one frame's encode)."""
        return self.jpeg_viewers > 0

    @property
    def latest(self) -> BroadcastFrame | None:
        return self.frames.value

    @property
    def closed(self) -> bool:
        return self.frames.closed

    def publish(self, frame: BroadcastFrame) -> None:
        self.frames.put(frame)

    def close(self) -> None:
        self.frames.close()

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
        newer = await self._broadcast.frames.newer(self._seen)
        if newer is None:
            self.close()
            raise StopAsyncIteration
        self._seen, frame = newer
        return frame


async def jpeg_of(frame: BroadcastFrame, encode: Callable[[np.ndarray], bytes]) -> bytes:
    """The frame's JPEG: the one encoded for viewers when it was rendered, or one made now, off the loop."""
    if frame.jpeg is not None:
        return frame.jpeg
    return await asyncio.to_thread(encode, frame.rgb)
