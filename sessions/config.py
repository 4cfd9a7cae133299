"""A session layer's settings: limits, defaults and how sessions share the slots."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from streamcanvas.codecs.images import ImageLimits
from streamcanvas.pipelines.stream import StreamParams


@dataclass(frozen=True)
class SessionConfig:
    default_width: int = 512
    default_height: int = 512
    max_width: int = 1024
    max_height: int = 1024
    slots: int = 1
    sessions_per_slot: int = 1
    """Sessions one slot (one worker) serves at once; their frames share UNet calls where they can."""
    batching: bool = True
    """Whether a slot's sessions share UNet calls (off: it renders them one by one, round-robin)."""
    frame_target_ms: float | None = None
    """With several sessions per slot: the round time the batch size adapts to stay under (None: off)."""
    max_waiting: int = 8
    max_connections: int = 64
    max_message_bytes: int = 8 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    idle_timeout_s: float = 120.0
    stats_interval_s: float = 1.0
    busy_retry_after_s: float = 5.0
    control_queue_size: int = 64
    api_keys: frozenset[str] = frozenset()
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_ttl_s: float = 12 * 3600
    max_viewers: int = 64
    recordings_dir: Path = Path("recordings")
    max_recording_s: float = 3600.0
    default_params: StreamParams = field(default_factory=StreamParams)
    """Where a session starts before its hello's params: StreamParams' defaults, or the model's own."""

    def limits_dict(self) -> dict[str, int]:
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "max_image_width": self.image_limits.max_width,
            "max_image_height": self.image_limits.max_height,
            "max_image_pixels": self.image_limits.max_pixels,
            "idle_timeout_s": int(self.idle_timeout_s),
        }
