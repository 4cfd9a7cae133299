"""Typed errors raised by the pipelines package. Entry points decide how to report them."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelNotFound(PipelineError):
    """A model directory or Hugging Face repo id could not be resolved offline."""


class ModelLoadError(PipelineError):
    """A model was found but could not be loaded (wrong layout, corrupt weights, wrong kind)."""


class InvalidParameter(PipelineError, ValueError):
    """A stream parameter is out of range or inconsistent with the others."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownName(InvalidParameter):
    """A parameter names a LoRA, ControlNet, style or model this server does not have; the message
    lists the ones it has."""


class DeviceUnavailable(PipelineError):
    """The requested device (e.g. cuda) does not exist on this machine."""


class BackendUnavailable(PipelineError):
    """The requested inference backend (onnxruntime, tensorrt, ...) cannot run here; says what is missing."""
