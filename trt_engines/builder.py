"""Getting a model's artifacts out of the engine cache, building what is missing when allowed.

An ONNX graph is exported per component; a TensorRT engine is built from that graph for one shape
range, GPU and TensorRT version. Both go through `EngineCache`, so their keys, atomic writes and locks
are the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .cache import EngineCache, EngineKey, Entry, fingerprint_module
from .components import Component, ShapeRange, added_width, lifted_names
from .export import DEFAULT_OPSET, EXPORT_VERSION, Attention, export_component

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ENGINE_FILE = "engine.plan"

Progress = Callable[[str], None]


class ArtifactBuilder:
    """One loaded pipeline's ONNX graphs and TensorRT engines, from the cache or built into it."""

    def __init__(
        self,
        cache: EngineCache,
        pipe: StableDiffusionPipeline,
        *,
        model_name: str,
        opset: int = DEFAULT_OPSET,
        progress: Progress | None = None,
    ) -> None:
        self.cache = cache
        self.pipe = pipe
        self.model_name = model_name
        self.opset = opset
        self.progress = progress or (lambda stage: None)
        self._fingerprints: dict[int, str] = {}
        """Weights fingerprints by module (the modules live as long as the pipeline)."""
        self.built: list[str] = []
        """Names of the entries this builder built itself (the rest came from the cache)."""

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def module(self, component: Component, module: torch.nn.Module | None = None) -> torch.nn.Module:
        """The module a component's graph is exported from: the pipeline's UNet or VAE, or (for a
        ControlNet, which the pipeline does not hold) the one given."""
        if module is not None:
            return module
        if component is Component.CONTROLNET:
            raise ValueError("a ControlNet's graph is exported from the ControlNet module, which must be given")
        return self.pipe.unet if component in (Component.UNET, Component.UNET_CONTROLLED) else self.pipe.vae

    def fingerprint(self, component: Component, module: torch.nn.Module | None = None) -> str:
        target = self.module(component, module)
        if id(target) not in self._fingerprints:
            self.progress(f"fingerprint {component.value} weights")
            self._fingerprints[id(target)] = fingerprint_module(target)
        return self._fingerprints[id(target)]

    def _notes(self) -> dict[str, object]:
        return {"model": self.model_name, "device": str(self.device), "torch": torch.__version__}

    def onnx_key(
        self, component: Component, module: torch.nn.Module | None = None, attention: Attention = "standard", lifted: Sequence[str] = ()
    ) -> EngineKey:
        return EngineKey(
            kind="onnx",
            component=component.value,
            weights=self.fingerprint(component, module),
            export_version=EXPORT_VERSION,
            opset=self.opset,
            dtype=str(self.module(component, module).dtype).removeprefix("torch."),
            attention=attention,
            lifted=hashlib.sha256("\n".join(lifted).encode()).hexdigest()[:24] if lifted else None,
        )

    def onnx(
        self,
        component: Component,
        allow_build: bool = True,
        module: torch.nn.Module | None = None,
        attention: Attention = "standard",
        lifted: Sequence[str] = (),
    ) -> Entry:
        """`component`'s ONNX graph (`module`: the ControlNet, for Component.CONTROLNET), its attention
        as standard operators (portable: TensorRT builds from these) or fused for ONNX Runtime, and the
        UNet weights named in `lifted` as inputs."""
        key = self.onnx_key(component, module, attention, lifted)

        def build(directory: Path) -> dict[str, object]:
            self.progress(f"export {component.value} to ONNX" + (" (LoRA weights as inputs)" if lifted else ""))
            export_component(
                self.pipe, component, directory / ONNX_FILE, opset=self.opset, module=module, attention=attention, lifted=lifted
            )
            self.built.append(key.name)
            return self._notes()

        return self.cache.get_or_build(key, build if allow_build else None)

    def tensorrt_key(
        self, component: Component, shapes: ShapeRange, module: torch.nn.Module | None = None, lifted: Sequence[str] = ()
    ) -> EngineKey:
        from .tensorrt_backend import tensorrt_environment

        onnx_key = self.onnx_key(component, module, lifted=lifted)
        return EngineKey(
            kind="tensorrt",
            component=component.value,
            weights=onnx_key.weights,
            export_version=EXPORT_VERSION,
            opset=self.opset,
            dtype=onnx_key.dtype,
            lifted=onnx_key.lifted,
            min_side=shapes.min_side,
            opt_side=shapes.opt_side,
            max_side=shapes.max_side,
            min_batch=shapes.min_batch,
            opt_batch=shapes.opt_batch,
            max_batch=shapes.max_batch,
            **tensorrt_environment(self.device),
        )

    def tensorrt_profile(
        self, component: Component, shapes: ShapeRange, module: torch.nn.Module | None = None, lifted: Sequence[str] = ()
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """The optimisation profile of `component`'s engine: every input's (min, opt, max) shape."""
        unet = self.pipe.unet
        parameters = dict(unet.named_parameters()) if lifted else {}
        return shapes.profile(
            component,
            text_length=self.pipe.tokenizer.model_max_length,
            text_width=unet.config.cross_attention_dim,
            pooled_width=added_width(unet.config),
            unet_config=unet.config,
            conditioning_channels=module.config.conditioning_channels if component is Component.CONTROLNET and module is not None else None,
            lifted={name: tuple(parameters[weight].shape) for name, weight in zip(lifted_names(len(lifted)), lifted)},
        )

    def tensorrt(
        self,
        component: Component,
        shapes: ShapeRange,
        allow_build: bool = False,
        module: torch.nn.Module | None = None,
        lifted: Sequence[str] = (),
    ) -> Entry:
        """`component`'s TensorRT engine for `shapes`, built from its standard-attention ONNX graph
        (`module` and `lifted` as for `onnx`)."""
        from .tensorrt_backend import build_engine, tensorrt_environment

        key = self.tensorrt_key(component, shapes, module, lifted)

        def build(directory: Path) -> dict[str, object]:
            graph = self.onnx(component, allow_build=True, module=module, lifted=lifted)
            self.progress(f"build {component.value} TensorRT engine")
            build_engine(
                graph.file(ONNX_FILE),
                directory / ENGINE_FILE,
                self.tensorrt_profile(component, shapes, module, lifted),
                fp16=key.dtype == "float16",
                timing_cache=self.cache.timing_cache(tensorrt_environment(self.device)),
                progress=lambda step: self.progress(f"build {component.value} TensorRT engine: {step}"),
            )
            self.built.append(key.name)
            return {**self._notes(), "onnx": graph.key.name}

        return self.cache.get_or_build(key, build if allow_build else None)
