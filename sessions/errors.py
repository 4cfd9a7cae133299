"""Typed errors of the session layer. Each has the stable `code` a client sees (docs/protocol.md)."""

from __future__ import annotations


class SessionError(Exception):
    code = "session_error"
    fatal = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class OutOfBounds(SessionError):
    code = "out_of_bounds"


class NotReady(SessionError):
    """A message arrived in a state that cannot take it (e.g. a canvas before `ready`)."""

    code = "not_ready"


class WrongMode(SessionError):
    code = "wrong_mode"


class Unauthorized(SessionError):
    code = "unauthorized"
    fatal = True


class UnsupportedVersion(SessionError):
    code = "unsupported_version"
    fatal = True


class InvalidResolution(SessionError):
    code = "invalid_value"
    fatal = True


class RecordingError(SessionError):
    code = "recording_failed"
