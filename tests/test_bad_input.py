"""Every kind of bad input gets a typed error; the session, the server and other sessions go on.

Over both transports (the `transport` fixture): a WebSocket, and WebRTC's data channel. What only one
of them has is tested on that one: the WebSocket's own message-size close (1009) and messages before
a hello (over WebRTC the hello is in the offer)."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import msgpack
import numpy as np
import pytest
import simplejpeg
import websockets
from PIL import Image

from conftest import TEST_RESOLUTION
from helpers import Client, ServerProcess, decode_frame, make_canvas
from transport_clients import open_session, refused_hello

SIZE = TEST_RESOLUTION


def packed(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), quality=80))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A real 16×16 PNG whose IHDR claims another size (with a correct CRC, so only the size is wrong)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def png_declaring_less(size: int, declared: int) -> bytes:
    """A real size×size PNG of one colour whose IHDR says declared×declared: Pillow alone decodes the first
    rows of the data as a smaller picture and ignores the rest."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, declared, declared)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_pillow_alone_accepts_a_png_header_smaller_than_its_data() -> None:
    """Why the check exists: without it this PNG decodes, as 64x64, without complaint."""
    image = Image.open(io.BytesIO(png_declaring_less(128, 64)))
    image.load()
    assert image.size == (64, 64)


def canvas_message(image: dict[str, object], seq: int = 1, **fields: object) -> bytes:
    return packed({"type": "canvas", "seq": seq, "image": image, **fields})


BAD_MESSAGES: list[tuple[str, bytes, str]] = [
    ("not msgpack", b"\xc1\xc1\xc1", "malformed_message"),
    ("truncated msgpack", packed({"type": "ping", "seq": 1})[:-3], "malformed_message"),
    ("trailing bytes", packed({"type": "ping"}) + b"\x00", "malformed_message"),
    ("an array, not a map", packed(["ping"]), "malformed_message"),
    ("no type", packed({"seq": 3}), "malformed_message"),
    ("type is a number", packed({"type": 5}), "malformed_message"),
    ("unknown type", packed({"type": "teleport", "seq": 4}), "unknown_message_type"),
    ("unknown field", packed({"type": "ping", "seq": 5, "colour": "red"}), "invalid_field"),
    ("seq is a string", packed({"type": "ping", "seq": "six"}), "invalid_field"),
    ("image is a string", packed({"type": "canvas", "seq": 7, "image": "base64..."}), "invalid_field"),
    ("image data is text", canvas_message({"format": "png", "data": "iVBORw0KGgo="}), "invalid_field"),
    ("unknown image format", canvas_message({"format": "bmp", "data": b"BM"}), "unsupported_image_format"),
    ("strength is a string", packed({"type": "params", "seq": 8, "changes": {"strength": "high"}}), "invalid_field"),
    ("steps is a boolean", packed({"type": "params", "seq": 9, "changes": {"steps": True}}), "invalid_field"),
    ("unknown parameter", packed({"type": "params", "seq": 10, "changes": {"sharpness": 2}}), "invalid_field"),
    ("strength out of range", packed({"type": "params", "seq": 11, "changes": {"strength": 5.0}}), "invalid_value"),
    ("steps out of range", packed({"type": "params", "seq": 12, "changes": {"steps": 50}}), "invalid_value"),
    ("negative seed", packed({"type": "params", "seq": 13, "changes": {"seed": -1}}), "invalid_value"),
    ("unknown cfg type", packed({"type": "params", "seq": 14, "changes": {"cfg_type": "maximum"}}), "invalid_value"),
    ("unknown lora", packed({"type": "params", "seq": 20, "changes": {"loras": {"sepia": 1.0}}}), "unknown_name"),
    ("unknown style", packed({"type": "params", "seq": 21, "changes": {"style": "baroque"}}), "unknown_name"),
    ("controls not an array", packed({"type": "params", "seq": 22, "changes": {"controls": {"model": "x"}}}), "invalid_field"),
    ("a control that is not a map", packed({"type": "params", "seq": 23, "changes": {"controls": [7]}}), "invalid_value"),
    ("weighted prompt of the wrong shape", packed({"type": "params", "seq": 24, "changes": {"prompt": [["a", 1, 2]]}}), "invalid_value"),
    ("an unknown layer", canvas_message({"format": "png", "data": b"\x89PNG"}, layer="depth"), "invalid_value"),
    ("corrupt jpeg", canvas_message({"format": "jpeg", "data": b"\xff\xd8\xff\xe0garbage"}), "corrupt_image"),
    ("corrupt png", canvas_message({"format": "png", "data": b"\x89PNG\r\n\x1a\nnope"}), "corrupt_image"),
    ("raw of the wrong length", canvas_message({"format": "raw", "data": b"\0" * 10, "width": 4, "height": 4}), "corrupt_image"),
    ("raw without size", canvas_message({"format": "raw", "data": b"\0" * 48}), "invalid_field"),
    ("jpeg claiming 60000x60000", canvas_message({"format": "jpeg", "data": jpeg_claiming(60000, 60000)}), "image_too_large"),
    ("png claiming 100000x100000", canvas_message({"format": "png", "data": png_claiming(100000, 100000)}), "image_too_large"),
    ("raw claiming 100000x100000", canvas_message({"format": "raw", "data": b"\0" * 12, "width": 100000, "height": 100000}), "image_too_large"),
    (
        "patch outside the canvas",
        packed({"type": "delta", "seq": 15, "patches": [{"x": SIZE - 4, "y": 0, "image": {"format": "raw", "data": b"\0" * 192, "width": 8, "height": 8}}]}),
        "out_of_bounds",
    ),
    (
        "patch at a negative position",
        packed({"type": "delta", "seq": 16, "patches": [{"x": -8, "y": 0, "image": {"format": "raw", "data": b"\0" * 192, "width": 8, "height": 8}}]}),
        "out_of_bounds",
    ),
    ("delta with no patches", packed({"type": "delta", "seq": 17, "patches": []}), "invalid_value"),
    (
        "patch far outside any canvas",
        packed({"type": "delta", "seq": 19, "patches": [{"x": 2**63, "y": 0, "image": {"format": "raw", "data": b"\0" * 192, "width": 8, "height": 8}}]}),
        "out_of_bounds",
    ),
    ("seq over 2**53 - 1", packed({"type": "params", "seq": 2**53, "changes": {}}), "invalid_value"),
    ("png whose header is smaller than its data", canvas_message({"format": "png", "data": png_declaring_less(128, 64)}), "corrupt_image"),
    ("second hello", packed({"type": "hello", "protocol": [1], "seq": 18}), "not_ready"),
]


async def test_every_bad_message_gets_a_typed_error_and_the_session_goes_on(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server, params={"prompt": "a kite"}) as client:
        canvas = make_canvas(SIZE, 40)
        reference = decode_frame(await client.frame_for(await client.send_canvas(canvas)))
        for name, data, code in BAD_MESSAGES:
            await client.send_raw(data)
            error = await client.expect("error")
            assert error["code"] == code, f"{name}: {error}"
            assert error["fatal"] is False, name
            assert error["message"], name
            if code == "out_of_bounds":
                assert error["field"] == "patches", f"{name}: {error}"  # protocol.md: the field is named either way
        # The references point at the message that caused the error, where one could be read.
        await client.send_raw(packed({"type": "params", "seq": 99, "changes": {"steps": 0}}))
        error = await client.expect("error")
        assert (error["ref_seq"], error["ref_type"], error["field"]) == (99, "params", "steps")

        await client.send_raw("a text frame")
        assert (await client.expect("error"))["code"] == "malformed_message"

        # Nothing bad was applied: the same canvas still renders the same frame, and ping works.
        assert (await client.ping())["type"] == "pong"
        again = decode_frame(await client.frame_for(await client.send_canvas(canvas)))
        assert np.array_equal(reference, again)


async def test_oversize_messages(server: ServerProcess) -> None:
    limit = 8 * 1024 * 1024  # the server's default max_message_bytes
    async with Client.connect(server.ws_url) as client:
        ready = await client.hello()
        assert ready["limits"]["max_message_bytes"] == limit
        # Over the protocol limit but under the transport's: a typed error, the session lives.
        await client.send_raw(canvas_message({"format": "png", "data": b"\0" * (limit + 10)}, seq=5))
        error = await client.expect("error")
        assert error["code"] == "message_too_large" and error["fatal"] is False
        assert (await client.ping())["type"] == "pong"
    # Far over every limit: the transport closes this connection with 1009; the server goes on.
    async with Client.connect(server.ws_url) as client:
        await client.hello()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.send_raw(b"\0" * (3 * limit))
            await client.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with Client.connect(server.ws_url) as client:
        await client.hello()
        assert (await client.ping())["type"] == "pong"


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        ({"type": "hello", "protocol": [99]}, "unsupported_version"),
        ({"type": "hello", "protocol": [1], "width": 100000, "height": 64}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "width": 0, "height": 64}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "width": -64, "height": 64}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "width": "wide"}, "invalid_field"),
        ({"type": "hello", "protocol": [1], "width": 8192, "height": 8192}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "width": 100, "height": 100}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "params": {"strength": -1.0}}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "codec": "gif"}, "unsupported_image_format"),
        ({"type": "hello", "protocol": [1], "mode": "video"}, "invalid_value"),
        ({"type": "hello", "protocol": [1], "frame_messages": "yes"}, "invalid_field"),
        ({"type": "hello", "protocol": [1], "model": "sdxl-lightning"}, "unknown_name"),
    ],
)
async def test_a_bad_hello_is_refused_with_a_reason(server: ServerProcess, transport: str, hello: dict, code: str) -> None:
    """A fatal error and close 1008 on a WebSocket; over WebRTC the offer's answer is an HTTP 400 with
    the same code (no session, no peer connection)."""
    refusal = await refused_hello(transport, server, hello)
    assert refusal["code"] == code and refusal["message"], refusal
    if "codec" in hello:
        assert refusal["field"] == "codec", refusal  # the hello's field (over both transports), not an image's "format"
    assert "in hello:" not in refusal["message"], refusal  # "strength: in hello: strength: …" named the field twice
    if isinstance(hello.get("width"), int) and hello["width"] % 8 == 0:
        # One message for every size out of range, naming the range the server takes (the parser's own
        # bounds used to answer 0 and 100000 with "outside [1, 65536]"; 0 was no size at all, not the default).
        assert refusal["field"] == "width" and f"{hello['width']} is outside 64 … " in refusal["message"], refusal
    assert refusal.get("close_code", 1008) == 1008 and refusal.get("status", 400) == 400, refusal
    assert server.info()["slots_free"] == 2


async def test_messages_before_hello_are_refused_but_hello_still_works(server: ServerProcess) -> None:
    async with Client.connect(server.ws_url) as client:
        await client.send_raw(canvas_message({"format": "raw", "data": b"\0" * 48, "width": 4, "height": 4}))
        assert (await client.expect("error"))["code"] == "not_ready"
        await client.send_raw(packed({"type": "params", "changes": {"prompt": "x"}}))
        assert (await client.expect("error"))["code"] == "not_ready"
        await client.hello()


async def test_canvas_in_a_txt2img_session_is_the_wrong_mode(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server, mode="txt2img") as client:
        await client.send_canvas(make_canvas(SIZE, 1))
        while (message := await client.recv())["type"] == "frame":
            pass
        assert message["code"] == "wrong_mode"


async def test_bad_input_does_not_disturb_another_session(server: ServerProcess, transport: str) -> None:
    canvases = [make_canvas(SIZE, seed) for seed in (51, 52, 53)]

    async def well_behaved() -> list[np.ndarray]:
        async with open_session(transport, server, params={"prompt": "a bridge", "seed": 5}) as client:
            frames = []
            for canvas in canvases:
                frames.append(decode_frame(await client.frame_for(await client.send_canvas(canvas))))
                await asyncio.sleep(0.05)
            return frames

    async def abusive() -> int:
        errors = 0
        async with open_session(transport, server) as client:
            for _, data, _ in BAD_MESSAGES * 2:
                await client.send_raw(data)
            while errors < len(BAD_MESSAGES) * 2:
                if (await client.recv())["type"] == "error":
                    errors += 1
        return errors

    alone = await well_behaved()
    together, errors = await asyncio.gather(well_behaved(), abusive())
    assert errors == len(BAD_MESSAGES) * 2
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
