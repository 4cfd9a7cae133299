"""ONNX Runtime sessions for the exported components, bound directly to torch tensors.

Inputs and the output are bound by address (IO binding), so a call copies nothing on the way in or
out: the output is a torch tensor ONNX Runtime writes into. One session per component is shared by every
slot (`InferenceSession.run` may be called from several threads at once); its intra-op thread pool is
sized once for the whole process, so several slots on a few cores do not oversubscribe them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as _state

logger = logging.getLogger(__name__)

_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


# What InferenceSession raises for a file it cannot use (none of them derive from one another).
_LOAD_ERRORS = (_state.Fail, _state.InvalidProtobuf, _state.InvalidGraph, _state.NoSuchFile, _state.InvalidArgument, _state.NotImplemented)


class OnnxRuntimeUnavailable(Exception):
    """The requested execution provider or dtype cannot run here."""


class GraphLoadError(Exception):
    """ONNX Runtime refused a graph file (corrupt, or written for an opset or operator it lacks)."""


def providers_for(device: torch.device) -> list[str | tuple[str, dict[str, object]]]:
    """CPU on the CPU; on CUDA the CUDA provider (it needs the onnxruntime-gpu build)."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise OnnxRuntimeUnavailable(
            f"this onnxruntime build has no CUDA provider (has {', '.join(available)}); "
            "install onnxruntime-gpu to run ONNX Runtime on the GPU"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16):
        raise OnnxRuntimeUnavailable(f"{str(dtype).removeprefix('torch.')} is not supported here; use float32 or float16")


class OnnxRuntimeRunner:
    """Runs one ONNX graph; see `trt_engines.components.Runner`."""

    def __init__(self, path: Path, device: torch.device, threads: int, spinning: bool = False) -> None:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning workers answer sooner in isolation but burn their cores between calls, which the event
        # loop, the codecs and torch's own threads need: with spinning, whole frames of the tiny model at
        # 256² took 175 ms instead of 72 ms on a 2-core machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3
        self.device = device
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers_for(device))
        except _LOAD_ERRORS as error:
            raise GraphLoadError(f"{path}: {error}") from error
        self.output_name = self.session.get_outputs()[0].name
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def __call__(
        self, feeds: Mapping[str, torch.Tensor], output_shape: Sequence[int], output_dtype: torch.dtype
    ) -> torch.Tensor:
        return self.run_many(feeds, {self.output_name: output_shape}, output_dtype)[self.output_name]

    def run_many(
        self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, Sequence[int]], output_dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        held = []  # the bound inputs must outlive the run
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            held.append(tensor)
            binding.bind_input(
                name, self._device_type, self._device_id, _NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
            )
        results = {}
        for name, shape in outputs.items():
            output = results[name] = torch.empty(tuple(shape), dtype=output_dtype, device=self.device)
            binding.bind_output(
                name, self._device_type, self._device_id, _NUMPY_TYPES[output_dtype], tuple(output.shape), output.data_ptr()
            )
        if self.device.type == "cuda":
            # ONNX Runtime runs on its own stream: the inputs must be written before it reads them.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return results
