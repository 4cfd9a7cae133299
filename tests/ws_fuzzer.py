"""A deterministic mutator of streamcanvas client messages, for tests/test_ws_fuzz.py.

Every case starts from a valid message of one client type (built with the protocol's own dataclasses
and `serialize`, images from `helpers.encode_payload`) and breaks it one way: bytes flipped, cut or
extended; a field given a value of the wrong type or out of range; a field dropped or an unknown one
added; an unknown or confused `type`; a corrupt image, a raw image of the wrong declared size, a PNG or
JPEG whose header disagrees with its data; or a special message (text frame, empty message, nesting
deeper than any parser should follow, invalid UTF-8, non-map top level). Nothing here touches a socket.

`plan(seed, total)` gives the same list of cases for the same arguments. Each case has a `phase`:
`pre` (sent before any hello), `hello` (sent as the connection's hello) or `session` (sent after the
hello was accepted: second hellos are `session` cases of kind hello).
"""

from __future__ import annotations

import copy
import io
import math
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import simplejpeg
from PIL import Image

from helpers import encode_payload, make_canvas
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import (
    Canvas,
    CanvasDelta,
    Hello,
    ImagePayload,
    Params,
    Patch,
    Ping,
    Record,
    serialize,
)

SIZE = 128  # the test server's --resolution
PATCH = 16
KINDS = ("hello", "canvas", "delta", "params", "record", "ping")
FORMATS = ("jpeg", "webp", "png", "raw")

NAN = float("nan")
INF = float("inf")

# Values of every MsgPack type, for fields that expect another one.
WRONG_TYPE_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    -(2**63),
    2**64 - 1,
    0.5,
    -0.0,
    NAN,
    INF,
    -INF,
    1e308,
    "",
    "x" * 5000,
    "\u00e9\u4e2d\U0001f600" * 700,
    "\x00",
    "ping",
    b"",
    b"\x00" * 64,
    b"\x89PNG\r\n\x1a\n",
    [],
    [1, [2, [3, [4]]]],
    ["ping", None, 1.5],
    {},
    {"a": {"b": {"c": {"d": 1}}}},
    {"type": "ping", "seq": 1},
    {"format": "png"},
    msgpack.ExtType(5, b"ext"),
    msgpack.Timestamp(1_700_000_000, 5),
]

# Interesting values for fields the protocol gives a range (valid ones included, on purpose).
RANGE_VALUES: dict[str, list[Any]] = {
    "width": [0, 1, 8, 63, 64, 128, 130, 256, 1032, 1 << 16, (1 << 16) + 1, 1 << 20, -8, 2**63],
    "height": [0, 1, 8, 63, 64, 128, 130, 256, 1032, 1 << 16, (1 << 16) + 1, 1 << 20, -8, 2**63],
    "quality": [0, 1, 100, 101, -1, 2**63],
    "seq": [-1, 0, 2**53 - 1, 2**53, 2**63, 2**64 - 1, -(2**63)],
    "x": [-1, 0, SIZE - PATCH, SIZE - PATCH + 1, SIZE, 1 << 20, (1 << 20) + 1, 2**63, -(2**63)],
    "y": [-1, 0, SIZE - PATCH, SIZE - PATCH + 1, SIZE, 1 << 20, (1 << 20) + 1, 2**63, -(2**63)],
    "protocol": [[], [99], [1, 99], [99, 1], 0, 1, 99, -1, ["1"], [True], [1.0], 2**63, [2**64 - 1], [None]],
    "t": [NAN, INF, -INF, 0, -1, 2**63, 2**64 - 1, 1e308],
    "action": ["start", "stop", "pause", "", "START", "stop\x00"],
    "mode": ["img2img", "txt2img", "video", "", "IMG2IMG"],
    "codec": ["jpeg", "webp", "png", "raw", "gif", "JPEG", "", "jpeg "],
    "format": ["jpeg", "webp", "png", "raw", "bmp", "PNG", "", "gif"],
    "queue": [True, False],
    "api_key": ["", "secret", "k" * 300],
    "prompt": ["", "a cat", "p" * 2000, "p" * 2001, "p" * 4096, "p" * 4097],
    "negative_prompt": ["", "blurry", "n" * 2001, "n" * 4097],
    "strength": [-1, 0, 0.01, 0.02, 1, 1.0, 1.01, NAN, INF, -INF],
    "steps": [0, 1, 4, 5, -1, 2**63, 1.5],
    "seed": [-1, 0, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -(2**63)],
    "guidance_scale": [-0.1, 0, 20, 20.5, NAN, -INF],
    "delta": [-1, 0, 5, 5.1, NAN, INF],
    "cfg_type": ["none", "full", "self", "initialize", "maximum", ""],
    "denoising_batch": [True, False],
    "similar_filter": [True, False],
    "similar_threshold": [-0.1, 0, 1, 1.5, NAN],
}

UNKNOWN_TYPES: list[Any] = [
    "teleport", "", "HELLO", "Ping", "pong", "frame", "stats", "error", "ready", "busy", "recording",
    "ping ", "t" * 1000, 5, None, True, 1.5, b"ping", ["ping"], {"type": "ping"},
]
UNKNOWN_KEYS: list[Any] = ["colour", "", "type2", "seq ", "x-extra", "\u00e9", "k" * 300, b"binkey", b"type"]
PARAM_NAMES = tuple(key for key in RANGE_VALUES if key in {
    "prompt", "negative_prompt", "strength", "steps", "seed", "guidance_scale", "delta", "cfg_type",
    "denoising_batch", "similar_filter", "similar_threshold",
})
PARAM_VALID: dict[str, list[Any]] = {
    "prompt": ["a red house", "a kite over the sea", ""],
    "negative_prompt": ["blurry", ""],
    "strength": [0.3, 0.5, 0.8],
    "steps": [1, 2, 3],
    "seed": [1, 2, 99],
    "guidance_scale": [1.0, 1.2, 2.0],
    "delta": [0.5, 1.0],
    "cfg_type": ["self", "none", "initialize"],
    "denoising_batch": [True],
    "similar_filter": [False],
    "similar_threshold": [0.9, 0.98],
}

INTERESTING_BYTES = [0x00, 0xFF, 0xC1, 0xC0, 0x7F, 0x80, 0x90, 0xDC, 0xDD, 0xDE, 0xDF, 0xDB, 0xC6, 0xD4, 0xC7]


@dataclass(frozen=True)
class FuzzCase:
    phase: str
    """pre | hello | session: the connection state the case is sent in."""
    kind: str
    """The client message type it was derived from (or `special`)."""
    label: str
    """What was done to it, for reports."""
    data: bytes | str
    """What goes on the wire: bytes are a binary WebSocket message, str a text message."""


# ---------------------------------------------------------------------------------------------------
# Images


def _png_bytes(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def interlaced_png(rgb: np.ndarray) -> bytes:
    """A valid Adam7-interlaced RGB PNG (Pillow cannot write one), with a text chunk and its pixel
    data split over two IDAT chunks."""
    height, width = rgb.shape[:2]
    raw = bytearray()
    for x0, y0, dx, dy in _ADAM7:
        sub = rgb[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            for row in sub:
                raw += b"\x00" + row.tobytes()
    idat = zlib.compress(bytes(raw))
    half = len(idat) // 2
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1))
        + _chunk(b"tEXt", b"Comment\x00fuzz")
        + _chunk(b"IDAT", idat[:half])
        + _chunk(b"IDAT", idat[half:])
        + _chunk(b"IEND", b"")
    )


def png_claiming(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size, with a correct CRC (so only the size is wrong)."""
    data = bytearray(png)
    struct.pack_into(">II", data, 16, width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height & 0xFFFF, width & 0xFFFF)
    return bytes(data)


class ImagePool:
    def __init__(self) -> None:
        canvases = [make_canvas(SIZE, seed) for seed in (11, 12)]
        self.canvas: list[ImagePayload] = [
            encode_payload(rgb, image_format) for rgb in canvases for image_format in ImageFormat
        ]
        patches = [make_canvas(PATCH, seed) for seed in (21, 22)]
        self.patch: list[ImagePayload] = [
            encode_payload(rgb, image_format) for rgb in patches for image_format in ImageFormat
        ]
        self.patch.append(encode_payload(make_canvas(8, 23), ImageFormat.RAW))
        self.png = encode_payload(canvases[0], ImageFormat.PNG).data
        self.jpeg = encode_payload(canvases[0], ImageFormat.JPEG).data
        self.small_png = encode_payload(patches[0], ImageFormat.PNG).data
        self.small_jpeg = encode_payload(patches[0], ImageFormat.JPEG).data
        self.exotic = self._exotic(canvases[1])

    @staticmethod
    def _exotic(rgb: np.ndarray) -> list[dict[str, Any]]:
        """Valid images of unusual kinds: other colour modes, bit depths, alpha, 1x1, progressive."""
        image = Image.fromarray(rgb)
        gray16 = Image.fromarray(np.ascontiguousarray(rgb[..., 0].astype(np.uint16) * 257))
        cmyk = io.BytesIO()
        image.convert("CMYK").save(cmyk, format="JPEG", quality=80)
        progressive = io.BytesIO()
        image.save(progressive, format="JPEG", quality=80, progressive=True)
        webp_alpha = io.BytesIO()
        image.convert("RGBA").save(webp_alpha, format="WEBP", quality=80)
        gray_jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb[..., :1]), quality=80, colorspace="GRAY")
        return [
            {"format": "png", "data": _png_bytes(image.convert("L"))},
            {"format": "png", "data": _png_bytes(image.convert("RGBA"))},
            {"format": "png", "data": _png_bytes(image.convert("P"))},
            {"format": "png", "data": _png_bytes(image.convert("1"))},
            {"format": "png", "data": _png_bytes(gray16)},
            {"format": "png", "data": _png_bytes(Image.new("RGB", (1, 1), (9, 9, 9)))},
            {"format": "png", "data": interlaced_png(rgb)},
            {"format": "png", "data": interlaced_png(np.ascontiguousarray(rgb[:9, :13]))},
            {"format": "jpeg", "data": cmyk.getvalue()},
            {"format": "jpeg", "data": progressive.getvalue()},
            {"format": "jpeg", "data": gray_jpeg},
            {"format": "webp", "data": webp_alpha.getvalue()},
            {"format": "raw", "data": b"\x80" * 3, "width": 1, "height": 1},
        ]


# ---------------------------------------------------------------------------------------------------
# Valid messages of every client type


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.images = ImagePool()
        self.seq = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def valid_hello(self, seq: int | None = None) -> Hello:
        """The hello of every fuzz connection: queue=True, so a slot still being freed is waited for."""
        return Hello(
            protocol=(1,), width=SIZE, height=SIZE, codec=ImageFormat.JPEG, quality=80, queue=True,
            params={"prompt": "fuzz", "seed": 3}, seq=seq,
        )

    def base(self, kind: str) -> dict[str, Any]:
        """A valid message of `kind` as the plain map that goes on the wire."""
        rng = self.rng
        seq = self._next_seq()
        message: Any
        if kind == "hello":
            message = self.valid_hello(seq)
        elif kind == "canvas":
            message = Canvas(image=rng.choice(self.images.canvas), seq=seq)
        elif kind == "delta":
            patches = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                payload = rng.choice(self.images.patch)
                width = payload.width or PATCH
                height = payload.height or PATCH
                patches.append(Patch(rng.randrange(0, SIZE - width + 1), rng.randrange(0, SIZE - height + 1), payload))
            message = CanvasDelta(patches=tuple(patches), seq=seq)
        elif kind == "params":
            names = rng.sample(sorted(PARAM_VALID), rng.choice((1, 1, 2, 3)))
            message = Params(changes={name: rng.choice(PARAM_VALID[name]) for name in names}, seq=seq)
        elif kind == "record":
            message = Record(action=rng.choice(("start", "stop")), seq=seq)
        elif kind == "ping":
            message = Ping(t=rng.choice((0.0, 1732250000.5, 12)), seq=seq)
        else:
            raise ValueError(kind)
        return msgpack.unpackb(serialize(message), raw=False)

    # -----------------------------------------------------------------------------------------------
    # Structured mutations (on the map, then packed)

    def _paths(self, node: Any, prefix: tuple = ()) -> list[tuple]:
        paths = []
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append(prefix + (key,))
                paths.extend(self._paths(value, prefix + (key,)))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                paths.append(prefix + (index,))
                paths.extend(self._paths(value, prefix + (index,)))
        return paths

    @staticmethod
    def _parent(body: Any, path: tuple) -> Any:
        node = body
        for key in path[:-1]:
            node = node[key]
        return node

    def _dict_nodes(self, body: dict[str, Any]) -> list[tuple]:
        nodes = [()]
        for path in self._paths(body):
            if isinstance(self._parent(body, path + ("_",)), dict):
                nodes.append(path)
        return nodes

    def _wrong_type(self, body: dict[str, Any]) -> str:
        path = self.rng.choice(self._paths(body))
        value = copy.deepcopy(self.rng.choice(WRONG_TYPE_VALUES))
        self._parent(body, path)[path[-1]] = value
        return f"wrong type {_short(path)}={_short_value(value)}"

    def _out_of_range(self, body: dict[str, Any]) -> str:
        paths = [path for path in self._paths(body) if path[-1] in RANGE_VALUES]
        if not paths:
            return self._wrong_type(body)
        path = self.rng.choice(paths)
        value = copy.deepcopy(self.rng.choice(RANGE_VALUES[path[-1]]))
        self._parent(body, path)[path[-1]] = value
        return f"value {_short(path)}={_short_value(value)}"

    def _add_params(self, body: dict[str, Any]) -> str:
        """A parameter set to an out-of-range or wrong-typed value (params and hello.params)."""
        changes = body.get("changes") if body.get("type") == "params" else body.get("params")
        if not isinstance(changes, dict):
            return self._out_of_range(body)
        name = self.rng.choice(PARAM_NAMES)
        value = copy.deepcopy(self.rng.choice(RANGE_VALUES[name] + WRONG_TYPE_VALUES[:8]))
        changes[name] = value
        return f"param {name}={_short_value(value)}"

    def _delete(self, body: dict[str, Any]) -> str:
        candidates = [path for path in self._paths(body) if isinstance(self._parent(body, path), dict)]
        path = self.rng.choice(candidates)
        del self._parent(body, path)[path[-1]]
        return f"missing {_short(path)}"

    def _unknown_field(self, body: dict[str, Any]) -> str:
        node_path = self.rng.choice(self._dict_nodes(body))
        node = body
        for key in node_path:
            node = node[key]
        keys = self.rng.sample(UNKNOWN_KEYS, self.rng.choice((1, 1, 2)))
        for key in keys:
            node[key] = copy.deepcopy(self.rng.choice(WRONG_TYPE_VALUES[:10]))
        return f"unknown {'/'.join(map(_short_value, keys))} in {_short(node_path) or 'top'}"

    def _unknown_type(self, body: dict[str, Any]) -> str:
        body["type"] = copy.deepcopy(self.rng.choice(UNKNOWN_TYPES))
        return f"type={_short_value(body['type'])}"

    def _swap_type(self, body: dict[str, Any]) -> str:
        body["type"] = self.rng.choice([kind for kind in KINDS if kind != body.get("type")])
        return f"type swapped to {body['type']}"

    def _image(self, body: dict[str, Any]) -> str:
        """A mutation of one image map of a canvas or delta."""
        rng = self.rng
        paths = [path for path in self._paths(body) if path[-1] == "image" and isinstance(self._parent(body, path)[path[-1]], dict)]
        if not paths:
            return self._out_of_range(body)
        path = rng.choice(paths)
        image: dict[str, Any] = self._parent(body, path)[path[-1]]
        whole = path == ("image",)
        data = image.get("data")
        data = data if isinstance(data, bytes) else b""
        how = rng.choice(("corrupt", "corrupt", "truncate", "extend", "format", "raw_size", "raw_size",
                          "png_header", "png_header", "jpeg_header", "jpeg_header", "garbage", "exotic"))
        if how == "corrupt" and data:
            buffer = bytearray(data)
            for _ in range(rng.randint(1, 16)):
                index = rng.randrange(min(len(buffer), 64)) if rng.random() < 0.5 else rng.randrange(len(buffer))
                buffer[index] ^= rng.randint(1, 255)
            image["data"] = bytes(buffer)
            return f"image {image.get('format')} corrupt bytes"
        if how == "truncate" and data:
            image["data"] = data[: rng.randrange(len(data))]
            return f"image {image.get('format')} truncated to {len(image['data'])} of {len(data)}"
        if how == "extend":
            image["data"] = data + rng.randbytes(rng.randint(1, 300))
            return f"image {image.get('format')} with trailing garbage"
        if how == "format":
            image["format"] = rng.choice([name for name in FORMATS if name != image.get("format")])
            return f"image declared {image['format']} holds other data"
        if how == "raw_size":
            width, height = rng.choice([
                (SIZE + 1, SIZE), (SIZE, SIZE - 1), (SIZE // 2, SIZE * 2), (0, SIZE), (SIZE, 0), (1, 1),
                (PATCH, PATCH), (8, 8), (4096, 4096), (4096, 4097), (1 << 20, 1 << 20), (1 << 20, 1), (None, SIZE),
            ])
            image["format"] = "raw"
            if width is None:
                image.pop("width", None)
            else:
                image["width"] = width
            image["height"] = height
            return f"raw image of {len(data)} bytes declared {width}x{height}"
        if how == "png_header":
            width, height = rng.choice([
                (1, 1), (0, 0), (PATCH, PATCH), (SIZE - 1, SIZE), (SIZE + 1, SIZE), (SIZE * 2, SIZE * 2),
                (4096, 4096), (4097, 1), (60000, 60000), (2**31 - 1, 1), (2**32 - 1, 2**32 - 1),
            ])
            source = self.images.png if whole else self.images.small_png
            image.clear()
            image.update(format="png", data=png_claiming(source, width, height))
            return f"png of {SIZE if whole else PATCH}px claiming {width}x{height}"
        if how == "jpeg_header":
            width, height = rng.choice([(1, 1), (0, 0), (PATCH, PATCH), (SIZE + 1, SIZE), (4096, 4096), (60000, 60000)])
            source = self.images.jpeg if whole else self.images.small_jpeg
            image.clear()
            image.update(format="jpeg", data=jpeg_claiming(source, width, height))
            return f"jpeg of {SIZE if whole else PATCH}px claiming {width}x{height}"
        if how == "garbage":
            magic = rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 "])
            image["data"] = magic + rng.randbytes(rng.randint(0, 200))
            return f"image {image.get('format')} of garbage after {magic[:4]!r}"
        replacement = copy.deepcopy(rng.choice(self.images.exotic))
        image.clear()
        image.update(replacement)
        return f"exotic {replacement['format']} image ({len(replacement['data'])} bytes)"

    def _top_level(self, body: dict[str, Any]) -> Any:
        return self.rng.choice([[body], body.get("type"), 42, None, [], b"\x00", msgpack.ExtType(1, b"x")])

    def structured(self, kind: str) -> tuple[str, bytes]:
        body = self.base(kind)
        operations = [
            (self._wrong_type, 5), (self._out_of_range, 6), (self._add_params, 2), (self._delete, 3),
            (self._unknown_field, 3), (self._unknown_type, 2), (self._swap_type, 1),
        ]
        if kind in ("canvas", "delta"):
            operations.append((self._image, 8))
        functions, weights = zip(*operations)
        labels = []
        for _ in range(self.rng.choice((1, 1, 1, 2))):
            if not isinstance(body, dict) or not body:
                break
            labels.append(self.rng.choices(functions, weights)[0](body))
        if self.rng.random() < 0.03:
            body = self._top_level(body)
            labels.append("not a map at the top")
        return "; ".join(labels), msgpack.packb(body, use_bin_type=True)

    # -----------------------------------------------------------------------------------------------
    # Byte-level mutations (on the packed message)

    def bytewise(self, kind: str) -> tuple[str, bytes]:
        rng = self.rng
        data = msgpack.packb(self.base(kind), use_bin_type=True)
        how = rng.choice(("flip", "flip", "flip", "truncate", "extend", "insert", "twice"))
        buffer = bytearray(data)
        if how == "flip":
            count = rng.randint(1, 6)
            for _ in range(count):
                index = rng.randrange(min(len(buffer), 80)) if rng.random() < 0.7 else rng.randrange(len(buffer))
                buffer[index] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.3 else buffer[index] ^ rng.randint(1, 255)
            return f"{count} bytes flipped", bytes(buffer)
        if how == "truncate":
            cut = rng.randrange(len(buffer))
            return f"truncated to {cut} of {len(buffer)} bytes", bytes(buffer[:cut])
        if how == "extend":
            return "trailing bytes", bytes(buffer) + rng.randbytes(rng.randint(1, 32))
        if how == "insert":
            index = rng.randrange(len(buffer))
            return f"bytes inserted at {index}", bytes(buffer[:index]) + rng.randbytes(rng.randint(1, 8)) + bytes(buffer[index:])
        return "the message twice in one", bytes(buffer) * 2

    # -----------------------------------------------------------------------------------------------
    # Special messages

    def special(self) -> tuple[str, bytes | str]:
        rng = self.rng
        choices: list[tuple[str, bytes | str]] = [
            ("text frame", "a text frame"),
            ("empty text frame", ""),
            ("JSON text frame", '{"type": "ping", "seq": 1}'),
            ("text frame of msgpack-looking text", "\x81\xa4type\xa4ping"),
            ("empty binary message", b""),
            ("nil", msgpack.packb(None)),
            ("bare string", msgpack.packb("ping")),
            ("bare int", msgpack.packb(2**64 - 1)),
            ("array of a ping", msgpack.packb([{"type": "ping", "seq": 1}])),
            ("empty map", msgpack.packb({})),
            ("ext at the top", msgpack.packb(msgpack.ExtType(3, b"abc"))),
            ("arrays nested 100 deep", b"\x91" * 100 + b"\xc0"),
            ("arrays nested 1100 deep", b"\x91" * 1100 + b"\xc0"),
            ("arrays nested 5000 deep", b"\x91" * 5000 + b"\xc0"),
            ("maps nested 2000 deep", b"\x81\xa1a" * 2000 + b"\xc0"),
            ("type with invalid UTF-8", b"\x81\xa4type\xa2\xff\xfe"),
            ("string field with invalid UTF-8", b"\x82\xa4type\xa6params\xa7changes\x81\xa6prompt\xa3\xed\xa0\x80"),
            ("int map key", msgpack.packb({"type": "ping", 1: 2}, strict_types=False)),
            ("map key is a map", b"\x82\xa4type\xa4ping\x81\xa1a\x01\x02"),
            ("float map key", b"\x82\xa4type\xa4ping\xcb" + struct.pack(">d", math.pi) + b"\x01"),
            ("str32 claiming 4 GiB", b"\x81\xa4type\xdb\xff\xff\xff\xff"),
            ("bin32 claiming 4 GiB", b"\x82\xa4type\xa4ping\xa1t\xc6\xff\xff\xff\xff\x00"),
            ("array32 of 2^32-1 items", b"\xdd\xff\xff\xff\xff"),
            ("map16 of 65535 entries", b"\xde\xff\xff"),
            ("array of 5000 nils", b"\xdd\x00\x00\x13\x88" + b"\xc0" * 5000),
            ("map of 300 entries", msgpack.packb({"type": "ping", **{f"k{i}": i for i in range(299)}})),
            ("reserved byte 0xc1", b"\xc1"),
            ("timestamp ext with a bad length", b"\x82\xa4type\xa4ping\xa1t\xc7\x03\xff\x00\x00\x00"),
            ("ping with a timestamp t", msgpack.packb({"type": "ping", "seq": 2, "t": msgpack.Timestamp(1, 2)})),
            ("str and bin keys of the same name", b"\x83\xa4type\xa4ping\xa3seq\x01\xc4\x03seq\x02"),
            ("duplicate keys", b"\x82\xa4type\xa4ping\xa4type\xa6canvas"),
            ("unknown str and bin fields", msgpack.packb({"type": "ping", "zzz": 1, b"aaa": 2}, use_bin_type=True)),
            ("second message kind in one", msgpack.packb({"type": "ping"}) + msgpack.packb({"type": "ping"})),
            ("random bytes", rng.randbytes(rng.randint(1, 64))),
            ("delta with 257 patches", msgpack.packb({"type": "delta", "seq": 3, "patches": [
                {"x": 0, "y": 0, "image": {"format": "raw", "data": b"\x00\x00\x00", "width": 1, "height": 1}}
            ] * 257}, use_bin_type=True)),
            ("delta with no patches", msgpack.packb({"type": "delta", "seq": 4, "patches": []})),
            ("delta whose patch is not a map", msgpack.packb({"type": "delta", "seq": 5, "patches": [[0, 0]]})),
            ("params with no changes", msgpack.packb({"type": "params", "seq": 6, "changes": {}})),
            ("params with a bin parameter name", msgpack.packb({"type": "params", "seq": 7, "changes": {b"prompt": "x"}}, use_bin_type=True)),
        ]
        return rng.choice(choices)

    # -----------------------------------------------------------------------------------------------

    def case(self, phase: str) -> FuzzCase:
        rng = self.rng
        if phase == "hello":
            kind = "hello"
        elif phase == "pre":
            kind = rng.choice(("canvas", "delta", "params", "record", "ping", "ping"))
        else:
            kind = rng.choices(KINDS, (2, 5, 5, 4, 1, 2))[0]
        roll = rng.random()
        if phase != "hello" and roll < 0.08:
            label, data = self.special()
            return FuzzCase(phase, "special", label, data)
        if roll < 0.12:
            # Unmodified: the session must take valid messages between the broken ones.
            return FuzzCase(phase, kind, "valid", msgpack.packb(self.base(kind), use_bin_type=True))
        if roll < 0.36:
            label, data = self.bytewise(kind)
        else:
            label, data = self.structured(kind)
        return FuzzCase(phase, kind, label, data)


def plan(seed: int, total: int) -> list[FuzzCase]:
    """`total` cases in connection-shaped runs: a few before hello, a hello (mutated three times in
    four), then a stretch of session messages; the same list for the same arguments."""
    fuzzer = Fuzzer(seed)
    rng = random.Random(seed + 1)
    cases: list[FuzzCase] = []
    while len(cases) < total:
        for _ in range(rng.choice((0, 0, 1, 2))):
            cases.append(fuzzer.case("pre"))
        if rng.random() < 0.75:
            cases.append(fuzzer.case("hello"))
        for _ in range(rng.randint(3, 20)):
            cases.append(fuzzer.case("session"))
    return cases[:total]


def _short(path: tuple) -> str:
    return ".".join(str(part) if not isinstance(part, bytes) else repr(part) for part in path)


def _short_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}…({len(text)} chars)"
