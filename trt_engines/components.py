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
from collections.abc import Callable, Mapping, Sequence
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
    UNET_CONTROLLED = "unet_controlled"
    """The UNet with ControlNet residuals as inputs (exported for models loaded with ControlNets)."""
    CONTROLNET = "controlnet"
    """A ControlNet: its residuals for the UNet as outputs (one graph per loaded ControlNet)."""


STREAM_COMPONENTS = (Component.UNET, Component.VAE_ENCODER, Component.VAE_DECODER)
"""What every compiled stream runs; the controlled UNet and the ControlNets come with ControlNets."""


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
ADDED_INPUTS = ("text_embeds", "time_ids")
"""SDXL's added conditioning, after the UNet's own inputs: the pooled text embedding and the size ids."""
TIME_IDS = 6
"""SDXL's size ids: original height and width, crop top and left, target height and width."""


def added_width(unet_config: Mapping[str, object]) -> int | None:
    """The pooled text embedding's width for a UNet that takes SDXL's added conditioning, else None."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    return int(unet_config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(unet_config["addition_time_embed_dim"])  # type: ignore[call-overload]


def size_ids(height: int, width: int, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's `time_ids` for `rows` rows of a height × width picture: original size, crop (none), target size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(rows, 1)


def unet_inputs(added: bool) -> tuple[str, ...]:
    """The inputs every UNet and ControlNet graph starts with (SDXL's added conditioning with `added`)."""
    return (*SIGNATURES[Component.UNET].inputs, *(ADDED_INPUTS if added else ()))


def lifted_names(count: int) -> tuple[str, ...]:
    """The graph input names of a UNet's `count` lifted weights (the weights LoRAs change), in the
    order they were listed at export."""
    return tuple(f"lifted_weight_{index}" for index in range(count))


def residual_names(count: int) -> tuple[str, ...]:
    """The names of a UNet's `count` ControlNet residuals: the down blocks' in order, then the middle's."""
    return (*(f"down_residual_{index}" for index in range(count - 1)), "mid_residual")


def residual_shapes(unet_config: Mapping[str, object], batch: int, latent_height: int, latent_width: int) -> list[tuple[int, ...]]:
    """The shapes of the residuals a ControlNet gives (and the UNet takes) for latents of this size, as
    diffusers' UNet collects them: after conv_in, after every resnet of every down block and after each
    downsampler (none after the last block), then the middle block's."""
    channels = list(unet_config["block_out_channels"])  # type: ignore[call-overload]
    layers = int(unet_config["layers_per_block"])  # type: ignore[call-overload]
    height, width = latent_height, latent_width
    shapes = [(batch, channels[0], height, width)]
    for index, out_channels in enumerate(channels):
        shapes += [(batch, out_channels, height, width)] * layers
        if index < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((batch, out_channels, height, width))
    return [*shapes, (batch, channels[-1], height, width)]


def controlled_signature(residuals: int, added: bool = False) -> Signature:
    return Signature((*unet_inputs(added), *residual_names(residuals)), "noise_pred")


def controlnet_signature(residuals: int, added: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A ControlNet graph's (inputs, outputs)."""
    return (*unet_inputs(added), "controlnet_cond"), residual_names(residuals)


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
        self,
        component: Component,
        text_length: int = 77,
        text_width: int = 768,
        pooled_width: int | None = None,
        *,
        unet_config: Mapping[str, object] | None = None,
        conditioning_channels: int | None = None,
        lifted: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input, as a TensorRT optimisation profile takes them.

        `pooled_width`: an SDXL UNet's, which takes the added conditioning too. The controlled UNet's
        residual inputs need the UNet's config (`unet_config`), a ControlNet's control image its
        `conditioning_channels`; `lifted` weights (name → shape) have one shape each."""
        sides = (self.min_side, self.opt_side, self.max_side)
        if component in (Component.UNET, Component.UNET_CONTROLLED, Component.CONTROLNET):
            batches = (self.min_batch, self.opt_batch, self.max_batch)
            corners = list(zip(batches, sides))
            profile: dict[str, tuple[tuple[int, ...], ...]] = {
                "sample": tuple((batch, LATENT_CHANNELS, side // VAE_SCALE, side // VAE_SCALE) for batch, side in corners),
                "timestep": tuple((batch,) for batch in batches),
                "encoder_hidden_states": tuple((batch, text_length, text_width) for batch in batches),
            }
            if pooled_width is not None:
                profile["text_embeds"] = tuple((batch, pooled_width) for batch in batches)
                profile["time_ids"] = tuple((batch, TIME_IDS) for batch in batches)
            if component is Component.UNET_CONTROLLED:
                if unet_config is None:
                    raise ValueError("the controlled UNet's profile needs the UNet's config (its residual shapes)")
                at_corners = [residual_shapes(unet_config, batch, side // VAE_SCALE, side // VAE_SCALE) for batch, side in corners]
                for index, name in enumerate(residual_names(len(at_corners[0]))):
                    profile[name] = tuple(shapes[index] for shapes in at_corners)
            if component is Component.CONTROLNET:
                if conditioning_channels is None:
                    raise ValueError("a ControlNet's profile needs its conditioning_channels")
                profile["controlnet_cond"] = tuple((batch, conditioning_channels, side, side) for batch, side in corners)
            for name, shape in (lifted or {}).items():
                profile[name] = (shape, shape, shape)
            return profile  # type: ignore[return-value]
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


class MultiOutputRunner(Protocol):
    """Runs a graph with several outputs: {output name: shape} in, {output name: tensor} out."""

    def run_many(
        self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, Sequence[int]], output_dtype: torch.dtype
    ) -> dict[str, torch.Tensor]: ...


def unet_feeds(
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    dtype: torch.dtype,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The inputs the UNet and ControlNet graphs share, in their dtypes (a timestep a row; SDXL's
    added conditioning as given, a row each)."""
    batch = sample.shape[0]
    feeds = {
        "sample": sample.to(dtype),
        "timestep": torch.as_tensor(timestep, device=sample.device).to(torch.int64).reshape(-1).expand(batch),
        "encoder_hidden_states": encoder_hidden_states.to(dtype),
    }
    if added_cond_kwargs is not None:
        feeds.update({name: added_cond_kwargs[name].to(dtype) for name in ADDED_INPUTS})
    return feeds


class CompiledUNet:
    """Called by StreamDiffusion as `unet(sample, t, encoder_hidden_states=..., return_dict=False)[0]`,
    and with ControlNet residuals as diffusers' UNet takes them (`pipelines.controls.controlled_unet`)
    when the backend exported the controlled graph too.

    With `lifted` (and the `lifted_runner`, and `lifted_controlled` for ControlNets), a caller with LoRAs
    runs the graphs whose LoRA-targeted weights are inputs, bound to the merged weights `lifted` gives."""

    def __init__(
        self,
        runner: Runner,
        dtype: torch.dtype,
        controlled: Runner | None = None,
        *,
        lifted: LiftedWeights | None = None,
        lifted_runner: Runner | None = None,
        lifted_controlled: Runner | None = None,
    ) -> None:
        self.runner = runner
        self.dtype = dtype
        self.controlled = controlled
        self.lifted = lifted
        self.lifted_runner = lifted_runner
        self.lifted_controlled = lifted_controlled

    @property
    def takes_loras(self) -> bool:
        return self.lifted is not None and self.lifted_runner is not None

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = False,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("compiled components return tuples only")
        feeds = unet_feeds(sample, timestep, encoder_hidden_states, self.dtype, added_cond_kwargs)
        weights = self.lifted() if self.lifted is not None else None
        plain, controlled = self.runner, self.controlled
        if weights is not None:
            if self.lifted_runner is None:
                raise ValueError("this compiled UNet has no graph that takes LoRA weights")
            plain, controlled = self.lifted_runner, self.lifted_controlled
            feeds.update(zip(lifted_names(len(weights)), weights))
        if down_block_additional_residuals is None:
            return (plain(feeds, sample.shape, self.dtype),)
        if controlled is None or mid_block_additional_residual is None:
            raise ValueError("this compiled UNet takes no ControlNet residuals (no controlled graph was exported)")
        residuals = [*down_block_additional_residuals, mid_block_additional_residual]
        feeds.update(zip(residual_names(len(residuals)), (residual.to(self.dtype) for residual in residuals)))
        return (controlled(feeds, sample.shape, self.dtype),)


class CompiledControlNet:
    """Called as `pipelines.controls.controlled_unet` calls a diffusers ControlNetModel: the down
    residuals and the middle one for a batch of latents and control images."""

    def __init__(self, runner: MultiOutputRunner, dtype: torch.dtype, unet_config: Mapping[str, object]) -> None:
        self.runner = runner
        self.dtype = dtype
        self.unet_config = unet_config

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        return_dict: bool = False,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if return_dict:
            raise ValueError("compiled components return tuples only")
        batch, _, height, width = sample.shape
        shapes = residual_shapes(self.unet_config, batch, height, width)
        names = residual_names(len(shapes))
        feeds = unet_feeds(sample, timestep, encoder_hidden_states, self.dtype, added_cond_kwargs)
        feeds["controlnet_cond"] = controlnet_cond.to(self.dtype)
        outputs = self.runner.run_many(feeds, dict(zip(names, shapes)), self.dtype)
        residuals = [outputs[name] for name in names]
        if conditioning_scale != 1.0:
            residuals = [residual * conditioning_scale for residual in residuals]
        return residuals[:-1], residuals[-1]


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
