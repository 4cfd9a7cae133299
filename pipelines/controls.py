"""ControlNets in the live stream: the control specs a session sends, the preprocessors that turn its
canvas (or its control layer) into a control image, and the UNet call with their residuals.

A ControlNet is loaded once (`--controlnet NAME=PATH`) and shared read-only by every session. Each
stream says which to use, how strongly, over which part of its denoising steps, and from what image:

    ControlSpec(model="scribble", scale=0.8, start=0.0, end=1.0, preprocessor="scribble", source="layer")

Its cost is one ControlNet call per UNet call (for every latent of the stream batch at once), whichever
sessions share that call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel

from .depth import DepthEstimator
from .errors import NO_DEPTH_MODEL, InvalidParameter, ModelLoadError, UnknownName, quoted

logger = logging.getLogger(__name__)

Preprocessor = Literal["canny", "scribble", "depth", "none"]
PREPROCESSORS: tuple[str, ...] = get_args(Preprocessor)
ControlSource = Literal["canvas", "layer"]
CONTROL_SOURCES: tuple[str, ...] = get_args(ControlSource)
MAX_CONTROLS = 4
MAX_CONTROL_SCALE = 2.0


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet applied to a stream. `start`/`end` are fractions of the stream's denoising steps
    (as diffusers' control_guidance_start/end): a step takes the control when it lies inside."""

    model: str = ""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: Preprocessor = "scribble"
    source: ControlSource = "canvas"

    def __post_init__(self) -> None:
        where = "controls"
        if not isinstance(self.model, str) or not self.model:
            raise InvalidParameter(where, "each control needs a 'model' (the name of a ControlNet)")
        for name, high in (("scale", MAX_CONTROL_SCALE), ("start", 1.0), ("end", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
                raise InvalidParameter(where, f"'{name}' must be a number in [0, {high}], got {quoted(value)}")
            object.__setattr__(self, name, float(value))
        if self.start >= self.end:
            raise InvalidParameter(where, f"'start' ({self.start}) must be below 'end' ({self.end})")
        if self.preprocessor not in PREPROCESSORS:
            raise InvalidParameter(where, f"'preprocessor' {quoted(self.preprocessor)} is not one of {', '.join(PREPROCESSORS)}")
        if self.source not in CONTROL_SOURCES:
            raise InvalidParameter(where, f"'source' {quoted(self.source)} is not one of {', '.join(CONTROL_SOURCES)}")

    @classmethod
    def parse(cls, value: object) -> ControlSpec:
        if isinstance(value, ControlSpec):
            return value
        if not isinstance(value, Mapping):
            raise InvalidParameter("controls", f"each control must be a map, got {type(value).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise InvalidParameter("controls", f"unknown field {quoted(unknown[0])} (known: {', '.join(sorted(known))})")
        return cls(**value)  # type: ignore[arg-type]

    def keeps(self, steps: int) -> list[bool]:
        """For each of a stream's `steps` denoising steps, whether this control applies to it."""
        return [not (index / steps < self.start or (index + 1) / steps > self.end) for index in range(steps)]


def preprocess(image: np.ndarray, preprocessor: Preprocessor, depth: DepthEstimator | None = None) -> np.ndarray:
    """A control image (H×W×3 uint8: white lines on black for canny/scribble, near bright for depth)
    from an RGB image. `depth` is the server's depth network, needed for "depth"."""
    if preprocessor == "none":
        return image
    if preprocessor == "depth":
        if depth is None:
            raise UnknownName("controls", NO_DEPTH_MODEL)
        return depth.estimate(image)
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if preprocessor == "canny":
        edges = cv2.Canny(gray, 100, 200)
    elif preprocessor == "scribble":
        # Thick strokes along the drawing's edges, as scribble ControlNets were trained on.
        edges = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 50, 120)
        edges = cv2.dilate(edges, np.ones((3, 3), np.uint8), iterations=1)
    else:
        raise InvalidParameter("controls", f"'preprocessor' {quoted(preprocessor)} is not one of {', '.join(PREPROCESSORS)}")
    return np.repeat(edges[:, :, None], 3, axis=2)


def control_tensor(image: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1], as diffusers' ControlNet pipelines feed their control images."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    return tensor.to(device=device, dtype=dtype) / 255.0


class ControlNets:
    """The ControlNets loaded at start, by name (possibly none)."""

    def __init__(self, models: Mapping[str, ControlNetModel] | None = None, paths: Mapping[str, Path] | None = None) -> None:
        self.models = dict(models or {})
        self.paths = dict(paths or {})

    @classmethod
    def load(cls, paths: Mapping[str, Path], device: torch.device, dtype: torch.dtype) -> ControlNets:
        models = {}
        for name, path in paths.items():
            try:
                model = ControlNetModel.from_pretrained(path, dtype=dtype, local_files_only=True)
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ModelLoadError(f"could not load the ControlNet {name!r} from {path}: {error}") from error
            model = model.to(device).eval().requires_grad_(False)
            models[name] = model.to(memory_format=torch.channels_last)
            logger.info("ControlNet %s loaded from %s", name, path)
        return cls(models, paths)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def get(self, name: str) -> ControlNetModel:
        if name not in self.models:
            raise UnknownName.listing("controls", "ControlNet", name, self.names, "--controlnet NAME=PATH")
        return self.models[name]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "path": str(self.paths.get(name, "")), "conditioning_channels": model.config.conditioning_channels}
            for name, model in self.models.items()
        ]


@dataclass
class ControlRows:
    """One ControlNet's part of a UNet call: its control image and scale for every row of the batch."""

    net: ControlNetModel
    images: torch.Tensor
    scales: torch.Tensor


def controlled_unet(
    unet: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    controls: list[ControlRows],
    added: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The UNet's prediction for a batch, with the residuals of every ControlNet that applies to any
    row added (each row scaled by its own control scale, 0 where the control does not apply). `added`
    is SDXL's added conditioning (pooled text embeddings and size ids, a row each), for both."""
    extra = {} if added is None else {"added_cond_kwargs": added}
    down: list[torch.Tensor] | None = None
    middle: torch.Tensor | None = None
    for control in controls:
        if not bool(control.scales.any()):
            continue
        down_residuals, middle_residual = control.net(
            latents,
            timesteps,
            encoder_hidden_states=embeddings,
            controlnet_cond=control.images,
            conditioning_scale=1.0,
            return_dict=False,
            **extra,
        )
        weights = control.scales.view(-1, 1, 1, 1).to(latents.dtype)
        scaled = [residual * weights for residual in down_residuals]
        down = scaled if down is None else [total + part for total, part in zip(down, scaled)]
        middle = middle_residual * weights if middle is None else middle + middle_residual * weights
    if down is None:
        return unet(latents, timesteps, encoder_hidden_states=embeddings, return_dict=False, **extra)[0]
    return unet(
        latents,
        timesteps,
        encoder_hidden_states=embeddings,
        down_block_additional_residuals=down,
        mid_block_additional_residual=middle,
        return_dict=False,
        **extra,
    )[0]


def merge_rows(parts: list[list[ControlRows]]) -> list[ControlRows]:
    """Several streams' ControlRows (the same ControlNets in the same order) for one stacked call."""
    if not parts or not parts[0]:
        return []
    return [
        ControlRows(
            same[0].net,
            torch.cat([rows.images for rows in same]),
            torch.cat([rows.scales for rows in same]),
        )
        for same in zip(*parts)
    ]
