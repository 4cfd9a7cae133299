"""The streamcanvas wire protocol, version 1, as data (docs/protocol.md is the prose version).

Every message is one binary WebSocket message (or one data-channel message) holding a MsgPack map with
a string `type`. Images are MsgPack `bin`, never base64. `parse_client_message()` turns bytes into one
of the frozen dataclasses below or raises a typed `CodecError`; `serialize()` does the reverse for the
server's messages. Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .errors import InvalidField, InvalidValue, MalformedMessage, UnknownMessageType
from .images import ImageFormat

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
"""Versions this build speaks, oldest first. The server picks the highest one the client also offers."""

MAX_SEQ = 2**53 - 1
MAX_ERROR_CHARS = 1000
"""An error's `message` is cut there: it is for people, and it must not carry a client's megabytes back."""
MAX_FIELD_CHARS = 100


def _quoted(value: object, limit: int = 60) -> str:
    """A client's key or value as an error quotes it: repr, at most `limit` characters."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "…"


_MAX_RECTS = 256
_MAX_STRING = 2000  # the longest string parameter (a prompt): pipelines.stream.MAX_PROMPT_CHARS, a test checks

# Parameter deltas: name → accepted Python types. Ranges (and the insides of arrays and maps) are
# checked by the pipeline that uses them (`pipelines.stream.StreamParams`).
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str, list),
    "negative_prompt": (str,),
    "prompt_template": (str,),
    "style": (str,),
    "strength": (float, int),
    "steps": (int,),
    "seed": (int,),
    "guidance_scale": (float, int),
    "delta": (float, int),
    "cfg_type": (str,),
    "denoising_batch": (bool,),
    "similar_filter": (bool,),
    "similar_threshold": (float, int),
    "transition_frames": (int,),
    "loras": (dict,),
    "controls": (list,),
    "feedback": (float, int),
}

LAYERS = ("image", "control")
"""What a canvas or delta message draws on: the img2img input, or the control layer (ControlNets whose
source is "layer" read it; the page sends its line layer there)."""


# ---------------------------------------------------------------------------------------------------
# Client → server


@dataclass(frozen=True)
class ImagePayload:
    format: ImageFormat
    data: bytes
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Resume:
    """An earlier session of this client, named with its control token, whose id the new session takes."""

    session_id: str
    token: str


@dataclass(frozen=True)
class Hello:
    type: ClassVar[str] = "hello"
    protocol: tuple[int, ...]
    width: int | None = None
    height: int | None = None
    codec: ImageFormat = ImageFormat.JPEG
    quality: int = 80
    api_key: str | None = None
    queue: bool = False
    mode: str = "img2img"
    params: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None
    model: str | None = None
    """One of the server's models (GET /v1/models); None: its default."""
    frame_messages: bool | None = None
    """Whether rendered frames come as `frame` messages; None: the transport's default (yes on a
    WebSocket, no on WebRTC, whose frames go on the video track)."""
    resume: Resume | None = field(default=None, metadata={"omit_if_none": True})
    """Continue an earlier session under its id (added to version 1): its viewer links go on working."""


MODES = ("img2img", "txt2img")


@dataclass(frozen=True)
class Canvas:
    """The whole canvas. Images of another size are scaled to the session's resolution."""

    type: ClassVar[str] = "canvas"
    image: ImagePayload
    seq: int | None = None
    layer: str = "image"


@dataclass(frozen=True)
class Patch:
    x: int
    y: int
    image: ImagePayload


@dataclass(frozen=True)
class CanvasDelta:
    """Dirty rectangles, pasted in order onto the server's copy of the canvas."""

    type: ClassVar[str] = "delta"
    patches: tuple[Patch, ...]
    seq: int | None = None
    layer: str = "image"


@dataclass(frozen=True)
class Params:
    """Prompt and parameter changes; fields not named keep their values."""

    type: ClassVar[str] = "params"
    changes: dict[str, Any]
    seq: int | None = None


@dataclass(frozen=True)
class Record:
    """Start or stop recording this session's output to an MP4 file on the server."""

    type: ClassVar[str] = "record"
    action: str
    seq: int | None = None


RECORD_ACTIONS = ("start", "stop")


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"
    t: float | None = None
    seq: int | None = None


@dataclass(frozen=True)
class RenewTokens:
    """Ask for fresh session tokens (answered by `tokens`): links made from them (a viewer link, a
    recording download) work for another token lifetime, while the session goes on."""

    type: ClassVar[str] = "renew_tokens"
    seq: int | None = None


ClientMessage = Hello | Canvas | CanvasDelta | Params | Record | Ping | RenewTokens


# ---------------------------------------------------------------------------------------------------
# Server → client


@dataclass(frozen=True)
class Ready:
    type: ClassVar[str] = "ready"
    protocol: int
    session_id: str
    width: int
    height: int
    codec: str
    quality: int
    mode: str
    params: dict[str, Any]
    limits: dict[str, int]
    model: dict[str, Any]
    token: str | None = None
    viewer_token: str | None = None
    defaults: dict[str, Any] | None = field(default=None, metadata={"omit_if_none": True})
    """Every parameter's value before the hello's `params`: this model's defaults, which a change of
    style puts the old preset's fields back to (added to version 1)."""
    resumed: bool | None = field(default=None, metadata={"omit_if_none": True})
    """Whether the hello's `resume` was honoured; absent when it had none (added to version 1)."""


@dataclass(frozen=True)
class Busy:
    """All slots are taken. With queue_position the client is waiting in line; without, it must retry."""

    type: ClassVar[str] = "busy"
    retry_after_s: float
    slots_total: int
    queue_position: int | None = field(default=None, metadata={"omit_if_none": True})
    queue_length: int = 0


@dataclass(frozen=True)
class Frame:
    type: ClassVar[str] = "frame"
    seq: int
    input_seq: int | None
    width: int
    height: int
    codec: str
    image: bytes
    timings: dict[str, float]


@dataclass(frozen=True)
class Stats:
    type: ClassVar[str] = "stats"
    fps: float
    latency_ms: dict[str, float]
    frames: int
    inputs: int
    dropped_inputs: int
    dropped_frames: int
    skipped_similar: int
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    ref_seq: int | None = None
    ref_type: str | None = None
    field: str | None = None
    fatal: bool = False

    def __post_init__(self) -> None:
        # What a client sent is quoted short where an error names it; this bounds whatever was missed.
        if len(self.message) > MAX_ERROR_CHARS:
            object.__setattr__(self, "message", self.message[:MAX_ERROR_CHARS] + "…")
        if self.field is not None and len(self.field) > MAX_FIELD_CHARS:
            object.__setattr__(self, "field", self.field[:MAX_FIELD_CHARS])


@dataclass(frozen=True)
class Recording:
    """A recording started or stopped; `url` (with the control token) downloads a stopped one."""

    type: ClassVar[str] = "recording"
    state: str
    recording_id: str
    frames: int = 0
    dropped: int = 0
    duration_s: float = 0.0
    bytes: int = 0
    truncated: bool = False
    url: str | None = None
    ref_seq: int | None = None


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"
    t: float | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Tokens:
    """Fresh control and viewer tokens of this session, valid for `ttl_s` from now."""

    type: ClassVar[str] = "tokens"
    token: str
    viewer_token: str
    ttl_s: float
    ref_seq: int | None = None


ServerMessage = Ready | Busy | Frame | Stats | Error | Recording | Pong | Tokens


def serialize(message: ServerMessage | ClientMessage) -> bytes:
    """One message → MsgPack bytes. Also used by Python clients (tests, benchmarks) for client messages."""
    body = {"type": message.type}
    for item in dataclasses.fields(message):
        value = getattr(message, item.name)
        if value is None and item.metadata.get("omit_if_none"):
            continue  # documented as absent, not null
        body[item.name] = _plain(value)
    return msgpack.packb(body, use_bin_type=True)


def _plain(value: Any) -> Any:
    if isinstance(value, Resume):
        return dataclasses.asdict(value)
    if isinstance(value, ImagePayload):
        return {key: _plain(item) for key, item in dataclasses.asdict(value).items() if item is not None}
    if isinstance(value, Patch):
        return {"x": value.x, "y": value.y, "image": _plain(value.image)}
    if isinstance(value, ImageFormat):
        return value.value
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def parse_server_message(data: bytes) -> dict[str, Any]:
    """For clients: the server's message as a plain dict (tests and benchmarks use this)."""
    return _unpack(data)


# ---------------------------------------------------------------------------------------------------
# Parsing client messages


_LIMIT = re.compile(r"(\d+) exceeds max_(map|array|str|bin)_len\((\d+)\)")
_LIMITED = {"map": "a map of {} entries", "array": "an array of {} items", "str": "a string of {} bytes", "bin": "binary data of {} bytes"}


def _msgpack_problem(error: Exception) -> str:
    """What is wrong with a message msgpack could not read, in this protocol's words rather than the
    library's (its limits are named by their keyword arguments; some of its errors have no text)."""
    if isinstance(error, msgpack.exceptions.ExtraData):
        return "more than one value (bytes follow the first)"
    if isinstance(error, msgpack.exceptions.StackError):
        return "values nested too deeply"
    if isinstance(error, msgpack.exceptions.FormatError):
        return "a byte that starts no MsgPack value"
    if isinstance(error, UnicodeDecodeError):
        return "a string that is not UTF-8"
    text = str(error)
    limit = _LIMIT.search(text)
    if limit:
        return f"{_LIMITED[limit[2]].format(limit[1])}, over the limit of {limit[3]}"
    if "max_ext_len" in text:
        return "an extension type (this protocol uses none)"
    if "strict_map_key" in text:
        return f"a map key that is not a string ({text.partition(' ')[0]})"
    if "incomplete" in text:
        return "the message ends inside a value"
    return text or type(error).__name__


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=4096,
            max_map_len=256,
            max_ext_len=0,
        )
    except (ValueError, TypeError) as error:  # msgpack's errors, UnicodeDecodeError among them, are ValueErrors
        raise MalformedMessage(f"not valid MsgPack: {_msgpack_problem(error)}") from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"a message must be a MsgPack map, got {type(body).__name__}")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise MalformedMessage("a message needs a string field 'type'")
    return body


class _Fields:
    """Reads typed fields out of one message map and complains precisely about the first bad one."""

    def __init__(self, body: dict[str, Any], where: str) -> None:
        self.body = body
        self.where = where
        self.seen = {"type"}

    def get(self, name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.body or self.body[name] is None:
            if required:
                raise InvalidField(f"{self.where}: missing field '{name}'", field=name)
            return default
        value = self.body[name]
        # bool is an int in Python; a protocol int field must not accept true/false.
        if isinstance(value, bool) and bool not in kinds:
            raise InvalidField(f"{self.where}: '{name}' must be {_names(kinds)}, got a boolean", field=name)
        if not isinstance(value, kinds):
            raise InvalidField(
                f"{self.where}: '{name}' must be {_names(kinds)}, got {type(value).__name__}", field=name
            )
        return value

    def integer(self, name: str, low: int, high: int, default: int | None = None, required: bool = False) -> Any:
        value = self.get(name, (int,), default, required)
        if value is not None and not low <= value <= high:
            raise InvalidValue(f"{self.where}: '{name}' is {value}, outside [{low}, {high}]", field=name)
        return value

    def done(self) -> None:
        # Keys are str or bin (strict_map_key); a bin key is named by its repr, never sent back as bytes.
        unknown = sorted(key if isinstance(key, str) else repr(key) for key in self.body if key not in self.seen)
        if unknown:
            raise InvalidField(f"{self.where}: unknown field {_quoted(unknown[0])}", field=unknown[0][:MAX_FIELD_CHARS])


def _names(kinds: tuple[type, ...]) -> str:
    names = {bytes: "binary", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    names.update({dict: "a map", list: "an array"})
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def _image(value: Any, where: str) -> ImagePayload:
    if not isinstance(value, dict):
        raise InvalidField(f"{where}: 'image' must be a map with format and data", field="image")
    fields = _Fields(value, f"{where}.image")
    image_format = ImageFormat.parse(fields.get("format", (str,), required=True))
    data = fields.get("data", (bytes,), required=True)
    width = fields.integer("width", 1, 1 << 20)
    height = fields.integer("height", 1, 1 << 20)
    fields.done()
    return ImagePayload(image_format, data, width, height)


def _parse_hello(fields: _Fields) -> Hello:
    offered = fields.get("protocol", (list, int), required=True)
    versions = [offered] if isinstance(offered, int) else offered
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise InvalidField("hello: 'protocol' must be an integer or a non-empty array of integers", field="protocol")
    if not versions:
        raise InvalidValue("hello: 'protocol' must list at least one version", field="protocol")
    params = fields.get("params", (dict,), default={})
    mode = fields.get("mode", (str,), default="img2img")
    if mode not in MODES:
        raise InvalidValue(f"hello: 'mode' is {mode!r}, not one of {', '.join(MODES)}", field="mode")
    return Hello(
        protocol=tuple(versions),
        # Only the type here: the session checks the size against the server's limits, in one message
        # that names the range it takes (the parser's own bounds used to give a second, looser one).
        width=fields.get("width", (int,)),
        height=fields.get("height", (int,)),
        codec=ImageFormat.parse(fields.get("codec", (str,), default="jpeg"), field="codec"),
        quality=fields.integer("quality", 1, 100, default=80),
        api_key=fields.get("api_key", (str,)),
        queue=fields.get("queue", (bool,), default=False),
        mode=mode,
        params=parse_param_changes(params, "hello.params"),
        seq=fields.integer("seq", 0, MAX_SEQ),
        model=_short(fields, "model"),
        frame_messages=fields.get("frame_messages", (bool,)),
        resume=_resume(fields),
    )


def _resume(fields: _Fields) -> Resume | None:
    value = fields.get("resume", (dict,))
    if value is None:
        return None
    inner = _Fields(value, "hello.resume")
    resume = Resume(_short(inner, "session_id", limit=64, required=True), _short(inner, "token", limit=2048, required=True))  # type: ignore[arg-type]
    inner.done()
    return resume


def _short(fields: _Fields, name: str, limit: int = 512, required: bool = False) -> str | None:
    value = fields.get(name, (str,), required=required)
    if value is not None and len(value) > limit:
        raise InvalidValue(f"{fields.where}: '{name}' is longer than {limit} characters", field=name)
    return value


def _layer(fields: _Fields) -> str:
    layer = fields.get("layer", (str,), default="image")
    if layer not in LAYERS:
        raise InvalidValue(f"{fields.where}: 'layer' is {layer!r:.40}, not one of {', '.join(LAYERS)}", field="layer")
    return layer


def parse_param_changes(changes: dict[str, Any], where: str = "params") -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        kinds = PARAM_TYPES.get(name) if isinstance(name, str) else None
        if kinds is None:
            raise InvalidField(f"{where}: unknown parameter {_quoted(name)}", field=str(name)[:MAX_FIELD_CHARS])
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise InvalidField(
                f"{where}: '{name}' must be {_names(kinds)}, got {type(value).__name__}", field=name
            )
        if isinstance(value, str) and len(value) > _MAX_STRING:
            raise InvalidValue(f"{where}: '{name}' is longer than {_MAX_STRING} characters", field=name)
        checked[name] = float(value) if float in kinds else value
    return checked


def parse_client_message(data: bytes) -> ClientMessage:
    body = _unpack(data)
    kind = body["type"]
    fields = _Fields(body, kind)
    message: ClientMessage
    if kind == Hello.type:
        message = _parse_hello(fields)
    elif kind == Canvas.type:
        message = Canvas(
            image=_image(fields.get("image", (dict,), required=True), kind),
            seq=fields.integer("seq", 0, MAX_SEQ),
            layer=_layer(fields),
        )
    elif kind == CanvasDelta.type:
        raw_patches = fields.get("patches", (list,), required=True)
        if not 1 <= len(raw_patches) <= _MAX_RECTS:
            raise InvalidValue(f"delta: 'patches' must hold 1 to {_MAX_RECTS} patches", field="patches")
        patches = []
        for index, raw in enumerate(raw_patches):
            if not isinstance(raw, dict):
                raise InvalidField(f"delta.patches[{index}] must be a map", field="patches")
            patch_fields = _Fields(raw, f"delta.patches[{index}]")
            # Any integer: a position outside the canvas is out_of_bounds, checked against the canvas.
            patch = Patch(
                x=patch_fields.get("x", (int,), required=True),
                y=patch_fields.get("y", (int,), required=True),
                image=_image(patch_fields.get("image", (dict,), required=True), f"delta.patches[{index}]"),
            )
            patch_fields.done()
            patches.append(patch)
        message = CanvasDelta(patches=tuple(patches), seq=fields.integer("seq", 0, MAX_SEQ), layer=_layer(fields))
    elif kind == Params.type:
        changes = fields.get("changes", (dict,), required=True)
        message = Params(changes=parse_param_changes(changes), seq=fields.integer("seq", 0, MAX_SEQ))
    elif kind == Record.type:
        action = fields.get("action", (str,), required=True)
        if action not in RECORD_ACTIONS:
            raise InvalidValue(f"record: 'action' is {action!r}, not one of start, stop", field="action")
        message = Record(action=action, seq=fields.integer("seq", 0, MAX_SEQ))
    elif kind == Ping.type:
        message = Ping(t=fields.get("t", (float, int)), seq=fields.integer("seq", 0, MAX_SEQ))
    elif kind == RenewTokens.type:
        message = RenewTokens(seq=fields.integer("seq", 0, MAX_SEQ))
    else:
        raise UnknownMessageType(
            f"unknown message type {kind!r}; expected one of hello, canvas, delta, params, record, ping, renew_tokens",
            field="type",
        )
    fields.done()
    return message


def message_ref(data: bytes) -> tuple[int | None, str | None]:
    """Best-effort (seq, type) of a message that failed to parse, for the error that answers it."""
    try:
        body = msgpack.unpackb(data, raw=False, max_array_len=4096, max_map_len=256)
    except (ValueError, TypeError):  # msgpack's unpack errors are ValueErrors: no reference to give
        return None, None
    if not isinstance(body, dict):
        return None, None
    seq = body.get("seq")
    kind = body.get("type")
    return (
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        kind if isinstance(kind, str) and len(kind) <= 64 else None,
    )
