"""Settings from a command's options, the same way for every `streamcanvas` command."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import click
import pydantic

from .settings import Settings, unknown_variables, validation_message

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def settings_from(options: Mapping[str, object], **defaults: object) -> Settings:
    """The settings a command runs with: the options given on its command line, then `defaults`, then
    the environment (STREAMCANVAS_*) and the settings' own defaults. Options left out are not passed;
    repeated ones become lists. Bad values are a usage error naming the option (and its variable); a
    STREAMCANVAS_* variable that is no setting is one too."""
    given = {name: list(value) if isinstance(value, tuple) else value for name, value in options.items() if value not in (None, ())}
    for name, value in defaults.items():
        given.setdefault(name, value)
    if isinstance(given.get("model"), str):  # a command taking one --model names the default model
        given["model"] = [given["model"]]
    unknown = unknown_variables(os.environ)
    if unknown:
        raise click.UsageError("; ".join(unknown))
    try:
        return Settings(**given)
    except pydantic.ValidationError as error:
        raise click.UsageError(validation_message(error, _option_names())) from None


def _option_names() -> dict[str, str]:
    """The running command's options by the setting each one sets (`idle_timeout_s` → `--idle-timeout`)."""
    context = click.get_current_context(silent=True)
    if context is None:
        return {}
    return {param.name: param.opts[0] for param in context.command.params if param.name and param.opts}


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    # uvicorn's access log writes each request's query string: viewer links and recording downloads
    # carry their session's token there (`?token=`), which would give whoever reads the log the session.
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, RedactTokens) for existing in access.filters):
        access.addFilter(RedactTokens())


class RedactTokens(logging.Filter):
    """Rewrites `token=…` (and `api_key=…`) in a log record's arguments to `token=[redacted]`."""

    _SECRET = re.compile(r"((?:^|[?&;])(?:token|api_key)=)[^&;\s]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._SECRET.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg for arg in record.args)
        return True
