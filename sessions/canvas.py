"""The server's copy of one session's canvas, updated by full images and dirty-rectangle patches."""

from __future__ import annotations

import numpy as np
from PIL import Image

from streamcanvas.codecs import images
from streamcanvas.codecs.images import ImageLimits
from streamcanvas.codecs.messages import ImagePayload, Patch

from .errors import OutOfBounds


class CanvasBuffer:
    """An H×W×3 uint8 RGB image. Not locked: the session serialises writers and hands out copies."""

    def __init__(self, width: int, height: int, limits: ImageLimits, fill: int = 255) -> None:
        self.width = width
        self.height = height
        self.limits = limits
        self.pixels = np.full((height, width, 3), fill, dtype=np.uint8)

    def decode_full(self, payload: ImagePayload) -> np.ndarray:
        """Decode a whole-canvas image and scale it to the canvas size (any aspect is stretched)."""
        rgb = images.decode(payload.format, payload.data, self.limits, width=payload.width, height=payload.height)
        return self.fit(rgb)

    def fit(self, rgb: np.ndarray) -> np.ndarray:
        """Scale an image to the canvas size (any aspect is stretched)."""
        if rgb.shape[:2] != (self.height, self.width):
            resized = Image.fromarray(rgb).resize((self.width, self.height), Image.Resampling.BILINEAR)
            rgb = np.asarray(resized, dtype=np.uint8)
        return rgb

    def decode_patches(self, patches: tuple[Patch, ...]) -> list[tuple[int, int, np.ndarray]]:
        """Decode every patch and check it lies inside the canvas, before any of them is applied."""
        patch_limits = ImageLimits(self.width, self.height, self.width * self.height)
        decoded = []
        for index, patch in enumerate(patches):
            payload = patch.image
            width, height = images.read_dimensions(
                payload.format, payload.data, width=payload.width, height=payload.height
            )
            if patch.x < 0 or patch.y < 0 or patch.x + width > self.width or patch.y + height > self.height:
                raise OutOfBounds(
                    f"patch {index} at ({patch.x}, {patch.y}) of {width}x{height} does not fit inside the "
                    f"{self.width}x{self.height} canvas",
                    field="patches",
                )
            rgb = images.decode(payload.format, payload.data, patch_limits, width=payload.width, height=payload.height)
            decoded.append((patch.x, patch.y, rgb))
        return decoded

    def replace(self, rgb: np.ndarray) -> None:
        self.pixels = np.array(rgb, dtype=np.uint8, copy=True)

    def paste(self, decoded: list[tuple[int, int, np.ndarray]]) -> None:
        for x, y, rgb in decoded:
            height, width = rgb.shape[:2]
            self.pixels[y : y + height, x : x + width] = rgb

    def snapshot(self) -> np.ndarray:
        return self.pixels.copy()
