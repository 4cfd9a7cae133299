"""The image sizes every entry point accepts (live sessions, the server's settings, batch jobs): each side
a multiple of 8, the VAE's downscale, and at least 64. One table, so the three cannot drift apart.

A compiled backend may need a coarser multiple still (`Backend.side_multiple`); that is checked where a
stream is built for it."""

from __future__ import annotations

import math

SIDE_MULTIPLE = 8
MIN_SIDE = 64


def side_problem(value: int, maximum: int | None = None) -> str | None:
    """What is wrong with `value` as an image side (in words that complete "width …"), or None."""
    if value % SIDE_MULTIPLE:
        return f"{value} is not a multiple of {SIDE_MULTIPLE}"
    if value < MIN_SIDE:
        return f"{value} is less than {MIN_SIDE}" if maximum is None else f"{value} is outside {MIN_SIDE} … {maximum}"
    if maximum is not None and value > maximum:
        return f"{value} is outside {MIN_SIDE} … {maximum}"
    return None


def aligned(length: float) -> int:
    """The smallest side the networks take that holds `length` pixels: the next multiple of 8 up, at
    least 64 (for work at a size a client chose freely, e.g. an upscale's exact output)."""
    return max(MIN_SIDE, math.ceil(round(length, 6) / SIDE_MULTIPLE) * SIDE_MULTIPLE)
