"""Which implementation runs the stream's UNet and VAE: eager torch, torch.compile, ONNX Runtime or
TensorRT.

Only the component calls change between backends; StreamDiffusion's loop (stream batch, residual CFG,
the similar-image filter, each session's state) is the same on all of them. `prepare_backend` runs once
at start-up:

- an explicitly requested backend that cannot run is a `BackendUnavailable` error naming what is
  missing, never a silent fallback;
- `auto` takes TensorRT on CUDA when the `tensorrt` package imports and the engines are cached (or
  `build_engines` allows building them), else ONNX Runtime when a measurement on this machine says it is
  faster than torch, else torch. Every step down is logged with its reason and kept in
  `Backend.fallbacks` (shown in /v1/info).

ONNX graphs are exported on demand (seconds, cached); TensorRT engines take minutes per component and
are built only when asked (`streamcanvas engines build`, or `serve --build-engines`).
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from streamcanvas.trt_engines.builder import ENGINE_FILE, ONNX_FILE, ArtifactBuilder
from streamcanvas.trt_engines.cache import CacheError, EngineCache, Entry, EntryMissing
from streamcanvas.trt_engines.components import (
    STREAM_COMPONENTS,
    CompiledControlNet,
    CompiledUNet,
    CompiledVae,
    Component,
    ShapeRange,
    added_width,
    size_ids,
)
from streamcanvas.trt_engines.export import side_multiple
from streamcanvas.trt_engines.onnxruntime_backend import (
    GraphLoadError,
    OnnxRuntimeRunner,
    OnnxRuntimeUnavailable,
    check_dtype,
    providers_for,
)
from streamcanvas.trt_engines.tensorrt_backend import (
    EngineBuildError,
    TensorRTRunner,
    TensorRTUnavailable,
    tensorrt_unavailable_reason,
)

from .errors import BackendUnavailable
from .paths import default_engine_dir

if TYPE_CHECKING:
    from .loading import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Backend", "BackendConfig", "BackendName", "ExtraArtifact", "ShapeRange", "extra_artifacts", "prepare_backend"]

BackendName = Literal["auto", "torch", "compile", "onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(BackendName)

MEASURE_ROUNDS = 5
MEASURE_BUDGET_S = 10.0
"""`auto` stops measuring after this long (at least one round): a full-size model on a CPU takes seconds a call."""


@dataclass(frozen=True)
class BackendConfig:
    name: BackendName = "torch"
    engine_dir: Path | None = None
    build_engines: bool = False
    """Build missing TensorRT engines at start-up (minutes per component on a real model)."""
    shapes: ShapeRange = ShapeRange()
    """Sizes and UNet batches TensorRT engines are built for (ONNX graphs take any)."""
    threads: int = 1
    """ONNX Runtime intra-op threads, shared by every slot."""
    measure_side: int = 512
    """Image side `auto` measures ONNX Runtime against torch at (the default session size)."""
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    @property
    def cache(self) -> EngineCache:
        return EngineCache(self.engine_dir or default_engine_dir())


@dataclass
class Backend:
    """The backend a model runs on, why, and its compiled components (None for eager torch)."""

    name: str
    requested: str
    reason: str
    fallbacks: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()
    unet: Any = None
    vae: Any = None
    shapes: ShapeRange | None = None
    """Sizes and batches the compiled components accept; None: any (sides still need `side_multiple`)."""
    side_multiple: int = 8
    measurement: dict[str, float] | None = None
    controlnets: dict[str, Any] = field(default_factory=dict)
    """Compiled ControlNets by name; with them `unet` takes their residuals too."""

    @property
    def takes_loras(self) -> bool:
        """Whether streams with LoRAs run the compiled UNet (graphs that take the LoRA-merged weights as
        inputs; else their UNet runs on torch)."""
        return bool(getattr(self.unet, "takes_loras", False))

    @property
    def takes_controls(self) -> bool:
        """Whether streams with ControlNets run them and the UNet compiled (else both run on torch)."""
        return bool(self.controlnets)

    def compiled_for(self, width: int, height: int, unet_batch: int) -> tuple[Any, Any] | None:
        """The (unet, vae) to use for a stream of this size, or None where eager torch must run it."""
        if self.unet is None:
            return None
        if width % self.side_multiple or height % self.side_multiple:
            return None
        if self.shapes is not None and not self.shapes.covers(width, height, unet_batch):
            return None
        return self.unet, self.vae

    @property
    def max_batch(self) -> int | None:
        """The largest batch its compiled components accept (TensorRT's profile), None for any."""
        return self.shapes.max_batch if self.unet is not None and self.shapes is not None else None

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "name": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "fallbacks": list(self.fallbacks),
            "engines": list(self.engines),
            "side_multiple": self.side_multiple,
            "controlnets": list(self.controlnets),
            "takes_loras": self.takes_loras,
        }
        if self.shapes is not None:
            described["shapes"] = {
                "sides": [self.shapes.min_side, self.shapes.max_side],
                "unet_batch": [self.shapes.min_batch, self.shapes.max_batch],
            }
        if self.measurement is not None:
            described["measurement"] = self.measurement
        return described


def eager_backend(reason: str = "requested") -> Backend:
    return Backend(name="torch", requested="torch", reason=reason)


def prepare_backend(model: LoadedModel, config: BackendConfig) -> Backend:
    """Set up the configured backend for `model` (blocking: export, engine loading, measurement)."""
    if config.name == "torch":
        return eager_backend()
    if config.name == "compile":
        return _compiled_by_torch(model)
    if config.name == "onnxruntime":
        return _onnxruntime(model, config, requested="onnxruntime")
    if config.name == "tensorrt":
        return _tensorrt(model, config, requested="tensorrt")
    return _auto(model, config)


def _auto(model: LoadedModel, config: BackendConfig) -> Backend:
    fallbacks: list[str] = []

    def fall_back(backend: str, reason: str) -> None:
        logger.warning("backend auto: not %s: %s", backend, reason)
        fallbacks.append(f"{backend}: {reason}")

    device = model.placement.device
    unavailable = tensorrt_unavailable_reason(device)
    if unavailable is None:
        try:
            backend = _tensorrt(model, config, requested="auto")
        except BackendUnavailable as error:
            fall_back("tensorrt", str(error))
        else:
            logger.info("backend auto: tensorrt (%s)", backend.reason)
            return backend
    else:
        fall_back("tensorrt", unavailable)
    try:
        backend = _onnxruntime(model, config, requested="auto")
    except BackendUnavailable as error:
        fall_back("onnxruntime", str(error))
    else:
        backend.measurement = measure(model, backend, config.measure_side)
        torch_ms, onnx_ms = backend.measurement["torch_ms"], backend.measurement["onnxruntime_ms"]
        comparison = (
            f"{onnx_ms:.1f} ms vs torch {torch_ms:.1f} ms for one frame's UNet and VAE calls "
            f"at {backend.measurement['side']:.0f}² on this machine ({torch_ms / onnx_ms:.2f}x)"
        )
        if onnx_ms < torch_ms:
            backend.reason = f"measured faster: {comparison}"
            backend.fallbacks = tuple(fallbacks)
            logger.info("backend auto: onnxruntime, %s", backend.reason)
            return backend
        fall_back("onnxruntime", f"measured slower: {comparison}")
    logger.info("backend auto: torch (eager)")
    chosen = eager_backend(reason="fallback: " + fallbacks[-1])
    chosen.requested = "auto"
    chosen.fallbacks = tuple(fallbacks)
    return chosen


def _onnxruntime(model: LoadedModel, config: BackendConfig, requested: str) -> Backend:
    device, dtype = model.placement.device, model.placement.dtype
    try:
        check_dtype(dtype)
        providers_for(device)  # before exporting anything: is there a provider for this device at all?
        cache = config.cache
        builder = ArtifactBuilder(cache, model.pipe, model_name=model.name)

        def load(entry: Entry) -> OnnxRuntimeRunner:
            return OnnxRuntimeRunner(entry.file(ONNX_FILE), device, threads=config.threads)

        # ONNX Runtime runs the graphs written with its fused attention operator (export.Attention).
        graph = functools.partial(builder.onnx, attention="fused")
        runners, names = _load_runners(cache, graph, load, (GraphLoadError,), STREAM_COMPONENTS)
        extras = _controls_and_loras(model, cache, graph, load, (GraphLoadError,))
    except (OnnxRuntimeUnavailable, GraphLoadError, CacheError, OSError) as error:
        raise BackendUnavailable(f"onnxruntime cannot run here: {error}") from error
    return extras.backend(model, "onnxruntime", requested, runners, names, reason="requested")


@dataclass
class _Extras:
    """The compiled graphs (or engines) for ControlNets and LoRAs, beside a backend's stream components."""

    runners: dict[Component, Any] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)
    loras: dict[str, Any] = field(default_factory=dict)
    """CompiledUNet's `lifted`, `lifted_runner` and `lifted_controlled`; empty without LoRA graphs."""
    names: tuple[str, ...] = ()

    def backend(
        self, model: LoadedModel, name: str, requested: str, runners: dict[Component, Any], names: tuple[str, ...], reason: str
    ) -> Backend:
        return _compiled_backend(
            model, name, requested, {**runners, **self.runners}, names + self.names, reason, self.controlnets, **self.loras
        )


@dataclass(frozen=True)
class ExtraArtifact:
    """A graph (or engine) a model's ControlNets or LoRAs add to the stream's three: `component`, from
    `module` (a ControlNet) or the UNet, with the UNet weights in `lifted` as inputs; `controlnet` names
    the ControlNet it is."""

    component: Component
    module: torch.nn.Module | None = None
    lifted: tuple[str, ...] = ()
    controlnet: str | None = None


def extra_artifacts(model: LoadedModel) -> list[ExtraArtifact]:
    """With ControlNets loaded: the UNet that takes their residuals, and one graph each. With named
    LoRAs: the UNet again (and the controlled one), with the weights the LoRAs change as inputs."""
    extras = []
    unets = [Component.UNET]
    if model.controlnets.names:
        unets.append(Component.UNET_CONTROLLED)
        extras.append(ExtraArtifact(Component.UNET_CONTROLLED))
        extras += [ExtraArtifact(Component.CONTROLNET, model.controlnets.get(name), controlnet=name) for name in model.controlnets.names]
    lifted = model.adapters.lifted()
    if lifted:
        extras += [ExtraArtifact(component, lifted=lifted) for component in unets]
    return extras


def _controls_and_loras(
    model: LoadedModel,
    cache: EngineCache,
    fetch: Callable[..., Entry],
    load: Callable[[Entry], Any],
    loader_errors: tuple[type[BaseException], ...],
) -> _Extras:
    """The runners of `extra_artifacts`, in their places: the controlled UNet, the ControlNets, and the
    LoRA graphs bound at each call to the weights merged for the caller's LoRAs. `fetch(component,
    module=None, lifted=())` gets an entry, as `ArtifactBuilder.onnx` or `.tensorrt` do."""
    extras = _Extras()
    lifted_runners: dict[Component, Any] = {}
    lifted: tuple[str, ...] = ()
    for artifact in extra_artifacts(model):
        get = functools.partial(fetch, module=artifact.module, lifted=artifact.lifted)
        loaded, names = _load_runners(cache, get, load, loader_errors, (artifact.component,))
        runner = loaded[artifact.component]
        extras.names += names
        if artifact.lifted:
            lifted, lifted_runners[artifact.component] = artifact.lifted, runner
        elif artifact.controlnet is not None:
            extras.controlnets[artifact.controlnet] = CompiledControlNet(runner, model.placement.dtype, model.pipe.unet.config)
        else:
            extras.runners[artifact.component] = runner
    if lifted_runners:
        adapters = model.adapters

        def merged_weights() -> list[torch.Tensor] | None:
            wanted = adapters.current()
            return adapters.merged(wanted, lifted) if wanted else None

        extras.loras = {
            "lifted": merged_weights,
            "lifted_runner": lifted_runners[Component.UNET],
            "lifted_controlled": lifted_runners.get(Component.UNET_CONTROLLED),
        }
    return extras


def _tensorrt(model: LoadedModel, config: BackendConfig, requested: str) -> Backend:
    device = model.placement.device
    unavailable = tensorrt_unavailable_reason(device)
    if unavailable is not None:
        raise BackendUnavailable(f"tensorrt cannot run here: {unavailable}")
    cache, shapes = config.cache, config.shapes
    builder = ArtifactBuilder(cache, model.pipe, model_name=model.name)

    def fetch(component: Component, module: torch.nn.Module | None = None, lifted: Sequence[str] = ()) -> Entry:
        return builder.tensorrt(component, shapes, allow_build=config.build_engines, module=module, lifted=lifted)

    def load(entry: Entry) -> TensorRTRunner:
        return TensorRTRunner(entry.file(ENGINE_FILE), device, cuda_graphs=config.cuda_graphs)

    try:
        runners, names = _load_runners(cache, fetch, load, (EngineBuildError,), STREAM_COMPONENTS)
        extras = _controls_and_loras(model, cache, fetch, load, (EngineBuildError,))
    except EntryMissing as error:
        raise BackendUnavailable(
            f"{error}. Build the engines with `streamcanvas engines build --backend tensorrt "
            f"{_model_arguments(model)}--resolution {shapes.opt_side}x{shapes.opt_side} "
            f"--max-resolution {shapes.max_side}x{shapes.max_side} --engine-min-resolution {shapes.min_side} "
            f"--engine-max-batch {shapes.max_batch}`, or start the server with --build-engines"
        ) from None
    except (CacheError, EngineBuildError, TensorRTUnavailable, OSError) as error:
        raise BackendUnavailable(f"tensorrt engines could not be prepared: {error}") from error
    reason = "requested" if requested == "tensorrt" else "the tensorrt package imports and the engines are built"
    backend = extras.backend(model, "tensorrt", requested, runners, names, reason)
    backend.shapes = shapes
    return backend


def _model_arguments(model: LoadedModel) -> str:
    """The build command's model options (the engines are keyed by the weights these load)."""
    arguments = "" if model.is_test_model else f"--model {model.name} "
    if model.lora is not None:
        arguments += f"--lora {model.lora} "
    arguments += "".join(f"--lora {name}={path} " for name, path in model.adapters.paths.items())
    arguments += "".join(f"--controlnet {name}={path} " for name, path in model.controlnets.paths.items())
    return arguments + f"--dtype {str(model.placement.dtype).removeprefix('torch.')} "


def _load_runners(
    cache: EngineCache,
    fetch: Callable[[Component], Entry],
    load: Callable[[Entry], Any],
    loader_errors: tuple[type[BaseException], ...],
    components: tuple[Component, ...],
) -> tuple[dict[Component, Any], tuple[str, ...]]:
    """These components' runners, loaded from their cache entries, and the entries' names.

    An entry the runtime refuses although it passed its checksum (written by another version, say) is
    removed, fetched again (rebuilt in the same place) and loaded once more."""
    runners: dict[Component, Any] = {}
    names = []
    for component in components:
        entry = fetch(component)
        try:
            runners[component] = load(entry)
        except loader_errors as error:
            logger.warning("%s could not be loaded (%s); rebuilding it", entry.path.name, error)
            cache.remove(entry.path)
            entry = fetch(component)
            runners[component] = load(entry)
        names.append(entry.key.name)
    return runners, tuple(names)


def _compiled_backend(
    model: LoadedModel,
    name: str,
    requested: str,
    runners: dict[Component, Any],
    engines: tuple[str, ...],
    reason: str,
    controlnets: dict[str, Any] | None = None,
    **loras: Any,
) -> Backend:
    """`loras`: CompiledUNet's `lifted`, `lifted_runner` and `lifted_controlled`, for streams with LoRAs."""
    pipe, dtype = model.pipe, model.placement.dtype
    return Backend(
        name=name,
        requested=requested,
        reason=reason,
        engines=engines,
        unet=CompiledUNet(runners[Component.UNET], dtype, controlled=runners.get(Component.UNET_CONTROLLED), **loras),
        vae=CompiledVae(runners[Component.VAE_ENCODER], runners[Component.VAE_DECODER], dtype, pipe.vae.config.scaling_factor),
        side_multiple=side_multiple(pipe),
        controlnets=controlnets or {},
    )


class _TorchCompiledVae:
    """A VAE whose encode and decode go through torch.compile (the shared module itself is left as it is)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.encode = torch.compile(vae.encode)
        self.decode = torch.compile(vae.decode)
        self.dtype = vae.dtype
        self.config = vae.config


def _compiled_by_torch(model: LoadedModel) -> Backend:
    return Backend(
        name="compile",
        requested="compile",
        reason="requested (each new shape compiles on first use: about a minute on a CPU)",
        unet=torch.compile(model.pipe.unet),
        vae=_TorchCompiledVae(model.pipe.vae),
    )


@torch.no_grad()
def measure(model: LoadedModel, backend: Backend, side: int, rounds: int = MEASURE_ROUNDS) -> dict[str, float]:
    """Median milliseconds of one frame's component calls (VAE encode, UNet at batch 2, VAE decode),
    eager torch against `backend`, in alternating rounds after one warm-up each (up to `rounds`, fewer
    once MEASURE_BUDGET_S has passed)."""
    pipe, placement = model.pipe, model.placement
    side = max(backend.side_multiple, side - side % backend.side_multiple)
    latent = side // 8
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, side, side, generator=generator) * 2 - 1).to(placement.device, placement.dtype)
    latents = torch.randn(2, 4, latent, latent, generator=generator).to(placement.device, placement.dtype)
    timesteps = torch.tensor([500, 800], device=placement.device)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator).to(placement.device, placement.dtype)
    added: dict[str, Any] = {}
    pooled = added_width(pipe.unet.config)
    if pooled is not None:  # SDXL's added conditioning: a pooled text embedding and the size ids
        text_embeds = torch.randn(2, pooled, generator=generator).to(placement.device, placement.dtype)
        added = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": size_ids(side, side, 2, placement.device, placement.dtype)}}

    def frame(unet: Any, vae: Any) -> float:
        started = time.perf_counter()
        vae.encode(image)
        unet(latents, timesteps, encoder_hidden_states=text, return_dict=False, **added)
        vae.decode(latents[:1], return_dict=False)
        if placement.device.type == "cuda":
            torch.cuda.synchronize(placement.device)
        return (time.perf_counter() - started) * 1000

    contenders = {"torch": (pipe.unet, pipe.vae), backend.name: (backend.unet, backend.vae)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, (unet, vae) in contenders.items():
        frame(unet, vae)  # warm-up
    started = time.perf_counter()
    for done in range(rounds):
        if done and time.perf_counter() - started > MEASURE_BUDGET_S:
            break
        for name, (unet, vae) in contenders.items():
            times[name].append(frame(unet, vae))
    return {"side": float(side), **{f"{name}_ms": round(statistics.median(values), 2) for name, values in times.items()}}
