"""Rolling per-session figures (fps, latency percentiles, drops), bounded in memory."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

WINDOW_FRAMES = 256


def percentiles(samples: list[float] | np.ndarray, points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    if len(samples) == 0:
        return {f"p{point}": 0.0 for point in points}
    values = np.percentile(np.asarray(samples, dtype=np.float64), points)
    return {f"p{point}": round(float(value), 2) for point, value in zip(points, values)}


@dataclass
class SessionStats:
    """Counters since the session started, and the last WINDOW_FRAMES frames for rates and percentiles."""

    frames: int = 0
    inputs: int = 0
    dropped_inputs: int = 0
    dropped_frames: int = 0
    skipped_similar: int = 0
    failures: int = 0
    sent_at: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW_FRAMES))
    latency_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW_FRAMES))
    timings: collections.deque[dict[str, float]] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW_FRAMES)
    )

    def frame_sent(self, latency_ms: float | None, timings: dict[str, float]) -> None:
        self.frames += 1
        self.sent_at.append(time.monotonic())
        if latency_ms is not None:
            self.latency_ms.append(latency_ms)
        self.timings.append(timings)

    def fps(self, horizon_s: float = 2.0) -> float:
        now = time.monotonic()
        recent = [stamp for stamp in self.sent_at if now - stamp <= horizon_s]
        if len(recent) < 2:
            return 0.0
        span = now - recent[0]
        return round((len(recent) - 1) / span, 2) if span > 0 else 0.0

    def mean_timings(self) -> dict[str, float]:
        if not self.timings:
            return {}
        keys = self.timings[-1].keys()
        return {key: round(sum(t.get(key, 0.0) for t in self.timings) / len(self.timings), 2) for key in keys}
