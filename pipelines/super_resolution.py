"""Super-resolution networks for upscale jobs: learnt ×2/×4 upscalers, loaded once and shared.

`--upscaler NAME=PATH` names a transformers image-super-resolution checkpoint (Swin2SR, e.g.
caidas/swin2SR-classical-sr-x4-64 in the local Hugging Face cache, or a directory saved with
`save_pretrained`), loaded through transformers' own `AutoModelForImageToImage`. An upscale job (or
the hires fix, A1111's extra-single-image, ComfyUI's ImageUpscaleWithModel) names it in place of a
resampler. The network runs on pieces of the image (`SuperResolution.upscale_tile`); the batch queue
tiles large images so that any output size fits in memory.

ESRGAN-family `.pth` files are what A1111 and ComfyUI users often have; the maintained loader for
those (spandrel) needs torchvision, which this project cannot install beside its CPU torch, so they
are not taken here.

`make_tiny_super_resolution_model` builds a tiny Swin2SR with random weights offline, for the tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelLoadError, UnknownName

logger = logging.getLogger(__name__)


class SuperResolution:
    """One super-resolution network: `scale` times larger images. `upscale_tile` is safe from several threads."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoModelForImageToImage

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            scale = int(getattr(config, "upscale", 0))
            if scale < 1:
                raise ValueError(f"its config ({type(config).__name__}) has no 'upscale' factor: not a super-resolution network")
            self.model = AutoModelForImageToImage.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load a super-resolution network from {path}: {error}") from error
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.scale = scale
        self.path = path
        self.device = device
        self.dtype = dtype
        self.parameters = sum(parameter.numel() for parameter in self.model.parameters())
        logger.info("super-resolution network (x%d) loaded from %s", scale, path)

    @torch.no_grad()
    def upscale_tile(self, pixels: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 → (H·scale)×(W·scale)×3 uint8. The network pads to its window itself."""
        height, width = pixels.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].to(self.device, self.dtype) / 255.0
        output = self.model(pixel_values=tensor).reconstruction[:, :, : height * self.scale, : width * self.scale]
        return (output[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "network": type(self.model).__name__, "scale": self.scale, "parameters": self.parameters}


class Upscalers:
    """The super-resolution networks loaded at start, by name (possibly none)."""

    def __init__(self, networks: Mapping[str, SuperResolution] | None = None) -> None:
        self.networks = dict(networks or {})

    @classmethod
    def load(cls, paths: Mapping[str, Path], device: torch.device, dtype: torch.dtype) -> Upscalers:
        return cls({name: SuperResolution(path, device, dtype) for name, path in paths.items()})

    @property
    def scales(self) -> dict[str, int]:
        return {name: network.scale for name, network in self.networks.items()}

    def get(self, name: str, field: str = "upscaler") -> SuperResolution:
        if name not in self.networks:
            raise UnknownName.listing(field, "super-resolution upscaler", name, self.networks, "--upscaler NAME=PATH")
        return self.networks[name]

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": name, **network.describe()} for name, network in self.networks.items()]


_TINY_LOCK = threading.Lock()


def make_tiny_super_resolution_model(directory: Path | str, scale: int = 2, seed: int = 0) -> Path:
    """A tiny Swin2SR (×`scale`) with random weights, saved as transformers writes it: the real
    architecture and loading path, under 0.2 M parameters. Each output pixel is a fixed function of
    the input around it (about 9 pixels each way), not restored detail."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    config = Swin2SRConfig(
        image_size=32,
        embed_dim=12,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        mlp_ratio=1.0,
        drop_path_rate=0.0,
        upscale=scale,
        upsampler="pixelshuffle",
    )
    with _TINY_LOCK:  # the global generator, seeded for this build only
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Swin2SRForImageSuperResolution(config)
            # transformers' init (std 0.02) leaves the output a flat wash of the mean colour (std 5 of
            # 255); Xavier init makes it vary with each pixel's neighbourhood, as a trained one's does.
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                        torch.nn.init.xavier_normal_(module.weight)
    target = Path(directory)
    model.save_pretrained(target, safe_serialization=True)
    Swin2SRImageProcessor(pad_size=config.window_size).save_pretrained(target)
    return target
