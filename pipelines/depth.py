"""Depth maps for depth ControlNets: a small depth network (any transformers depth-estimation model, e.g.
DPT or Depth Anything, from a local directory) loaded once and shared by every session that asks for
the `depth` preprocessor. `make_tiny_depth_model` builds a tiny DPT offline for the tests."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ModelLoadError

logger = logging.getLogger(__name__)


class DepthEstimator:
    """A depth network and its image processor. `estimate()` is safe from several threads."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForDepthEstimation.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load a depth-estimation model from {path}: {error}") from error
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.path = path
        self.device = device
        self.dtype = dtype
        self._processor_lock = threading.Lock()  # image processors keep no promise about threads
        logger.info("depth model loaded from %s", path)

    @torch.no_grad()
    def estimate(self, image: np.ndarray) -> np.ndarray:
        """A depth control image of `image`'s size: H×W×3 uint8, near bright and far dark, as depth
        ControlNets take it (the network's output normalised to the full range of this image)."""
        height, width = image.shape[:2]
        with self._processor_lock:
            inputs = self.processor(images=Image.fromarray(image), return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        depth = self.model(pixel_values=pixels).predicted_depth
        depth = torch.nn.functional.interpolate(depth.unsqueeze(1).float(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
        low, high = depth.min(), depth.max()
        scaled = ((depth - low) / (high - low).clamp_min(1e-6) * 255).round().to(torch.uint8).cpu().numpy()
        return np.repeat(scaled[:, :, None], 3, axis=2)

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "network": type(self.model).__name__}


def make_tiny_depth_model(directory: Path | str, seed: int = 0) -> Path:
    """A tiny DPT depth network with random weights and its image processor, saved as transformers
    writes them (its depth maps are deterministic functions of the image, not real depth)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        image_size=64,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    model = DPTForDepthEstimation(config)
    with torch.no_grad():
        # transformers' init (std 0.02) leaves the neck and head's output near 1e-8; He init keeps the
        # depth map varying with the image, as a trained one does.
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
    target = Path(directory)
    model.save_pretrained(target, safe_serialization=True)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(target)
    return target
