"""Images uploaded for workflows (ComfyUI's `POST /upload/image`), in one directory on the server.

A workflow's LoadImage names a file here; when the workflow is accepted, the files it names are copied
into the job itself, so the job does not depend on the upload staying (or staying the same) and a
worker on another machine needs no shared directory. That is also why the folder can be bounded: each
upload first removes files older than the retention, then the oldest ones while the folder holds more
than `max_files` or `max_bytes`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from streamcanvas.codecs import images
from streamcanvas.codecs.errors import CodecError
from streamcanvas.codecs.images import ImageLimits

from .errors import InvalidJob

MAX_LISTED = 1000
_SAFE = re.compile(r"[^A-Za-z0-9._ ()\-]")


class Uploads:
    def __init__(
        self, root: Path, limits: ImageLimits, max_files: int = 10_000, max_bytes: int = 4 * 1024**3, max_age_s: float = 7 * 24 * 3600.0
    ) -> None:
        self.root = root
        self.limits = limits
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s

    def save(self, filename: str, data: bytes, subfolder: str = "", overwrite: bool = False) -> tuple[str, str]:
        """Check that `data` is an image within the limits and store it; returns (name, subfolder).
        An existing name is kept unless `overwrite`: the new file gets "name (1).png" and so on."""
        image_format = images.sniff_format(data)
        if image_format is None:
            raise InvalidJob("the upload is not a PNG, JPEG or WebP file", field="image")
        try:
            images.decode(image_format, data, self.limits)
        except CodecError as error:
            raise InvalidJob(f"image: {error}", field="image") from None
        name = _clean(Path(filename.replace("\\", "/")).name) or f"upload.{image_format.value}"
        parts = [_clean(part) for part in subfolder.replace("\\", "/").split("/") if part not in ("", ".")]
        if any(part in ("", "..") for part in parts) or len(parts) > 4:
            raise InvalidJob(f"subfolder {subfolder!r} is not a plain relative folder", field="subfolder")
        directory = self.root.joinpath(*parts)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        stem, suffix = os.path.splitext(name)
        counter = 1
        while target.exists() and not overwrite:
            target = directory / f"{stem} ({counter}){suffix}"
            counter += 1
        self.prune(extra_bytes=len(data))
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)
        return target.name, "/".join(parts)

    def prune(self, extra_bytes: int = 0, now: float | None = None) -> int:
        """Remove uploads past the retention, then the oldest while over the limits (leaving room for
        one more file of `extra_bytes`); returns how many went."""
        now = time.time() if now is None else now
        files = sorted(
            ((path.stat().st_mtime, path.stat().st_size, path) for path in self.root.rglob("*") if path.is_file()),
            key=lambda entry: entry[0],
        ) if self.root.is_dir() else []
        total = sum(size for _, size, _ in files)
        removed = 0
        for modified, size, path in files:
            over = len(files) - removed >= self.max_files or total + extra_bytes > self.max_bytes
            if not over and now - modified <= self.max_age_s:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def path(self, name: str) -> Path | None:
        """The file `name` ("file.png" or "sub/file.png") names, if it exists inside the directory."""
        if not name or "\x00" in name:
            return None
        candidate = (self.root / name).resolve()
        root = self.root.resolve()
        if root not in candidate.parents or not candidate.is_file() or candidate.name.startswith("."):
            return None
        return candidate

    def read(self, name: str) -> bytes:
        path = self.path(name)
        if path is None:
            raise InvalidJob(f"no uploaded image {name!r}", field="image")
        return path.read_bytes()

    def names(self) -> tuple[str, ...]:
        """Uploaded images, newest first (at most MAX_LISTED)."""
        if not self.root.is_dir():
            return ()
        found = [path for path in self.root.rglob("*") if path.is_file() and not path.name.startswith(".")]
        found.sort(key=lambda path: path.stat().st_mtime, reverse=True)
        return tuple(str(path.relative_to(self.root)).replace(os.sep, "/") for path in found[:MAX_LISTED])


def _clean(part: str) -> str:
    cleaned = _SAFE.sub("_", part).strip(" ")
    return "" if cleaned in (".", "..") else cleaned[:128]
