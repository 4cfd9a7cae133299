"""A session layer's settings: limits, defaults and how sessions share the slots."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamcanvas.codecs.images import ImageLimits
from streamcanvas.pipelines.errors import InvalidParameter, UnknownName
from streamcanvas.pipelines.models import ModelChoice
from streamcanvas.pipelines.stream import StreamParams
from streamcanvas.pipelines.styles import StylePreset, apply_style


@dataclass(frozen=True)
class Catalog:
    """What a session may name: the server's models (the first is the default), each with the LoRAs
    and ControlNets loaded for it, and the style presets."""

    models: Mapping[str, ModelChoice] = field(default_factory=dict)
    """Empty: one model, with no LoRAs or ControlNets."""
    styles: Mapping[str, StylePreset] = field(default_factory=dict)

    def choice(self, model: str | None) -> ModelChoice:
        return self.models.get(model or next(iter(self.models), ""), ModelChoice())

    def model(self, name: str | None) -> str | None:
        """The model a hello asks for, checked (None: the default)."""
        if name is not None and name not in self.models:
            raise UnknownName.listing("model", "model", name, self.models)
        return name

    def resolve(
        self, current: StreamParams, defaults: StreamParams, changes: Mapping[str, Any], img2img: bool, model: str | None = None
    ) -> StreamParams:
        """`current` with a client's changes (a style preset among them brought in under them), every
        name checked: an unknown one is an UnknownName that lists what exists."""
        params = apply_style(current, defaults, self.styles, changes)
        self.choice(model).check(params)
        if not img2img and any(control.source == "canvas" for control in params.controls):
            raise InvalidParameter("controls", "a txt2img session has no canvas: use source 'layer' and send a control layer")
        return params


OverlapPolicy = Literal["auto", "on", "off"]
"""`--overlap-decode` (see `Slot`): "auto" decodes beside denoising where `Decoding.beside_denoising`."""


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
    overlap_decode: OverlapPolicy = "off"
    """Whether each slot decodes and sends a frame on a second thread while its worker denoises the
    next: for every stream ("on"), for those whose networks run on ONNX Runtime on the CPU ("auto"),
    or never ("off")."""
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
    catalog: Catalog = field(default_factory=Catalog)

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
