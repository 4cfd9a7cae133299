"""Image codecs for live frames: JPEG (libjpeg-turbo via simplejpeg), WebP and PNG (Pillow), raw RGB.

All images are H×W×3 uint8 RGB numpy arrays in memory. Decoding always reads the header first and
checks the format and dimensions against `ImageLimits` before the pixel buffer is allocated, so a
40-byte file that claims to be 60000×60000 costs nothing.
"""

from __future__ import annotations

import enum
import io
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from .errors import CorruptImage, ImageTooLarge, InvalidField, UnsupportedImageFormat


class ImageFormat(enum.StrEnum):
    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"
    RAW = "raw"

    @classmethod
    def parse(cls, name: object, field: str = "format") -> ImageFormat:
        """`name` as a format; an unknown one is refused naming `field` (`format`, or hello's `codec`)."""
        try:
            return cls(name)
        except ValueError:
            raise UnsupportedImageFormat(
                f"image format {name!r:.40} is not one of {', '.join(f.value for f in cls)}", field=field
            ) from None


@dataclass(frozen=True)
class ImageLimits:
    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 4096

    def check(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise CorruptImage(f"image dimensions {width}x{height} are not positive")
        if width > self.max_width or height > self.max_height or width * height > self.max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height}; the limit is {self.max_width}x{self.max_height} "
                f"and {self.max_pixels} pixels"
            )


class Encoder(Protocol):
    format: ImageFormat

    def encode(self, rgb: np.ndarray, quality: int) -> bytes: ...


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 array, got shape {rgb.shape} and dtype {rgb.dtype}")
    return np.ascontiguousarray(rgb)


class JpegEncoder:
    format = ImageFormat.JPEG

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        return simplejpeg.encode_jpeg(_check_rgb(rgb), quality=quality, colorspace="RGB", colorsubsampling="420")


class WebpEncoder:
    format = ImageFormat.WEBP

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        buffer = io.BytesIO()
        # method=0 is libwebp's fastest: ~4x quicker than the default at a few % more bytes.
        Image.fromarray(_check_rgb(rgb)).save(buffer, format="WEBP", quality=quality, method=0)
        return buffer.getvalue()


class PngEncoder:
    format = ImageFormat.PNG

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        buffer = io.BytesIO()
        # PNG is lossless: quality only trades compression effort (100 → smallest, slowest).
        level = max(0, min(9, round(quality / 100 * 9)))
        Image.fromarray(_check_rgb(rgb)).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()


class RawEncoder:
    format = ImageFormat.RAW

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        return _check_rgb(rgb).tobytes()


_ENCODERS: dict[ImageFormat, Encoder] = {
    encoder.format: encoder for encoder in (JpegEncoder(), WebpEncoder(), PngEncoder(), RawEncoder())
}


def get_encoder(name: str | ImageFormat) -> Encoder:
    return _ENCODERS[ImageFormat.parse(name)]


def sniff_format(data: bytes) -> ImageFormat | None:
    """The container format from the file's magic bytes (PNG, JPEG, WebP), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


def read_dimensions(
    image_format: ImageFormat, data: bytes, *, width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """(width, height) from the header alone. Raw images have no header: they need both declared
    (their length is checked by `decode`, after the limits)."""
    if image_format is ImageFormat.RAW:
        if width is None or height is None:
            raise InvalidField("raw images need width and height", field="width")
        return width, height
    actual = sniff_format(data)
    if actual is not None and actual is not image_format:
        raise CorruptImage(f"not a readable {image_format.value.upper()}: the bytes are a {actual.value.upper()} (say so in `format`)")
    if image_format is ImageFormat.JPEG:
        if actual is None:
            raise CorruptImage("not a readable JPEG: no JPEG header")
        try:
            header_height, header_width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            raise CorruptImage(f"not a readable JPEG: {_turbojpeg_text(error)}") from None
        return header_width, header_height
    with _open_pillow(image_format, data) as image:
        return image.size


def _turbojpeg_text(error: Exception) -> str:
    """libjpeg-turbo's message without the name of its C function ("tjDecompressHeader3(): …")."""
    return re.sub(r"^\w+\(\):\s*", "", str(error)) or type(error).__name__


def _open_pillow(image_format: ImageFormat, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format.value.upper()])
    except Image.DecompressionBombError as error:
        # Pillow's own guard fires at open() for sizes far past any sane limit; same answer as ours.
        raise ImageTooLarge(f"image dimensions are over the limits: {error}") from None
    except UnidentifiedImageError:
        # (Pillow's own message names its in-memory file object: nothing a client can use.)
        raise CorruptImage(f"not a readable {image_format.value.upper()}: no {image_format.value.upper()} header") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImage(f"not a readable {image_format.value.upper()}: {error}") from None
    return image


def decode(
    image_format: ImageFormat | str,
    data: bytes,
    limits: ImageLimits,
    *,
    width: int | None = None,
    height: int | None = None,
) -> np.ndarray:
    """Decode to H×W×3 uint8 RGB after checking the header against `limits`."""
    image_format = ImageFormat.parse(image_format)
    if image_format is ImageFormat.RAW:
        if width is None or height is None:
            raise InvalidField("raw images need width and height", field="width")
        limits.check(width, height)
        if len(data) != width * height * 3:
            raise CorruptImage(f"raw image of {width}x{height} needs {width * height * 3} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if image_format is ImageFormat.JPEG:
        header_width, header_height = read_dimensions(image_format, data)
        limits.check(header_width, header_height)
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError as error:
            raise CorruptImage(f"JPEG body could not be decoded: {_turbojpeg_text(error)}") from None
    with _open_pillow(image_format, data) as image:
        limits.check(*image.size)
        if image_format is ImageFormat.PNG:
            check_png_size(data)
        try:
            rgb = image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise CorruptImage(f"{image_format.value.upper()} body could not be decoded: {error}") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png_size(data: bytes) -> None:
    """CorruptImage unless the PNG's pixel data is exactly what its header's size needs.

    Pillow decodes as many rows as the header declares and ignores the rest, so a header that declares
    less than the data holds would be accepted. The image data (the IDAT chunks' zlib stream) is
    inflated here, never past one byte more than the header allows, and its length compared.
    """
    width, height, depth, colour, interlace = struct.unpack(">IIBBxxB", data[16:29])
    bits = depth * _PNG_CHANNELS.get(colour, 0)
    if interlace:
        passes = [(math.ceil((width - x) / dx), math.ceil((height - y) / dy)) for x, y, dx, dy in _ADAM7]
    else:
        passes = [(width, height)]
    expected = sum(rows * (1 + math.ceil(columns * bits / 8)) for columns, rows in passes if columns > 0 and rows > 0)
    inflater = zlib.decompressobj()
    inflated = 0
    position = 8
    try:
        while position + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[position : position + 8])
            if kind == b"IDAT":
                chunk = data[position + 8 : position + 8 + length]
                inflated += len(inflater.decompress(chunk, expected + 1 - inflated))
                if inflated > expected or inflater.unconsumed_tail:
                    raise CorruptImage(f"the PNG holds more pixel data than its header's {width}x{height} needs")
            elif kind == b"IEND":
                break
            position += 12 + length
    except zlib.error as error:
        raise CorruptImage(f"the PNG's pixel data cannot be inflated: {error}") from None
    if inflated != expected or not inflater.eof:
        raise CorruptImage(f"the PNG's pixel data does not match its header's {width}x{height}")
