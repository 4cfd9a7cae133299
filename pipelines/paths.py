"""Where streamcanvas keeps what it builds (kept free of heavy imports: the `engines` commands use it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$STREAMCANVAS_CACHE_DIR, else the XDG cache: the tiny model, engines, jobs and recordings go here."""
    explicit = os.environ.get("STREAMCANVAS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "streamcanvas"


def default_engine_dir() -> Path:
    return default_cache_dir() / "engines"
