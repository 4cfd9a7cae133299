"""The stream's compiled components: what is exported, under which names and shapes, and the adapters
that let StreamDiffusion's loop call an ONNX Runtime session or a TensorRT engine as if it were the
diffusers module it replaces.

A *runner* executes one exported graph: `runner({input name: tensor}, output_shape, output_dtype)`
returns the graph's single output as a torch tensor on the inputs' device. `OnnxRuntimeRunner`
(`onnxruntime_backend.py`) and `TensorRTRunner` (`tensorrt_backend.py`) both have that shape, so the
adapters below, and everything above them, are the same for every backend.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol

import torch

LATENT_CHANNELS = 4
VAE_SCALE = 8
"""Image pixels per latent pixel on each side: SD's AutoencoderKL and TAESD both downsample by 8."""


class Component(enum.Enum):
    UNET = "unet"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"


@dataclass(frozen=True)
class Signature:
    """A component's graph inputs and output, by name, as the exporter writes them."""

    inputs: tuple[str, ...]
    output: str


SIGNATURES: dict[Component, Signature] = {
    Component.UNET: Signature(("sample", "timestep", "encoder_hidden_states"), "noise_pred"),
    Component.VAE_ENCODER: Signature(("images",), "latents"),
    Component.VAE_DECODER: Signature(("latents",), "images"),
}


@dataclass(frozen=True)
class ShapeRange:
    """What a compiled component must accept: image sides (pixels, multiples of 8) and UNet batch sizes.

    ONNX graphs are exported with dynamic batch, height and width, so one file covers every shape;
    TensorRT engines are built for exactly this range (an optimisation profile) and refuse others.
    """

    min_side: int = 256
    max_side: int = 1024
    opt_side: int = 512
    min_batch: int = 1
    max_batch: int = 8
    opt_batch: int = 2

    def __post_init__(self) -> None:
        for name in ("min_side", "max_side", "opt_side"):
            if getattr(self, name) % VAE_SCALE or getattr(self, name) < 64:
                raise ValueError(f"{name} must be a multiple of {VAE_SCALE} and at least 64")
        if not self.min_side <= self.opt_side <= self.max_side:
            raise ValueError(f"need min_side <= opt_side <= max_side, got {self.min_side}, {self.opt_side}, {self.max_side}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")

    def covers(self, width: int, height: int, batch: int = 1) -> bool:
        sides_fit = all(self.min_side <= side <= self.max_side for side in (width, height))
        return sides_fit and self.min_batch <= batch <= self.max_batch

    def profile(
        self, component: Component, text_length: int = 77, text_width: int = 768
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input, as a TensorRT optimisation profile takes them."""
        sides = (self.min_side, self.opt_side, self.max_side)
        if component is Component.UNET:
            batches = (self.min_batch, self.opt_batch, self.max_batch)
            latent = [(batch, LATENT_CHANNELS, side // VAE_SCALE, side // VAE_SCALE) for batch, side in zip(batches, sides)]
            return {
                "sample": tuple(latent),  # type: ignore[dict-item]
                "timestep": tuple((batch,) for batch in batches),  # type: ignore[dict-item]
                "encoder_hidden_states": tuple((batch, text_length, text_width) for batch in batches),  # type: ignore[dict-item]
            }
        # The VAE sees one frame a session (frame_buffer_size 1): one, or as many as sessions render
        # together in one call (cross-session batching), up to max_batch.
        frames = (1, 1, self.max_batch)
        if component is Component.VAE_ENCODER:
            return {"images": tuple((batch, 3, side, side) for batch, side in zip(frames, sides))}  # type: ignore[dict-item]
        return {"latents": tuple((batch, LATENT_CHANNELS, side // VAE_SCALE, side // VAE_SCALE) for batch, side in zip(frames, sides))}  # type: ignore[dict-item]


class Runner(Protocol):
    """Runs one exported graph on tensors that are already on the runner's device."""

    def __call__(
        self, feeds: Mapping[str, torch.Tensor], output_shape: Sequence[int], output_dtype: torch.dtype
    ) -> torch.Tensor: ...


class CompiledUNet:
    """Called by StreamDiffusion as `unet(sample, t, encoder_hidden_states=..., return_dict=False)[0]`."""

    def __init__(self, runner: Runner, dtype: torch.dtype) -> None:
        self.runner = runner
        self.dtype = dtype

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("compiled components return tuples only")
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.int64).reshape(-1).expand(batch)
        feeds = {
            "sample": sample.to(self.dtype),
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states.to(self.dtype),
        }
        return (self.runner(feeds, sample.shape, self.dtype),)


class CompiledVae:
    """Called as a diffusers VAE is by the stream: `encode(x)` (its `.latents`) and `decode(z)[0]`."""

    def __init__(self, encoder: Runner, decoder: Runner, dtype: torch.dtype, scaling_factor: float) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.dtype = dtype
        self.config = SimpleNamespace(scaling_factor=scaling_factor)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        batch, _, height, width = images.shape
        shape = (batch, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
        return SimpleNamespace(latents=self.encoder({"images": images.to(self.dtype)}, shape, self.dtype))

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("compiled components return tuples only")
        batch, _, height, width = latents.shape
        shape = (batch, 3, height * VAE_SCALE, width * VAE_SCALE)
        return (self.decoder({"latents": latents.to(self.dtype)}, shape, self.dtype),)
