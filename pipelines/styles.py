"""Style presets: named bundles of stream parameters, loaded from TOML, that a session picks by name.

    styles = load_styles(None)                           # the shipped defaults (styles.toml)
    params = apply_style(current, defaults, styles, {"style": "watercolor", "strength": 0.7})

A preset sets some fields; the session's own changes in the same message win over it; and when a
session moves to another preset (or to none) the fields the old one set go back to their defaults first,
so nothing of a style lingers after it is left.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .controls import ControlSpec
from .errors import InvalidParameter, ModelLoadError, UnknownName
from .stream import StreamParams

DEFAULT_STYLES = Path(__file__).with_name("styles.toml")
STYLE_FIELDS = frozenset(
    {
        "prompt_template", "negative_prompt", "strength", "steps", "guidance_scale", "cfg_type", "delta",
        "transition_frames", "feedback", "loras", "controls",
    }
)
CONTROL_SCALE = "control_scale"
MAX_STYLES = 256


@dataclass(frozen=True)
class StylePreset:
    name: str
    description: str
    fields: Mapping[str, Any]
    control_scale: float | None = None
    """Sets the scale of every control a session using this style has (None: leaves them)."""

    def describe(self) -> dict[str, Any]:
        fields = StreamParams().replace(**self.fields).as_wire()
        described = {name: fields[name] for name in self.fields}
        if self.control_scale is not None:
            described[CONTROL_SCALE] = self.control_scale
        return {"name": self.name, "description": self.description, "fields": described}


def load_styles(path: Path | None, loras: Iterable[str] = (), controlnets: Iterable[str] = ()) -> dict[str, StylePreset]:
    """The presets in a TOML file (None: the shipped defaults), checked against the LoRAs and ControlNets
    this server has. Raises ModelLoadError, naming the preset and field, for anything wrong."""
    source = path or DEFAULT_STYLES
    try:
        table = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ModelLoadError(f"style presets {source}: {error}") from None
    if len(table) > MAX_STYLES:
        raise ModelLoadError(f"style presets {source}: more than {MAX_STYLES} presets")
    known_loras, known_controlnets = set(loras), set(controlnets)
    styles = {}
    for name, entry in table.items():
        where = f"style preset {name!r} in {source}"
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{where}: expected a table of fields")
        entry = dict(entry)
        description = entry.pop("description", "")
        control_scale = entry.pop(CONTROL_SCALE, None)
        unknown = sorted(set(entry) - STYLE_FIELDS)
        if unknown or not isinstance(description, str) or len(name) > 64:
            problem = f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(STYLE_FIELDS | {CONTROL_SCALE, 'description'}))})" if unknown else "bad name or description"
            raise ModelLoadError(f"{where}: {problem}")
        try:
            params = StreamParams().replace(**entry)
            if control_scale is not None:
                ControlSpec("check", scale=control_scale)
        except InvalidParameter as error:
            raise ModelLoadError(f"{where}: {error}") from None
        missing = [lora for lora, _ in params.loras if lora not in known_loras]
        missing += [control.model for control in params.controls if control.model not in known_controlnets]
        if missing:
            raise ModelLoadError(f"{where}: uses {missing[0]!r}, which this server does not load (--lora/--controlnet NAME=PATH)")
        styles[name] = StylePreset(name, description, entry, None if control_scale is None else float(control_scale))
    return styles


def apply_style(
    current: StreamParams, defaults: StreamParams, styles: Mapping[str, StylePreset], changes: Mapping[str, Any]
) -> StreamParams:
    """`current` with `changes` applied; a `style` among them brings its preset's fields in under them."""
    if "style" not in changes:
        return current.replace(**changes)
    name = changes["style"]
    if name and name not in styles:
        raise UnknownName.listing("style", "style preset", name, styles)
    merged: dict[str, Any] = {}
    old = styles.get(current.style)
    if old is not None:
        merged.update({field: getattr(defaults, field) for field in old.fields})
    preset = styles.get(name)
    if preset is not None:
        merged.update(preset.fields)
    merged.update(changes)
    params = current.replace(**merged)
    if preset is not None and preset.control_scale is not None and "controls" not in changes:
        scaled = tuple(dataclasses.replace(control, scale=preset.control_scale) for control in params.controls)
        params = params.replace(controls=scaled)
    return params
