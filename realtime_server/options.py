"""Settings from a command's options, the same way for every `streamcanvas` command."""

from __future__ import annotations

import logging
import os
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
