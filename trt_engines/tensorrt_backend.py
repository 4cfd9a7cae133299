"""TensorRT engines for the exported components: building them from ONNX graphs, and running them on
torch tensors.

`build_engine` turns one ONNX graph into a serialized engine (a plan) for one optimisation profile,
keeping TensorRT's timing cache in a file so later builds on the same GPU skip the kernel timings they
already made. `TensorRTRunner` runs a plan; see `trt_engines.components.Runner`. Inputs and the output
are bound by address: TensorRT reads the caller's tensors and writes into a torch tensor, so a call
copies nothing when its inputs are contiguous and of the engine's types.

Uses the TensorRT 10 API (tensors by name: `set_input_shape`, `set_tensor_address`,
`execute_async_v3`) and nothing TensorRT 11 removed. TensorRT 11 types every network strongly: there an
engine's precision is the ONNX graph's own, so a float16 engine needs a graph exported in float16.
`tensorrt` is an optional extra (`pip install 'streamcanvas[tensorrt]'`) and needs a CUDA GPU; this
module imports it only inside functions, so it imports anywhere.

Each runner runs its engine on a stream of its own, ordered after the caller's current stream and before
whatever the caller enqueues next: TensorRT synchronizes the whole device when given the default stream,
which is where torch's work goes unless told otherwise. One runner may be called from several threads:
its calls take turns (one execution context must not be used by two threads at once), and all of its
work goes to its one stream, so the device memory its contexts share is never used by two runs at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = "pip install 'streamcanvas[tensorrt]'"

MAX_CUDA_GRAPHS = 8
"""CUDA graphs one runner keeps (one per input-shape signature); further signatures run uncaptured."""

ProfileShapes = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


class EngineBuildError(Exception):
    """An engine could not be built, or a plan file cannot be loaded on this GPU and TensorRT version."""


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot run on the requested device (see `tensorrt_unavailable_reason`)."""


def _import_tensorrt() -> Any:
    import tensorrt

    return tensorrt


def _require_tensorrt() -> Any:
    """The tensorrt module; TensorRTUnavailable when it is not installed or does not import."""
    try:
        return _import_tensorrt()
    except ModuleNotFoundError as error:
        if error.name == "tensorrt":
            raise TensorRTUnavailable(f"the tensorrt package is not installed ({INSTALL_HINT})") from error
        raise TensorRTUnavailable(f"the tensorrt package cannot be imported: {error}") from error
    except (ImportError, OSError) as error:
        raise TensorRTUnavailable(f"the tensorrt package cannot be imported: {error}") from error


def tensorrt_unavailable_reason(device: torch.device) -> str | None:
    """None when TensorRT can run on `device`, else a sentence naming what is missing."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"device {device} does not exist (torch sees {count} CUDA GPU{'s' if count != 1 else ''})"
    try:
        trt = _import_tensorrt()
    except ModuleNotFoundError as error:
        if error.name == "tensorrt":
            return f"the tensorrt package is not installed ({INSTALL_HINT})"
        return f"the tensorrt package cannot be imported: {error}"
    except (ImportError, OSError) as error:  # a wheel without its libraries (libnvinfer) or CUDA runtime
        return f"the tensorrt package cannot be imported: {error}"
    version = getattr(trt, "__version__", "0")
    if _major(version) < MIN_TENSORRT_MAJOR:
        return f"tensorrt {version} is too old: {MIN_TENSORRT_MAJOR} or newer is needed ({INSTALL_HINT})"
    return None


def tensorrt_environment(device: torch.device) -> dict[str, str]:
    """What an engine is tied to besides its graph and shapes: TensorRT version, GPU and CUDA version.

    A plan only loads with the TensorRT version that built it and runs best (often only) on the GPU
    model it was timed on, so these belong in an engine's cache key.
    """
    device = _cuda_device(device)
    trt = _require_tensorrt()
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "tensorrt": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "cuda": str(torch.version.cuda),
    }


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: ProfileShapes,
    *,
    fp16: bool,
    timing_cache: Path | None,
    progress: Callable[[str], None] | None = None,
    workspace_bytes: int | None = None,
) -> None:
    """Build a TensorRT engine from the ONNX graph `onnx_path` and write its plan to `engine_path`.

    `profile` gives every graph input's (min, opt, max) shape (see `ShapeRange.profile`); the engine
    accepts exactly those ranges. The engine is built for the current CUDA device. `fp16` lets TensorRT 10
    pick float16 kernels; TensorRT 11 always follows the graph's own types. `timing_cache` (a file,
    created when missing) is loaded before the build and written back after it. `progress` receives
    lines such as "Building engine 3/7" while the build runs; an exception it raises cancels the build
    and is raised here. `workspace_bytes` caps TensorRT's scratch memory (default: TensorRT's).

    The plan is written to `engine_path` as it is: renaming it into place and locking are the caller's.
    Raises EngineBuildError when the graph cannot be parsed or TensorRT cannot build it.
    """
    trt = _require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path} does not exist")
    trt_logger = _logger()
    builder = trt.Builder(trt_logger)
    # Explicit batch is the only mode in TensorRT 10 (the flag is deprecated); 11 types every network
    # strongly whatever the flags say.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse) so that weights kept in a `.data` file beside the graph are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(index)) for index in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: " + ("; ".join(errors) or "no error reported"))
    _check_profile_inputs(network, profile, onnx_path)

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
        if fp16_flag is not None:
            config.set_flag(fp16_flag)
        elif not _has_half_input(trt, network):
            raise EngineBuildError(
                f"TensorRT {trt.__version__} builds engines in the ONNX graph's own types, and {onnx_path.name} "
                "takes float32 inputs: export the graph in float16 for a float16 engine"
            )

    optimisation_profile = builder.create_optimization_profile()
    for name, (minimum, optimum, maximum) in profile.items():
        optimisation_profile.set_shape(name, tuple(minimum), tuple(optimum), tuple(maximum))
    if config.add_optimization_profile(optimisation_profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimisation profile {dict(profile)} for {onnx_path.name}")

    cache = _attach_timing_cache(config, timing_cache)
    monitor = _progress_monitor(trt, progress) if progress is not None else None
    if monitor is not None:
        config.progress_monitor = monitor  # `monitor` stays referenced here until the build returns
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.error is not None:
        raise monitor.error
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    if timing_cache is not None and cache is not None:
        _write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(plan))


class TensorRTRunner:
    """Runs one TensorRT engine; see `trt_engines.components.Runner`.

    With `cuda_graphs`, the first call for each input-shape signature runs normally and then records its
    launch in a CUDA graph; later calls with the same shapes copy their inputs into that graph's fixed
    buffers and replay it. That saves the per-call cost of launching the engine's kernels one by one from
    the CPU (most of the time a small engine takes), at one copy of the inputs and the output per call.
    """

    def __init__(self, engine_path: Path, device: torch.device, cuda_graphs: bool = False) -> None:
        self.device = _cuda_device(device)
        trt = _require_tensorrt()
        self.engine_path = Path(engine_path)
        self.cuda_graphs = cuda_graphs
        self._trt = trt
        self._lock = threading.Lock()
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(_logger())
            try:
                engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            except RuntimeError as error:  # the bindings raise for some corrupt plans, return None for others
                logger.warning("deserializing %s: %s", self.engine_path, error)
                engine = None
            if engine is None:
                raise EngineBuildError(
                    f"{self.engine_path} cannot be deserialized (built by another TensorRT version or GPU?)"
                )
            names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
            inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
            outputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
            if not outputs:
                raise EngineBuildError(f"{self.engine_path} has no outputs")
            self.input_names: tuple[str, ...] = tuple(inputs)
            self.output_names: tuple[str, ...] = tuple(outputs)
            self.output_name: str = outputs[0]
            """The output `__call__` returns (engines with several outputs, ControlNets', use `run_many`)."""
            self.input_dtypes = {name: _torch_dtype(trt, engine.get_tensor_dtype(name)) for name in inputs}
            self.output_dtypes = {name: _torch_dtype(trt, engine.get_tensor_dtype(name)) for name in outputs}
            self.output_dtype = self.output_dtypes[self.output_name]
            self.input_ranges = {name: _profile_range(engine, name) for name in inputs}
            # One block of device memory for every context of this engine: runs take turns on one stream.
            size = int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size)
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            self._stream = torch.cuda.Stream(self.device)
            # Kept in this order so that, released in the same order, no context outlives its engine and
            # no engine its runtime.
            self._graphs: dict[tuple[tuple[int, ...], ...], _CapturedRun | None] = {}
            self._context = self._new_context(engine)
            self._engine = engine
            self._runtime = runtime
        self._closed = False

    def __call__(
        self, feeds: Mapping[str, torch.Tensor], output_shape: Sequence[int], output_dtype: torch.dtype
    ) -> torch.Tensor:
        if len(self.output_names) != 1:
            raise ValueError(f"{self.engine_path.name} has {len(self.output_names)} outputs; use run_many")
        inputs = self._inputs(feeds)
        output = torch.empty(tuple(output_shape), dtype=self.output_dtype, device=self.device)
        signature = tuple(tuple(tensor.shape) for tensor in inputs.values())
        with self._turn():
            if self.cuda_graphs:
                self._run_with_graph(signature, inputs, output)
            else:
                self._run(self._context, inputs, {self.output_name: output})
        return output if output.dtype == output_dtype else output.to(output_dtype)

    def run_many(
        self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, Sequence[int]], output_dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Every output of the engine ({name: shape} in, {name: tensor} out), as a ControlNet's residuals
        are; not captured in CUDA graphs."""
        if set(outputs) != set(self.output_names):
            raise ValueError(f"{self.engine_path.name} has outputs {', '.join(self.output_names)}, not {', '.join(outputs)}")
        inputs = self._inputs(feeds)
        results = {
            name: torch.empty(tuple(shape), dtype=self.output_dtypes[name], device=self.device) for name, shape in outputs.items()
        }
        with self._turn():
            self._run(self._context, inputs, results)
        return {name: tensor if tensor.dtype == output_dtype else tensor.to(output_dtype) for name, tensor in results.items()}

    def _inputs(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The feeds in the engine's input order and types, contiguous, each checked against the profile."""
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise ValueError(f"{self.engine_path.name} has no input {', '.join(sorted(unknown))}; it takes {', '.join(self.input_names)}")
        # Everything a call allocates is allocated on the caller's stream, before the runner's stream
        # waits for it: when the caller frees a tensor, its memory is reused only behind this run.
        inputs: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                raise ValueError(f"{self.engine_path.name} needs input {name!r}")
            tensor = feeds[name]
            if tensor.device != self.device:
                raise ValueError(f"input {name!r} is on {tensor.device}; this engine runs on {self.device}")
            inputs[name] = tensor.to(self.input_dtypes[name]).contiguous()
            self._check_shape(name, tuple(inputs[name].shape))
        return inputs

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """This call's turn on the runner's stream: after the caller's work, before what it does next."""
        caller = torch.cuda.current_stream(self.device)
        with self._lock, torch.cuda.device(self.device):
            if self._closed:
                raise RuntimeError(f"the runner for {self.engine_path.name} is closed")
            self._stream.wait_stream(caller)
            try:
                yield
            finally:
                caller.wait_stream(self._stream)

    def close(self) -> None:
        """Release the engine, its contexts, graphs and device memory (further calls raise)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stream.synchronize()
            self._graphs.clear()
            del self._context, self._engine, self._runtime, self._scratch

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        minimum, maximum = self.input_ranges[name]
        inside = len(shape) == len(minimum) and all(low <= size <= high for low, size, high in zip(minimum, shape, maximum))
        if not inside:
            raise ValueError(
                f"input {name!r} has shape {shape}, outside the range {self.engine_path.name} was built for: "
                f"{minimum} to {maximum}"
            )

    def _new_context(self, engine: Any) -> Any:
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = engine.create_execution_context(strategy)
        if context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for {self.engine_path.name}")
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        else:  # TensorRT 10.0
            context.device_memory = self._scratch.data_ptr()
        return context

    def _bind(self, context: Any, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"TensorRT refused shape {tuple(tensor.shape)} for input {name!r} of {self.engine_path.name}")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of input {name!r} of {self.engine_path.name}")
        for name, output in outputs.items():
            produced = tuple(context.get_tensor_shape(name))
            if produced != tuple(output.shape):
                raise ValueError(
                    f"{self.engine_path.name} produces {name!r} of shape {produced} for these inputs, "
                    f"not the {tuple(output.shape)} asked for"
                )
            if not context.set_tensor_address(name, output.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of output {name!r} of {self.engine_path.name}")

    def _enqueue(self, context: Any) -> None:
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not run {self.engine_path.name} (its log says why)")

    def _run(self, context: Any, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        self._bind(context, inputs, outputs)
        self._enqueue(context)

    def _run_with_graph(
        self, signature: tuple[tuple[int, ...], ...], inputs: Mapping[str, torch.Tensor], output: torch.Tensor
    ) -> None:
        if signature not in self._graphs:
            if len(self._graphs) >= MAX_CUDA_GRAPHS:
                self._run(self._context, inputs, {self.output_name: output})
                return
            self._graphs[signature] = self._capture(inputs, output)
            return  # _capture's normal run has produced this call's output
        captured = self._graphs[signature]
        if captured is None:  # this engine cannot be captured at these shapes
            self._run(self._context, inputs, {self.output_name: output})
            return
        if captured.output.shape != output.shape:
            raise ValueError(
                f"{self.engine_path.name} produces {self.output_name!r} of shape {tuple(captured.output.shape)} "
                f"for these inputs, not the {tuple(output.shape)} asked for"
            )
        with torch.cuda.stream(self._stream):
            for name, tensor in inputs.items():
                captured.inputs[name].copy_(tensor)
            captured.graph.replay()
            output.copy_(captured.output)

    def _capture(self, inputs: Mapping[str, torch.Tensor], output: torch.Tensor) -> _CapturedRun | None:
        """Run once on a context of its own with fixed buffers (this call's result), then record that launch."""
        context = self._new_context(self._engine)
        with torch.cuda.stream(self._stream):
            static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
            static_output = torch.empty_like(output)
            self._run(context, static_inputs, {self.output_name: static_output})
            output.copy_(static_output)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads may keep using the device (allocating included) while this one
            # captures; only this thread's calls are checked for what a capture forbids.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._enqueue(context)
        except RuntimeError as error:
            logger.warning(
                "%s: cannot capture a CUDA graph for input shapes %s (%s); running these shapes uncaptured",
                self.engine_path.name,
                {name: tuple(tensor.shape) for name, tensor in inputs.items()},
                error,
            )
            return None
        return _CapturedRun(graph=graph, context=context, inputs=static_inputs, output=static_output)


@dataclass
class _CapturedRun:
    """A CUDA graph of one engine launch, with the context and buffers it was recorded with."""

    graph: torch.cuda.CUDAGraph
    context: Any  # must outlive the graph: the recorded kernels use its state
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def _major(version: str) -> int:
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _cuda_device(device: torch.device) -> torch.device:
    """`device` with its index filled in; raises TensorRTUnavailable when TensorRT cannot run there."""
    device = torch.device(device)
    reason = tensorrt_unavailable_reason(device)
    if reason is not None:
        raise TensorRTUnavailable(f"TensorRT cannot run here: {reason}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
    }
    bf16 = getattr(trt.DataType, "BF16", None)
    if bf16 is not None:
        table[bf16] = torch.bfloat16
    if dtype not in table:
        raise EngineBuildError(f"engine tensors of type {dtype} have no torch equivalent here")
    return table[dtype]


def _profile_range(engine: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(min, max) shape of input `name` in the engine's first (only) optimisation profile."""
    fixed = tuple(int(size) for size in engine.get_tensor_shape(name))
    if all(size >= 0 for size in fixed):
        return fixed, fixed
    minimum, _, maximum = engine.get_tensor_profile_shape(name, 0)
    return tuple(int(size) for size in minimum), tuple(int(size) for size in maximum)


def _check_profile_inputs(network: Any, profile: ProfileShapes, onnx_path: Path) -> None:
    names = {network.get_input(index).name for index in range(network.num_inputs)}
    if set(profile) != names:
        raise EngineBuildError(
            f"the profile covers inputs {sorted(profile)} but {onnx_path.name} takes {sorted(names)}"
        )


def _has_half_input(trt: Any, network: Any) -> bool:
    return any(network.get_input(index).dtype == trt.DataType.HALF for index in range(network.num_inputs))


def _parser_error(error: Any) -> str:
    with contextlib.suppress(Exception):
        node = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        where = f" (node {node!r}, {operator})" if node or operator else ""
        return f"{error.desc()}{where}"
    return str(error)


def _attach_timing_cache(config: Any, path: Path | None) -> Any:
    """Give the build the timing cache kept in `path` (a new one if it is missing or unusable)."""
    if path is None:
        return None
    path = Path(path)
    data = b""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
    if data:
        with contextlib.suppress(Exception):  # a truncated or foreign file: TensorRT raises or refuses it
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, False):
                return cache
        logger.warning("timing cache %s does not fit this GPU or TensorRT version; starting a new one", path)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        raise EngineBuildError("TensorRT refused a new, empty timing cache")
    return cache


def _write_atomically(path: Path, data: memoryview) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def _logger() -> Any:
    """TensorRT's messages, sent to this module's logging logger (one for the process, as TensorRT wants)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            trt = _require_tensorrt()

            class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, message: str) -> None:
                    # Called from TensorRT's threads and in C++ that cannot take an exception: never raise.
                    with contextlib.suppress(Exception):
                        level = _LOG_LEVELS.get(int(severity), logging.DEBUG)
                        if level is not None and logger.isEnabledFor(level):
                            logger.log(level, "TensorRT: %s", message)

            _LOGGER = _Logger()
        return _LOGGER


# TensorRT's severities (INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE) as logging levels; VERBOSE is dropped.
_LOG_LEVELS: dict[int, int | None] = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.DEBUG, 4: None}


def _progress_monitor(trt: Any, progress: Callable[[str], None]) -> Any:
    """A `trt.IProgressMonitor` reporting "phase step/steps" lines to `progress`.

    TensorRT calls it from its own threads and cannot take an exception through it: the first exception
    `progress` raises is kept in `.error` and cancels the build (step_complete answers False).
    """

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.error: BaseException | None = None
            self._steps: dict[str, int] = {}
            self._lock = threading.Lock()

        def _report(self, line: str) -> None:
            if self.error is not None:
                return
            try:
                progress(line)
            except BaseException as error:  # noqa: BLE001 - kept, raised by build_engine after the build
                self.error = error

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with contextlib.suppress(Exception), self._lock:
                self._steps[phase_name] = int(num_steps)
                self._report(f"{phase_name} 0/{num_steps}")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with contextlib.suppress(Exception), self._lock:
                self._report(f"{phase_name} {int(step) + 1}/{self._steps.get(phase_name, '?')}")
            return self.error is None

        def phase_finish(self, phase_name: str) -> None:
            with contextlib.suppress(Exception), self._lock:
                self._steps.pop(phase_name, None)

    return _Monitor()
