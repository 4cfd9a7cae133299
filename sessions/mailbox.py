"""The one latest-wins mailbox: it holds a single value, the newest, and never a backlog.

Used wherever something produces faster than its reader may consume: a session's outgoing frame (one
reader, `take`), a session's frames to its viewers (many readers, `newer`), and the frames of a
client's WebRTC video track (one reader, `get`). Event-loop only.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    """One slot. `put` replaces whatever is there; readers either take the value (one reader: `take`,
    `get`) or watch it without taking (any number of readers: `newer`). Do not mix the two on one box."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._taken = True
        self.version = 0
        """How many values were put: a watcher that saw version v waits for v + 1 or later."""
        self.closed = False
        self._changed = asyncio.Event()

    @property
    def value(self) -> T | None:
        """The newest value put, taken or not (None before the first)."""
        return self._value

    @property
    def waiting(self) -> bool:
        """Whether a value is there that has not been taken."""
        return not self._taken

    def put(self, value: T) -> bool:
        """Store `value` as the newest; True when it replaced one that was never taken (a drop)."""
        dropped = not self._taken
        self._value, self._taken = value, False
        self.version += 1
        self._wake()
        return dropped

    def take(self) -> T | None:
        """The value not yet taken, if any, without waiting."""
        if self._taken:
            return None
        self._taken = True
        return self._value

    def clear(self) -> None:
        """Forget the value not yet taken (it will not be delivered)."""
        self._taken = True

    async def get(self) -> T | None:
        """Wait for a value not yet taken and take it; None once the box is closed."""
        while not self.closed:
            if not self._taken:
                return self.take()
            await self._wait()
        return None

    async def newer(self, seen: int) -> tuple[int, T] | None:
        """Wait for a value put after version `seen`: (its version, the value); None once closed."""
        while not self.closed:
            if self.version > seen and self._value is not None:
                return self.version, self._value
            await self._wait()
        return None

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def _wait(self) -> None:
        event = self._changed
        await event.wait()

    def _wake(self) -> None:
        # Every waiter holds the current event; setting it and starting a new one wakes them all once.
        event, self._changed = self._changed, asyncio.Event()
        event.set()
