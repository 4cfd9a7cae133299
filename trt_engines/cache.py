"""The engine cache: exported ONNX graphs and built TensorRT engines, keyed by everything that makes one
wrong when it changes.

Layout under the cache root (default `~/.cache/streamcanvas/engines`):

    <component>-<kind>-<digest>/      one entry: its files and manifest.json
    .<entry name>.lock                 held by whoever is building that entry
    .<entry name>.partial-<pid>-<n>/   an entry being built (renamed into place when complete)
    timing-<digest>.cache              TensorRT's timing cache for one GPU and TensorRT version

An entry is built into a partial directory and renamed into place, so a reader never sees half an entry.
Builders of the same entry take its lock: the second waits and then uses what the first built. Every
file's size and SHA-256 are in the manifest; an entry that does not match it (a crash of the disk, a
hand edit, a different key) is logged, removed and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ArtifactKind = Literal["onnx", "tensorrt"]
_partials = itertools.count()


class CacheError(Exception):
    """An entry could not be built, or was needed and may not be built."""


class EntryMissing(CacheError):
    """The entry is not in the cache and building it was not allowed."""


@dataclass(frozen=True)
class EngineKey:
    """Everything an artifact depends on. Two keys are equal exactly when the artifacts are interchangeable.

    ONNX graphs are exported with dynamic shapes and run anywhere, so their shape and TensorRT fields are
    None; TensorRT engines fill them all in.
    """

    kind: ArtifactKind
    component: str
    weights: str
    """Fingerprint of the weights actually loaded (after LoRA fusion) and the module's config."""
    export_version: int
    opset: int
    dtype: str
    attention: str = "standard"
    """How the graph writes attention (`export.Attention`): "fused" graphs are for ONNX Runtime only."""
    lifted: str | None = None
    """Digest of the names of the UNet weights the graph takes as inputs (those LoRAs change; bound per
    LoRA set at run time), None when every weight is inside the graph."""
    min_side: int | None = None
    opt_side: int | None = None
    max_side: int | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    cuda: str | None = None

    def fields(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]

    @property
    def name(self) -> str:
        return f"{self.component}-{self.kind}-{self.digest}"


@dataclass(frozen=True)
class Entry:
    key: EngineKey
    path: Path
    files: dict[str, int]
    """File name → size in bytes."""
    created: float
    used: float
    """When a server or build last took this entry from the cache (the manifest's modification time)."""
    build_s: float
    info: dict[str, object]
    """What the builder noted for people (the model's name, the device), not part of the key."""

    @property
    def size(self) -> int:
        return sum(self.files.values())

    def file(self, name: str) -> Path:
        return self.path / name


def fingerprint_module(module: torch.nn.Module) -> str:
    """SHA-256 over a module's class, config, and every parameter and buffer (names, shapes, bytes)."""
    import torch  # here, not at the top: `engines list/prune` read the cache without loading torch
    digest = hashlib.sha256()
    digest.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        # Private entries (`_name_or_path`, `_diffusers_version`) say where and by what the weights were
        # saved, not what they are.
        public = {name: value for name, value in dict(config).items() if not name.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class EngineCache:
    def __init__(self, root: Path, lock_timeout_s: float = 3600.0) -> None:
        self.root = Path(root).expanduser()
        self.lock_timeout_s = lock_timeout_s

    def entry_path(self, key: EngineKey) -> Path:
        return self.root / key.name

    def lookup(self, key: EngineKey) -> Entry | None:
        """The verified entry for `key`, or None. An entry that fails verification is removed."""
        path = self.entry_path(key)
        if not path.exists():
            return None
        problem, entry = self._verify(path, key)
        if entry is not None:
            os.utime(path / MANIFEST)  # last used, for `engines prune --unused-for`
            return entry
        logger.warning("engine cache entry %s is unusable (%s); removing it so it is rebuilt", path, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def get_or_build(
        self, key: EngineKey, build: Callable[[Path], dict[str, object]] | None
    ) -> Entry:
        """The entry for `key`, built with `build(directory)` if it is missing (None: do not build).

        `build` writes the artifact's files into the empty directory it is given and returns notes for
        the manifest. Only one process builds a given key at a time; the others wait for it.
        """
        entry = self.lookup(key)
        if entry is not None:
            return entry
        if build is None:
            raise EntryMissing(f"{key.component} ({key.kind}) is not in the engine cache at {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f".{key.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("another process is building %s; waiting for it", key.name)
            try:
                lock.acquire(timeout=self.lock_timeout_s)
            except Timeout:
                raise CacheError(f"gave up after {self.lock_timeout_s:.0f} s waiting for the build of {key.name}") from None
        try:
            entry = self.lookup(key)  # built by the process we waited for
            if entry is not None:
                logger.info("using %s, built by another process", key.name)
                return entry
            return self._build(key, build)
        finally:
            lock.release()

    def _build(self, key: EngineKey, build: Callable[[Path], dict[str, object]]) -> Entry:
        for stale in self.root.glob(f".{key.name}.partial-*"):
            # We hold the key's lock, so no live process is writing these: a builder died mid-way.
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.root / f".{key.name}.partial-{os.getpid()}-{next(_partials)}"
        staging.mkdir()
        started = time.time()
        try:
            info = build(staging)
            files = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
            if not files:
                raise CacheError(f"building {key.name} wrote no files")
            manifest = {
                "key": key.fields(),
                "files": {name: {"size": size, "sha256": _sha256(staging / name)} for name, size in files.items()},
                "created": started,
                "build_s": round(time.time() - started, 3),
                "info": info,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            final = self.entry_path(key)
            if final.exists():
                shutil.rmtree(final)  # failed verification above; we hold the lock
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("built %s in %.1f s", key.name, manifest["build_s"])
        entry = self.lookup(key)
        assert entry is not None, "an entry failed verification right after it was written"
        return entry

    def _verify(self, path: Path, key: EngineKey | None) -> tuple[str, Entry | None]:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            stored = EngineKey(**manifest["key"])
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"unreadable manifest: {type(error).__name__}: {error}", None
        if key is not None and stored != key:
            return "its manifest is for a different key", None
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing", None
            if file.stat().st_size != expected["size"]:
                return f"{name} is {file.stat().st_size} bytes, expected {expected['size']}", None
            if _sha256(file) != expected["sha256"]:
                return f"{name} does not match its checksum", None
        sizes = {name: expected["size"] for name, expected in files.items()}
        used = (path / MANIFEST).stat().st_mtime
        return "", Entry(stored, path, sizes, manifest.get("created", 0.0), used, manifest.get("build_s", 0.0), manifest.get("info", {}))

    def entries(self) -> tuple[list[Entry], list[tuple[Path, str]]]:
        """Every entry in the cache, verified, and every directory that is not a valid entry (with why)."""
        good: list[Entry] = []
        bad: list[tuple[Path, str]] = []
        if not self.root.is_dir():
            return good, bad
        for path in sorted(self.root.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith("."):
                if ".partial-" in path.name and not self._locked(path.name.split(".partial-")[0].lstrip(".")):
                    bad.append((path, "left over from a build that did not finish"))
                continue
            problem, entry = self._verify(path, None)
            if entry is None:
                bad.append((path, problem))
            elif entry.path.name != entry.key.name:
                bad.append((path, "its directory name does not match its key"))
            else:
                good.append(entry)
        return good, bad

    def _locked(self, name: str) -> bool:
        lock = FileLock(str(self.root / f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def timing_cache(self, environment: dict[str, str]) -> Path:
        """TensorRT's timing cache for one GPU and TensorRT version (shared by every engine built there)."""
        canonical = json.dumps(environment, sort_keys=True)
        return self.root / f"timing-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}.cache"
