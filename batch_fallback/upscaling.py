"""Upscaling: resampling, and the diffusion "hires fix" (upscale, then img2img at a low strength in
overlapping tiles, so that outputs far larger than the model's own size fit in memory).

Tiles are `tile` pixels square (smaller only when the image is), placed so the last one in a row or
column sits flush with the border; where two overlap they are blended with linear ramps, so no seam
shows. Progress counts every tile's steps: step k of tiles × steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from .rendering import QualityRenderer, RenderRequest, StepCallback

RESAMPLERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


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


def refine(renderer: QualityRenderer, image: Image.Image, base: RenderRequest, tile: int, overlap: int, on_step: StepCallback) -> Image.Image:
    """img2img over `image` (already at its final size, a multiple of 8 each way) tile by tile, with
    `base`'s prompt, strength, steps and seed."""
    width, height = image.size
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    columns, rows = spans(width, tile, overlap), spans(height, tile, overlap)
    total = len(columns) * len(rows)
    accumulated = np.zeros((height, width, 3), dtype=np.float32)
    weights = np.zeros((height, width, 1), dtype=np.float32)
    done = 0
    for top, bottom in rows:
        for left, right in columns:
            piece = np.ascontiguousarray(pixels[top:bottom, left:right])
            request = dataclasses.replace(base, init_image=piece, width=right - left, height=bottom - top, batch_size=1)

            def tile_step(step: int, steps: int, make_preview, offset: int = done) -> None:  # type: ignore[no-untyped-def]
                on_step(offset * steps + step, total * steps, make_preview)

            (painted,) = renderer.render(request, tile_step)
            done += 1
            # Ramps only where a neighbouring tile overlaps this one (never at the image's border).
            previous_column = [c for c in columns if c[0] < left]
            previous_row = [r for r in rows if r[0] < top]
            ramp_left = previous_column[-1][1] - left if previous_column else 0
            ramp_top = previous_row[-1][1] - top if previous_row else 0
            next_column = [c for c in columns if c[0] > left]
            next_row = [r for r in rows if r[0] > top]
            ramp_right = right - next_column[0][0] if next_column else 0
            ramp_bottom = bottom - next_row[0][0] if next_row else 0
            weight = _ramp(bottom - top, ramp_top, ramp_bottom)[:, None, None] * _ramp(right - left, ramp_left, ramp_right)[None, :, None]
            accumulated[top:bottom, left:right] += np.asarray(painted.convert("RGB"), dtype=np.float32) * weight
            weights[top:bottom, left:right] += weight
    return Image.fromarray(np.clip(accumulated / weights + 0.5, 0, 255).astype(np.uint8))
