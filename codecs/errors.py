"""Typed errors for bytes that cannot be turned into messages or images.

Every error carries a stable `code` string: it is what clients see in an `error` message
(docs/protocol.md lists them), so renaming one is a protocol change.
"""

from __future__ import annotations


class CodecError(Exception):
    code = "codec_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MalformedMessage(CodecError):
    """The bytes are not a MsgPack map with a string `type`."""

    code = "malformed_message"


class UnknownMessageType(CodecError):
    code = "unknown_message_type"


class InvalidField(CodecError):
    """The message's shape is wrong: a field is missing, unknown, or of the wrong type."""

    code = "invalid_field"


class InvalidValue(CodecError):
    """A field of the right type whose value is not allowed: outside its range, not one of its choices."""

    code = "invalid_value"


class MessageTooLarge(CodecError):
    code = "message_too_large"


class UnsupportedImageFormat(CodecError):
    code = "unsupported_image_format"


class CorruptImage(CodecError):
    """The image's header or body cannot be decoded, or does not match what was declared."""

    code = "corrupt_image"


class ImageTooLarge(CodecError):
    """The image's declared dimensions are over the limits; nothing was decoded."""

    code = "image_too_large"
