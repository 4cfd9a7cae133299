"""Image codecs round-trip real frames; headers are checked before any pixel buffer is allocated."""

from __future__ import annotations

import numpy as np
import pytest

from streamcanvas.codecs import images
from streamcanvas.codecs.errors import CorruptImage, ImageTooLarge, InvalidField, UnsupportedImageFormat
from streamcanvas.codecs.images import ImageFormat, ImageLimits, get_encoder

from helpers import make_canvas
from test_bad_input import jpeg_claiming, png_claiming

LIMITS = ImageLimits(max_width=1024, max_height=1024, max_pixels=512 * 1024)


@pytest.mark.parametrize(
    ("name", "tolerance"), [("jpeg", 12.0), ("webp", 12.0), ("png", 0.0), ("raw", 0.0)]
)
def test_round_trip(name: str, tolerance: float) -> None:
    frame = make_canvas(96, 3)[:, :80]  # not square, to catch swapped width/height
    data = get_encoder(name).encode(frame, quality=90)
    assert images.read_dimensions(ImageFormat(name), data, width=80, height=96) == (80, 96)
    decoded = images.decode(name, data, LIMITS, width=80, height=96)
    assert decoded.shape == (96, 80, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(float) - frame).mean() <= tolerance


def test_quality_trades_size() -> None:
    frame = make_canvas(128, 1)
    encoder = get_encoder("jpeg")
    assert len(encoder.encode(frame, 30)) < len(encoder.encode(frame, 95))


def test_declared_size_over_the_limits_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        images.decode("jpeg", jpeg_claiming(5000, 200), LIMITS)
    with pytest.raises(ImageTooLarge):
        images.decode("png", png_claiming(2000, 2000), LIMITS)  # within each side, over the pixel count
    with pytest.raises(ImageTooLarge):
        images.decode("raw", b"\0" * 3, LIMITS, width=4096, height=4096)


@pytest.mark.parametrize("name", ["jpeg", "webp", "png"])
def test_corrupt_bytes(name: str) -> None:
    good = get_encoder(name).encode(make_canvas(64, 2), 80)
    for bad in (b"", b"hello", good[: len(good) // 3]):
        with pytest.raises(CorruptImage) as refused:
            images.decode(name, bad, LIMITS)
        assert "object at 0x" not in str(refused.value)  # a message for people, not a Python repr


def test_a_format_mismatch_is_corrupt() -> None:
    png = get_encoder("png").encode(make_canvas(32, 2), 80)
    with pytest.raises(CorruptImage):
        images.decode("webp", png, LIMITS)


def test_raw_needs_its_size() -> None:
    with pytest.raises(InvalidField):
        images.decode("raw", b"\0" * 12, LIMITS)
    with pytest.raises(CorruptImage):
        images.decode("raw", b"\0" * 11, LIMITS, width=2, height=2)


def test_unknown_format() -> None:
    with pytest.raises(UnsupportedImageFormat):
        get_encoder("gif")
    with pytest.raises(UnsupportedImageFormat):
        images.decode("bmp", b"BM", LIMITS)
