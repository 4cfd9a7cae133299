"""ONNX export of the stream's components, as the live loop calls them.

Each component is traced at a small shape and written with dynamic batch, height and width, so one file
serves every session size and stream-batch depth (TensorRT then narrows it to an optimisation profile).
The graph is simplified with onnxslim (constant folding, shape-op elimination) before it is kept.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import onnx
import onnxslim
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, StableDiffusionPipeline

from .components import (
    ADDED_INPUTS,
    LATENT_CHANNELS,
    VAE_SCALE,
    Component,
    added_width,
    controlled_signature,
    controlnet_signature,
    lifted_names,
    residual_shapes,
    size_ids,
    unet_inputs,
)

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1
"""Bumped whenever what this module writes changes, so cached exports (and engines) are rebuilt."""

DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above this go to a `.data` file beside the graph (protobuf caps a file at 2 GiB)."""

_TRACE_SIDE = 128
_TRACE_BATCH = 2

Attention = Literal["standard", "fused"]
"""How a graph computes attention: with standard ONNX operators (MatMul, Softmax: any runtime, and what
TensorRT builds its engines from), or with ONNX Runtime's fused `com.microsoft.MultiHeadAttention`
operator (ONNX Runtime only). The fused graph's UNet was 17% faster on this CPU at 512² (attention over
1,024 tokens is half of the tiny UNet's time there), and on CUDA the operator runs flash attention."""
ATTENTIONS: tuple[str, ...] = get_args(Attention)


class _MultiHeadAttention(torch.autograd.Function):
    """Attention over (batch, tokens, heads × head size) projections: scaled dot-product attention when
    run, ONNX Runtime's MultiHeadAttention operator when exported."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        batch, _, width = query.shape

        def split(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, heads, tensor.shape[-1] // heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scale)
        return attended.transpose(1, 2).reshape(batch, -1, value.shape[-1])

    @staticmethod
    def symbolic(graph: Any, query: Any, key: Any, value: Any, heads: int, scale: float) -> Any:
        return graph.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads, scale_f=scale)


class _FusedAttentionProcessor:
    """diffusers' attention (AttnProcessor2_0) with its core as one `_MultiHeadAttention`: the same
    projections, norms and residual, for the attention layouts SD's UNet, ControlNets and VAE use."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("fused attention export covers attention without masks, spatial or q/k norms")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        attended = _MultiHeadAttention.apply(query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads, float(attn.scale))
        hidden_states = attn.to_out[1](attn.to_out[0](attended))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def _attention_written_as(graph: torch.nn.Module, attention: Attention) -> Iterator[None]:
    """While exporting: every attention layer of `graph` fused (then put back as it was), or as it is."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    models = [module for module in graph.modules() if attention == "fused" and hasattr(module, "set_attn_processor")]
    saved = [model.attn_processors for model in models]
    try:
        for model in models:
            model.set_attn_processor(_FusedAttentionProcessor())
        yield
    finally:
        for model, processors in zip(models, saved):
            model.set_attn_processor(processors)


def _added(inputs: tuple[torch.Tensor, ...], added: bool) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """Split SDXL's added conditioning (two inputs, when `added`) off the front of `inputs`."""
    if not added:
        return {}, inputs
    return {"added_cond_kwargs": dict(zip(ADDED_INPUTS, inputs[:2]))}, inputs[2:]


class _UNetGraph(torch.nn.Module):
    """The UNet (`added`: an SDXL UNet, whose added conditioning follows the text embeddings)."""

    def __init__(self, unet: torch.nn.Module, added: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        extra, _ = _added(rest, self.added)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]


class _ControlledUNetGraph(torch.nn.Module):
    """The UNet with a ControlNet's residuals (already scaled and summed) added to its skip connections."""

    def __init__(self, unet: torch.nn.Module, added: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        extra, residuals = _added(rest, self.added)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=list(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
            **extra,
        )[0]


class _LiftedWeights(torch.nn.Module):
    """A UNet graph (`_UNetGraph` or `_ControlledUNetGraph`) whose listed UNet parameters are inputs
    (after the graph's own inputs, in the order listed) instead of weights inside the file: the weights
    LoRAs change, which the runtime binds per LoRA set (see `components.lifted_names`).

    Within `lifted_out()` the listed parameters are taken out of their modules (so the exporter, which
    names the weights it writes by their place among the module's parameters, never sees them) and kept
    as plain attributes; while it runs, the input tensors stand in those places. torch.func's
    functional_call would do the swap, but it refuses to run under the tracer."""

    def __init__(self, graph: torch.nn.Module, unet: torch.nn.Module, lifted: Sequence[str]) -> None:
        super().__init__()
        self.graph = graph
        modules = dict(unet.named_modules())
        self.slots = [(modules[name.rpartition(".")[0]], name.rpartition(".")[2]) for name in lifted]

    @contextlib.contextmanager
    def lifted_out(self) -> Iterator[None]:
        taken: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        try:
            for module, attribute in self.slots:
                parameter = module._parameters.pop(attribute)
                taken.append((module, attribute, parameter))  # type: ignore[arg-type]
                module.__dict__[attribute] = parameter
            yield
        finally:
            for module, attribute, parameter in taken:
                module.__dict__.pop(attribute, None)
                module._parameters[attribute] = parameter

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        count = len(self.slots)
        own, weights = inputs[: len(inputs) - count], inputs[len(inputs) - count :]
        saved = [module.__dict__[attribute] for module, attribute in self.slots]
        try:
            for (module, attribute), weight in zip(self.slots, weights):
                module.__dict__[attribute] = weight
            return self.graph(*own)
        finally:
            for (module, attribute), parameter in zip(self.slots, saved):
                module.__dict__[attribute] = parameter


class _ControlNetGraph(torch.nn.Module):
    """A ControlNet at conditioning scale 1: the stream scales its residuals row by row afterwards."""

    def __init__(self, controlnet: torch.nn.Module, added: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = added

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        extra, (controlnet_cond,) = _added(rest, self.added)
        down, middle = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            return_dict=False,
            **extra,
        )
        return (*down, middle)


class _EncoderGraph(torch.nn.Module):
    """Image → unscaled latent: TAESD's latents, or the mode of AutoencoderKL's distribution."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images)
        if isinstance(self.vae, AutoencoderTiny):
            return encoded.latents
        return encoded.latent_dist.mode()


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def side_multiple(pipe: StableDiffusionPipeline) -> int:
    """Image sides the exported UNet accepts must be multiples of this.

    diffusers' UNet picks an upsampling path in Python from the latent size; the traced graph keeps the
    path taken at export, which is the right one only when the latent divides by 2^(number of
    downsamplings). SD 1.x/2.x: 64 pixels; the tiny test model: 16.
    """
    return VAE_SCALE * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def _graph_and_inputs(
    pipe: StableDiffusionPipeline, component: Component, module: torch.nn.Module | None
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    latent = _TRACE_SIDE // VAE_SCALE
    if component in (Component.UNET, Component.UNET_CONTROLLED, Component.CONTROLNET):
        inputs: tuple[torch.Tensor, ...] = (
            torch.randn(_TRACE_BATCH, LATENT_CHANNELS, latent, latent, device=device, dtype=dtype),
            torch.tensor([500, 700][:_TRACE_BATCH], dtype=torch.int64, device=device),
            torch.randn(_TRACE_BATCH, 77, unet.config.cross_attention_dim, device=device, dtype=dtype),
        )
        pooled = added_width(unet.config)
        if pooled is not None:  # SDXL: the pooled text embedding and the size ids
            sizes = size_ids(_TRACE_SIDE, _TRACE_SIDE, _TRACE_BATCH, device, dtype)
            inputs += (torch.randn(_TRACE_BATCH, pooled, device=device, dtype=dtype), sizes)
        added = pooled is not None
        if component is Component.UNET:
            return _UNetGraph(unet, added), inputs
        if component is Component.UNET_CONTROLLED:
            shapes = residual_shapes(unet.config, _TRACE_BATCH, latent, latent)
            return _ControlledUNetGraph(unet, added), (*inputs, *(torch.randn(shape, device=device, dtype=dtype) * 0.1 for shape in shapes))
        if module is None:
            raise ValueError("a ControlNet export needs the ControlNet module")
        cond = torch.rand(_TRACE_BATCH, module.config.conditioning_channels, _TRACE_SIDE, _TRACE_SIDE, device=device, dtype=dtype)
        return _ControlNetGraph(module, added), (*inputs, cond)
    vae = pipe.vae
    if component is Component.VAE_ENCODER:
        return _EncoderGraph(vae), (torch.rand(1, 3, _TRACE_SIDE, _TRACE_SIDE, device=device, dtype=vae.dtype) * 2 - 1,)
    return _DecoderGraph(vae), (torch.randn(1, LATENT_CHANNELS, latent, latent, device=device, dtype=vae.dtype),)


def _names_and_axes(pipe: StableDiffusionPipeline, component: Component) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """The graph's input names, output names and dynamic axes."""
    latent = {0: "batch", 2: "latent_height", 3: "latent_width"}
    image = {0: "batch", 2: "height", 3: "width"}
    if component is Component.VAE_ENCODER:
        return ["images"], ["latents"], {"images": image, "latents": latent}
    if component is Component.VAE_DECODER:
        return ["latents"], ["images"], {"latents": latent, "images": image}
    added = added_width(pipe.unet.config) is not None
    unet_axes = {name: {0: "batch"} for name in unet_inputs(added)}
    unet_axes["sample"] = latent
    if component is Component.UNET:
        return list(unet_inputs(added)), ["noise_pred"], {**unet_axes, "noise_pred": latent}
    # Residuals shrink with the down blocks: each has its own height and width axes.
    count = len(residual_shapes(pipe.unet.config, 1, 8, 8))

    def residual_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in names}

    if component is Component.UNET_CONTROLLED:
        signature = controlled_signature(count, added)
        residuals = signature.inputs[len(unet_axes):]
        return list(signature.inputs), ["noise_pred"], {**unet_axes, **residual_axes(residuals), "noise_pred": latent}
    inputs, outputs = controlnet_signature(count, added)
    return list(inputs), list(outputs), {**unet_axes, "controlnet_cond": image, **residual_axes(outputs)}


@torch.no_grad()
def export_component(
    pipe: StableDiffusionPipeline,
    component: Component,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_above: int = EXTERNAL_DATA_BYTES,
    module: torch.nn.Module | None = None,
    attention: Attention = "standard",
    lifted: Sequence[str] = (),
) -> None:
    """Write `component` of `pipe` (its UNet with or without ControlNet residuals, its live VAE's
    encoder/decoder, or the ControlNet `module` for that UNet) to the ONNX file `path`, its attention
    written as `attention` says; the UNet parameters named in `lifted` become the graph's last inputs
    (`components.lifted_names`) instead of weights in the file.

    The graph is traced on the pipeline's own device and dtype. Weights of more than `external_above`
    bytes go to `path` + `.data`.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: 17 or newer is needed (GroupNorm/LayerNorm export)")
    graph, inputs = _graph_and_inputs(pipe, component, module)
    input_names, output_names, dynamic_axes = _names_and_axes(pipe, component)
    if lifted:
        if component not in (Component.UNET, Component.UNET_CONTROLLED):
            raise ValueError(f"only the UNet's weights can be graph inputs, not {component.value}'s")
        parameters = dict(pipe.unet.named_parameters())
        missing = [name for name in lifted if name not in parameters]
        if missing:
            raise ValueError(f"the UNet has no parameters {', '.join(missing[:3])}")
        graph = _LiftedWeights(graph, pipe.unet, lifted)
        inputs = (*inputs, *(parameters[name].detach() for name in lifted))
        input_names = [*input_names, *lifted_names(len(lifted))]
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="streamcanvas-export-", dir=path.parent) as scratch:
        traced = Path(scratch) / "traced.onnx"
        with warnings.catch_warnings():
            # The tracer warns about every Python branch on a shape; side_multiple() covers the one that
            # matters, and the parity tests run the graphs at shapes other than the traced one.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            lifted_out = graph.lifted_out() if isinstance(graph, _LiftedWeights) else contextlib.nullcontext()
            with _attention_written_as(graph, attention), lifted_out:
                torch.onnx.export(
                    graph,
                    inputs,
                    str(traced),
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        weights = sum(parameter.numel() * parameter.element_size() for parameter in graph.parameters())  # lifted ones too: an upper bound
        if weights < onnx.checker.MAXIMUM_PROTOBUF:
            model = onnxslim.slim(str(traced))
        else:
            # onnxslim holds the whole graph as one protobuf, which cannot pass 2 GiB (a float32 SD UNet is
            # 3.4 GB): keep it as exported. ONNX Runtime and TensorRT run their own graph optimisations.
            logger.info("%s has %.1f GB of weights: kept as exported, without onnxslim", component.value, weights / 1e9)
            model = onnx.load(str(traced))
        external = weights > external_above
        if external:
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
            )
        else:
            onnx.save_model(model, str(path))
    logger.info(
        "exported %s to %s (opset %d, %s attention%s%s)", component.value, path, opset, attention,
        ", external weights" if external else "", f", {len(lifted)} weights as inputs" if lifted else "",
    )  # fmt: skip

