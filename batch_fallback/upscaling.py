"""Upscaling: resampling, super-resolution networks, and the diffusion "hires fix" (upscale, then
img2img at a low strength in overlapping tiles, so that outputs far larger than the model's own size
fit in memory).

Both the network and the hires pass work tile by tile (`tiled`). Tiles are `tile` pixels square
(smaller only when the image is), placed so the last one in a row or column sits flush with the border;
where two overlap they are blended with linear ramps, so no seam shows. Progress counts tiles (the
network) or every tile's steps (the hires pass: step k of tiles × steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from streamcanvas.pipelines.sizes import aligned
from streamcanvas.pipelines.super_resolution import SuperResolution

from .rendering import QualityRenderer, RenderRequest, StepCallback, image_to_image_steps, preview_jpeg

RESAMPLERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

NETWORK_TILE = 192
"""Input pixels a side of one super-resolution tile (its output is `scale` times that)."""
NETWORK_OVERLAP = 16
MAX_NETWORK_PASSES = 3
"""A ×2 network reaches ×4 in two passes, ×8 in three; past the target the result is resampled down."""

Painter = Callable[[np.ndarray, int, int], np.ndarray]
"""(tile pixels H×W×3 uint8, index of the tile, how many tiles) → the painted tile, `scale` times as large."""


def resized(image: Image.Image, width: int, height: int, method: str) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), RESAMPLERS[method])


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start and end of each tile along one side: `tile` long (or the whole side), overlapping by at
    least `overlap`, the last flush with the end."""
    if length <= tile:
        return [(0, length)]
    stride = max(8, tile - overlap)
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return [(start, start + tile) for start in dict.fromkeys(starts)]


def _ramp(size: int, start_ramp: int, end_ramp: int) -> np.ndarray:
    weights = np.ones(size, dtype=np.float32)
    if start_ramp:
        weights[:start_ramp] = np.linspace(1.0 / (start_ramp + 1), 1.0, start_ramp, endpoint=False, dtype=np.float32)
    if end_ramp:
        weights[size - end_ramp :] = np.linspace(1.0, 1.0 / (end_ramp + 1), end_ramp, endpoint=False, dtype=np.float32)
    return weights


def tile_count(width: int, height: int, tile: int, overlap: int) -> int:
    """How many tiles `tiled` paints a width × height image in."""
    return len(spans(width, tile, overlap)) * len(spans(height, tile, overlap))


def _overlaps(runs: list[tuple[int, int]], index: int) -> tuple[int, int]:
    """How far run `index` overlaps the one before it and the one after it (0 at the image's border)."""
    start, end = runs[index]
    before = runs[index - 1][1] - start if index > 0 else 0
    after = end - runs[index + 1][0] if index + 1 < len(runs) else 0
    return before, after


def tiled(pixels: np.ndarray, tile: int, overlap: int, scale: int, paint: Painter) -> np.ndarray:
    """`pixels` (H×W×3 uint8) painted tile by tile into an image `scale` times as large, the tiles'
    overlaps blended with linear ramps."""
    height, width = pixels.shape[:2]
    columns, rows = spans(width, tile, overlap), spans(height, tile, overlap)
    total = tile_count(width, height, tile, overlap)
    accumulated = np.zeros((height * scale, width * scale, 3), dtype=np.float32)
    weights = np.zeros((height * scale, width * scale, 1), dtype=np.float32)
    for row, (top, bottom) in enumerate(rows):
        for column, (left, right) in enumerate(columns):
            index = row * len(columns) + column
            painted = paint(np.ascontiguousarray(pixels[top:bottom, left:right]), index, total)
            expected = ((bottom - top) * scale, (right - left) * scale, 3)
            if painted.shape != expected:
                raise RuntimeError(f"a tile came back {painted.shape}, expected {expected}")
            ramp_top, ramp_bottom = _overlaps(rows, row)
            ramp_left, ramp_right = _overlaps(columns, column)
            weight = (
                _ramp(expected[0], ramp_top * scale, ramp_bottom * scale)[:, None, None]
                * _ramp(expected[1], ramp_left * scale, ramp_right * scale)[None, :, None]
            )
            window = (slice(top * scale, bottom * scale), slice(left * scale, right * scale))
            accumulated[window] += painted.astype(np.float32) * weight
            weights[window] += weight
    return np.clip(accumulated / weights + 0.5, 0, 255).astype(np.uint8)


def repaint_size(width: int, height: int) -> tuple[int, int]:
    """The size `refine` repaints a width × height image at: each side a size the networks take (the
    same, unless an exact output size asked for another)."""
    return aligned(width), aligned(height)


def repaint_steps(width: int, height: int, tile: int, overlap: int, steps: int, strength: float) -> int:
    """The steps of progress `refine` reports for a width × height image."""
    return tile_count(*repaint_size(width, height), tile, overlap) * image_to_image_steps(steps, strength)


def refine(renderer: QualityRenderer, image: Image.Image, base: RenderRequest, tile: int, overlap: int, on_step: StepCallback) -> Image.Image:
    """img2img over `image` (already at its final size) tile by tile, with `base`'s prompt, strength,
    steps and seed. A side that is no multiple of 8 (an upscale to an exact size) is repainted at the
    next one up, and the result resampled (Lanczos) back to the image's size."""
    size = image.size
    work = repaint_size(*size)
    if work != size:
        return resized(refine(renderer, resized(image, *work, "lanczos"), base, tile, overlap, on_step), *size, "lanczos")

    def paint(piece: np.ndarray, index: int, total: int) -> np.ndarray:
        request = dataclasses.replace(base, init_image=piece, width=piece.shape[1], height=piece.shape[0], batch_size=1)

        def tile_step(step: int, steps: int, make_preview) -> None:  # type: ignore[no-untyped-def]
            on_step(index * steps + step, total * steps, make_preview)

        (painted,) = renderer.render(request, tile_step)
        return np.asarray(painted.convert("RGB"), dtype=np.uint8)

    return Image.fromarray(tiled(np.asarray(image.convert("RGB"), dtype=np.uint8), tile, overlap, 1, paint))


def network_passes(network_scale: int, width: int, height: int, out_width: int, out_height: int) -> int:
    """How many passes of a ×`network_scale` network take a width × height image to at least the output size."""
    passes = 1
    while passes < MAX_NETWORK_PASSES and (width * network_scale**passes < out_width or height * network_scale**passes < out_height):
        passes += 1
    return passes


def network_steps(network_scale: int, width: int, height: int, out_width: int, out_height: int) -> int:
    """The steps of progress `super_resolve` reports: a tile of each pass, a step each."""
    passes = network_passes(network_scale, width, height, out_width, out_height)
    return sum(tile_count(width * network_scale**n, height * network_scale**n, NETWORK_TILE, NETWORK_OVERLAP) for n in range(passes))


def upscale_steps(renderer: QualityRenderer, size: tuple[int, int], out_size: tuple[int, int], upscaler: str, model: str | None) -> int:
    """The steps of progress `upscaled` reports."""
    if upscaler in RESAMPLERS:
        return 1
    network = renderer.models.get(model).upscalers.get(upscaler, "params.upscaler")
    return network_steps(network.scale, *size, *out_size)


def super_resolve(network: SuperResolution, image: Image.Image, width: int, height: int, on_step: StepCallback) -> Image.Image:
    """`image` through the network (as many passes as reach width × height), tile by tile, then
    resampled to exactly width × height (Lanczos) where the network's scale overshoots."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    side_x, side_y = image.size
    passes = network_passes(network.scale, side_x, side_y, width, height)
    total = network_steps(network.scale, side_x, side_y, width, height)
    done = 0
    for _ in range(passes):

        def paint(piece: np.ndarray, index: int, count: int) -> np.ndarray:
            nonlocal done
            painted = network.upscale_tile(piece)
            done += 1
            on_step(done, total, lambda: preview_jpeg(Image.fromarray(painted)))
            return painted

        pixels = tiled(pixels, NETWORK_TILE, NETWORK_OVERLAP, network.scale, paint)
    return resized(Image.fromarray(pixels), width, height, "lanczos")


def upscaled(renderer: QualityRenderer, image: Image.Image, width: int, height: int, upscaler: str, model: str | None, on_step: StepCallback) -> Image.Image:
    """`image` at width × height by a resampler (one step of progress), or by one of the model's
    super-resolution networks (a step a tile)."""
    if upscaler in RESAMPLERS:
        larger = resized(image, width, height, upscaler)
        on_step(1, 1, lambda: preview_jpeg(larger))
        return larger
    return super_resolve(renderer.models.get(model).upscalers.get(upscaler, "params.upscaler"), image, width, height, on_step)
