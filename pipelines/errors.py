"""Typed errors raised by the pipelines package. Entry points decide how to report them."""

from __future__ import annotations

from collections.abc import Iterable


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
        self.detail = message


class UnknownName(InvalidParameter):
    """A parameter names a LoRA, ControlNet, style or model this server does not have; the message
    lists the ones it has."""

    @classmethod
    def listing(
        cls, field: str, what: str, name: str, names: Iterable[str], flag: str | None = None, owner: str = "this server", hint: str | None = None
    ) -> UnknownName:
        """`no <what> named <name>; <owner> has: <names>`; when it has none, `hint` or how to give it
        some (`flag`)."""
        listed = ", ".join(names)
        if not listed:
            listed = f"none ({hint})" if hint else f"none (start the server with {flag})" if flag else "none"
        return cls(field, f"no {what} named {quoted(name)}; {owner} has: {listed}")


def quoted(value: object, limit: int = 60) -> str:
    """A client's name or value as an error message quotes it: its repr, cut to `limit` characters (a
    name can be megabytes long, and bytes would come back four times as long)."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "…"


NO_DEPTH_MODEL = "the 'depth' preprocessor needs a depth model: start the server with --depth-model PATH"


class DeviceUnavailable(PipelineError):
    """The requested device (e.g. cuda) does not exist on this machine."""


class BackendUnavailable(PipelineError):
    """The requested inference backend (onnxruntime, tensorrt, ...) cannot run here; says what is missing."""
