"""Procedurally generated drawings: the training data of the toy model (`pipelines.toy_model`).

What a person feeds the live canvas: strokes, filled shapes and outlines on white paper, flat colour or
a gradient, and webcam-like frames (smooth colour fields with sensor noise). Every picture is a
deterministic function of the generator it is drawn with, so the data, and the weights trained on it,
are the same on every run with the same seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PAPER = (255, 255, 255)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(value) for value in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.random()
    if kind < 0.5:
        return Image.new("RGB", (size, size), PAPER)
    if kind < 0.7:
        return Image.new("RGB", (size, size), random_colour(rng))
    # A linear gradient between two colours, in any direction.
    angle = rng.uniform(0, 2 * np.pi)
    coordinates = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    along = np.cos(angle) * coordinates[None, :] + np.sin(angle) * coordinates[:, None]
    weight = ((along - along.min()) / max(float(np.ptp(along)), 1e-6))[..., None]
    start, end = np.array(random_colour(rng), np.float32), np.array(random_colour(rng), np.float32)
    return Image.fromarray((start * (1 - weight) + end * weight).astype(np.uint8))


def _points(rng: np.random.Generator, size: int, count: int) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in rng.uniform(-0.1 * size, 1.1 * size, size=(count, 2))]


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    colour = random_colour(rng)
    kind = rng.integers(0, 5)
    x0, y0 = rng.uniform(-0.1 * size, 0.9 * size, size=2)
    width, height = rng.uniform(0.08 * size, 0.6 * size, size=2)
    box = (float(x0), float(y0), float(x0 + width), float(y0 + height))
    if kind == 0:
        draw.rectangle(box, fill=colour)
    elif kind == 1:
        draw.ellipse(box, fill=colour)
    elif kind == 2:
        draw.polygon(_points(rng, size, int(rng.integers(3, 7))), fill=colour)
    elif kind == 3:  # an outline, as drawn with the line or shape tools
        stroke = int(rng.integers(2, max(3, size // 24)))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, outline=colour, width=stroke)
    else:  # a brush stroke: a thick polyline with round joints
        stroke = int(rng.integers(2, max(3, size // 10)))
        draw.line(_points(rng, size, int(rng.integers(2, 6))), fill=colour, width=stroke, joint="curve")


def drawing(rng: np.random.Generator, size: int) -> np.ndarray:
    """A canvas drawing: a background and 1–7 shapes and strokes. size×size×3 uint8 RGB."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 8))):
        _shape(draw, rng, size)
    return np.asarray(image)


def webcam_frame(rng: np.random.Generator, size: int) -> np.ndarray:
    """A webcam-like frame: a smooth colour field, a few soft blobs, and sensor noise."""
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 6)),) * 2 + (3,), dtype=np.uint8)
    image = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(0, size, size=2)
        radius = rng.uniform(0.05, 0.3) * size
        draw.ellipse((float(x0 - radius), float(y0 - radius), float(x0 + radius), float(y0 + radius)), fill=random_colour(rng))
    image = image.filter(ImageFilter.GaussianBlur(radius=size / 64))
    noisy = np.asarray(image, np.float32) + rng.normal(0.0, rng.uniform(2.0, 12.0), size=(size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def picture(rng: np.random.Generator, size: int, webcam_share: float = 0.2) -> np.ndarray:
    """A drawing, or (with probability `webcam_share`) a webcam-like frame."""
    return webcam_frame(rng, size) if rng.random() < webcam_share else drawing(rng, size)


def pictures(seed: int, count: int, size: int, webcam_share: float = 0.2) -> np.ndarray:
    """`count` pictures as one count×size×size×3 uint8 array, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return np.stack([picture(rng, size, webcam_share) for _ in range(count)])
