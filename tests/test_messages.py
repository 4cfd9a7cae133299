"""The v1 wire messages: parse/serialize pairs and precise, typed errors, with no socket involved."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from streamcanvas.codecs.errors import InvalidField, InvalidValue, MalformedMessage, UnknownMessageType, UnsupportedImageFormat
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import (
    Canvas,
    CanvasDelta,
    Error,
    Frame,
    Hello,
    ImagePayload,
    Params,
    Patch,
    Ping,
    message_ref,
    parse_client_message,
    parse_server_message,
    serialize,
)


@pytest.mark.parametrize(
    "message",
    [
        Hello(protocol=(1,), width=256, height=256, codec=ImageFormat.WEBP, quality=60, api_key="k", queue=True, params={"prompt": "x", "strength": 0.4}, seq=1),
        Hello(protocol=(1,), mode="txt2img"),
        Canvas(image=ImagePayload(ImageFormat.JPEG, b"\xff\xd8data"), seq=2),
        Canvas(image=ImagePayload(ImageFormat.RAW, b"\0" * 12, 2, 2)),
        CanvasDelta(patches=(Patch(1, 2, ImagePayload(ImageFormat.PNG, b"png")), Patch(0, 0, ImagePayload(ImageFormat.RAW, b"\1" * 3, 1, 1))), seq=3),
        Params(changes={"prompt": "a cat", "steps": 3, "guidance_scale": 1.5, "similar_filter": True}, seq=4),
        Ping(t=12.5, seq=5),
    ],
)
def test_client_messages_round_trip(message: object) -> None:
    assert parse_client_message(serialize(message)) == message


def test_images_travel_as_msgpack_binary() -> None:
    data = serialize(Canvas(image=ImagePayload(ImageFormat.PNG, b"\x89PNG"), seq=1))
    assert b"\xc4\x04\x89PNG" in data  # bin 8 with a 4-byte payload, not a base64 string
    frame = serialize(Frame(seq=1, input_seq=1, width=8, height=8, codec="jpeg", image=b"\xff\xd8", timings={}))
    assert parse_server_message(frame)["image"] == b"\xff\xd8"


def test_integers_given_for_floats_become_floats() -> None:
    message = parse_client_message(msgpack.packb({"type": "params", "changes": {"strength": 1}}))
    assert message == Params(changes={"strength": 1.0})
    assert isinstance(message.changes["strength"], float)


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        ({"type": "ping", "seq": True}, InvalidField, "seq"),
        ({"type": "ping", "seq": -1}, InvalidValue, "seq"),
        ({"type": "ping", "seq": 2**53}, InvalidValue, "seq"),
        ({"type": "ping", "extra": 1}, InvalidField, "extra"),
        ({"type": "hello"}, InvalidField, "protocol"),
        ({"type": "hello", "protocol": []}, InvalidValue, "protocol"),
        ({"type": "hello", "protocol": ["1"]}, InvalidField, "protocol"),
        ({"type": "hello", "protocol": 1, "quality": 101}, InvalidValue, "quality"),
        ({"type": "hello", "protocol": 1, "width": 64.0}, InvalidField, "width"),  # its range is the session's to check
        ({"type": "hello", "protocol": 1, "mode": "video"}, InvalidValue, "mode"),
        ({"type": "record", "action": "pause"}, InvalidValue, "action"),
        ({"type": "hello", "protocol": 1, "codec": "tiff"}, UnsupportedImageFormat, "codec"),
        ({"type": "params", "changes": {"prompt": 5}}, InvalidField, "prompt"),
        ({"type": "params", "changes": {"seed": 1.5}}, InvalidField, "seed"),
        ({"type": "params", "changes": {"denoising_batch": 1}}, InvalidField, "denoising_batch"),
        ({"type": "params", "changes": {"prompt": "x" * 5000}}, InvalidValue, "prompt"),
        ({"type": "delta", "patches": [{"x": 0, "image": {"format": "png", "data": b""}}]}, InvalidField, "y"),
        ({"type": "delta", "patches": [[0, 0]]}, InvalidField, "patches"),
        ({"type": "canvas", "image": {"format": "png"}}, InvalidField, "data"),
        ({"type": "delta", "patches": []}, InvalidValue, "patches"),
    ],
)
def test_field_errors_name_the_field(body: dict, error: type[Exception], field: str) -> None:
    with pytest.raises(error) as raised:
        parse_client_message(msgpack.packb(body, use_bin_type=True))
    assert raised.value.field == field
    assert field in str(raised.value) or error is UnsupportedImageFormat


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"seq": 1}), msgpack.packb({1: "ping"}), msgpack.packb({"type": None}), msgpack.packb("ping"), b"\xdd\xff\xff\xff\xff"],
)
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_client_message(data)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xc1\xc1\xc1", "a byte that starts no MsgPack value"),
        (b"\x91" * 100_000 + b"\x00", "values nested too deeply"),
        (msgpack.packb({str(i): i for i in range(300)}), "a map of 300 entries, over the limit of 256"),
        (msgpack.packb(list(range(5000))), "an array of 5000 items, over the limit of 4096"),
        (msgpack.packb(msgpack.ExtType(3, b"abc")), "an extension type (this protocol uses none)"),
        (msgpack.packb({1: "ping"}), "a map key that is not a string (int)"),
        (b"\x81\xa4type", "the message ends inside a value"),
        (msgpack.packb({"type": "ping"}) + b"\x00", "more than one value (bytes follow the first)"),
        (b"\x81\xa4type\xa2\xff\xfe", "a string that is not UTF-8"),
    ],
)
def test_unreadable_msgpack_is_told_in_the_protocols_words(data: bytes, problem: str) -> None:
    """Not the library's ("300 exceeds max_map_len(256)", or an empty text after the colon)."""
    with pytest.raises(MalformedMessage) as raised:
        parse_client_message(data)
    assert str(raised.value) == f"not valid MsgPack: {problem}"


def test_unknown_type() -> None:
    with pytest.raises(UnknownMessageType, match="'dance'"):
        parse_client_message(msgpack.packb({"type": "dance"}))


def test_message_ref_reads_what_it_can() -> None:
    assert message_ref(msgpack.packb({"type": "params", "seq": 9, "changes": 5})) == (9, "params")
    assert message_ref(b"\xc1") == (None, None)
    assert message_ref(msgpack.packb([1])) == (None, None)


def test_server_messages_serialize_every_field() -> None:
    body = parse_server_message(serialize(Error(code="corrupt_image", message="bad", ref_seq=3, ref_type="canvas")))
    assert body == {"type": "error", "code": "corrupt_image", "message": "bad", "ref_seq": 3, "ref_type": "canvas", "field": None, "fatal": False}


def test_the_wire_parameters_are_the_stream_parameters() -> None:
    """One table per fact: every StreamParams field is a wire parameter and back, and WHIP's query
    parameters are among them with the same types."""
    import dataclasses

    from streamcanvas.codecs.messages import PARAM_TYPES
    from streamcanvas.pipelines.stream import StreamParams
    from streamcanvas.realtime_server.webrtc import _WHIP_PARAMS

    assert set(PARAM_TYPES) == {field.name for field in dataclasses.fields(StreamParams)}
    for name, kind in _WHIP_PARAMS.items():
        assert kind in PARAM_TYPES[name], name


def test_the_parser_caps_strings_where_the_stream_caps_prompts() -> None:
    """A long prompt is refused with one limit whichever layer sees it first."""
    from streamcanvas.codecs import messages
    from streamcanvas.pipelines.stream import MAX_PROMPT_CHARS

    assert messages._MAX_STRING == MAX_PROMPT_CHARS


def test_the_page_and_the_batch_jobs_take_the_streams_seed_range() -> None:
    """The seed's upper bound is the stream's (pipelines.stream.MAX_SEED) in the batch jobs' schema and in
    the page, which clamps what a person types to it."""
    import re

    from streamcanvas.batch_fallback import kinds
    from streamcanvas.pipelines.stream import MAX_SEED

    assert kinds.MAX_SEED == MAX_SEED
    page = (Path(__file__).parent.parent / "web_static" / "app.js").read_text()
    declared = re.search(r"^const MAX_SEED = (\d+);$", page, re.MULTILINE)
    assert declared is not None and int(declared.group(1)) == MAX_SEED
