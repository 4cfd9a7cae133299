"""Server settings: defaults, overridden by STREAMCANVAS_* environment variables, overridden by the CLI."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote
from typing import Literal

import pydantic
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from streamcanvas.batch_fallback.service import BatchConfig
from streamcanvas.batch_fallback.webhooks import WebhookPolicy
from streamcanvas.codecs.images import ImageLimits
from streamcanvas.pipelines.backends import BackendConfig, BackendName, ShapeRange
from streamcanvas.pipelines.adapters import parse_named_path
from streamcanvas.pipelines.loading import ModelSpec
from streamcanvas.pipelines.models import DEFAULT_MODEL_NAME
from streamcanvas.pipelines.paths import default_cache_dir
from streamcanvas.pipelines.sharing import Sharing
from streamcanvas.pipelines.sizes import side_problem
from streamcanvas.sessions.manager import SessionConfig

from .http import LOOPBACK_HOSTS, host_name

_RESOLUTION = re.compile(r"^(\d{2,5})x(\d{2,5})$")


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server for WebRTC, as browsers' RTCIceServer has it."""

    url: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> IceServer:
        """`stun:HOST[:PORT]`, or `turn:`/`turns:` with optional credentials before the host:
        `turn:USER:CREDENTIAL@HOST[:PORT][?transport=udp|tcp]` (percent-encode ':' and '@' in them)."""
        scheme, _, rest = text.partition(":")
        if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
            raise ValueError(f"{text!r} is not a stun:, stuns:, turn: or turns: URL")
        if "@" not in rest:
            return cls(text)
        userinfo, _, host = rest.rpartition("@")
        username, colon, credential = userinfo.partition(":")
        if not scheme.startswith("turn") or not colon or not username or not host:
            raise ValueError(f"{scheme}: URL with credentials must be turn:USER:CREDENTIAL@HOST[:PORT]")
        return cls(f"{scheme}:{host}", unquote(username), unquote(credential))

    def as_rtc(self) -> dict[str, object]:
        """The server as a browser's RTCIceServer dictionary."""
        entry: dict[str, object] = {"urls": [self.url]}
        if self.username is not None:
            entry.update(username=self.username, credential=self.credential)
        return entry


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMCANVAS_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    model: Annotated[list[str], NoDecode] = []
    """Models to serve: `NAME=PATH` or a bare PATH (named by it); the first is the default. None: the
    trained toy model, named "toy"."""
    memory_budget_gb: float | None = Field(None, gt=0)
    """GiB the models' weights may take on the device (default: 90% of a GPU's memory, or of the
    memory the machine has available)."""
    tiny_vae: str = "auto"
    lora: Annotated[list[str], NoDecode] = []
    """LoRAs: `NAME=PATH` loads a named adapter that sessions turn on and weigh; a bare PATH (one at
    most, e.g. an LCM-LoRA) is fused into the UNet for every frame."""
    controlnet: Annotated[list[str], NoDecode] = []
    """ControlNets, `NAME=PATH` each."""
    upscaler: Annotated[list[str], NoDecode] = []
    """Super-resolution networks for upscale jobs, `NAME=PATH` each."""
    depth_model: str | None = None
    """A depth-estimation network (directory or cached repo id) for the `depth` control preprocessor."""
    styles: Path | None = None
    """A TOML file of style presets (default: the shipped ones, pipelines/styles.toml)."""
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = Field(None, ge=1, le=256)
    warmup: bool = True
    # Compiled inference (pipelines.backends): what runs the UNet and VAE, and where engines are kept.
    backend: BackendName = "auto"
    engine_dir: Path | None = None
    build_engines: bool = False
    engine_min_resolution: int = Field(256, ge=64, le=4096, multiple_of=8)
    engine_max_batch: int = Field(8, ge=1, le=16)
    cuda_graphs: bool = False

    resolution: str = "512x512"
    max_resolution: str = "1024x1024"
    slots: int = Field(1, ge=1, le=64)
    sessions_per_slot: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    batching: bool = True
    frame_target_ms: float | None = Field(None, gt=0, le=60_000)
    overlap_decode: Literal["auto", "on", "off"] = "auto"
    max_waiting: int = Field(8, ge=0, le=1024)
    max_connections: int = Field(64, ge=1, le=100_000)
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    idle_timeout_s: float = Field(120.0, gt=0)
    stats_interval_s: float = Field(1.0, gt=0)
    # Connections that never finish: HTTP requests, WebRTC peers, WebSocket clients that stop reading.
    http_read_timeout_s: float = Field(10.0, gt=0, le=3600)
    max_pending_requests: int = Field(128, ge=1, le=100_000)
    webrtc_connect_timeout_s: float = Field(15.0, gt=0, le=600)
    slow_consumer_timeout_s: float = Field(15.0, gt=0, le=3600)

    ice_servers: Annotated[list[str], NoDecode] = []
    ice_host_addresses: Annotated[list[str], NoDecode] = []
    api_keys: Annotated[list[str], NoDecode] = []
    allowed_origins: Annotated[list[str], NoDecode] = []
    allowed_hosts: Annotated[list[str], NoDecode] = []
    token_secret: str | None = None
    token_ttl_s: float = Field(12 * 3600, gt=0)
    max_viewers: int = Field(64, ge=0, le=10_000)
    recordings_dir: Path | None = None
    max_recording_s: float = Field(3600.0, gt=0)

    # The batch queue (batch_fallback): embedded (SQLite + in-process worker) or Redis + worker processes.
    batch_queue: Literal["embedded", "redis"] = "embedded"
    redis_url: str | None = None
    database_url: str | None = None
    results_dir: Path | None = None
    uploads_dir: Path | None = None
    # Job callbacks (batch_fallback/webhooks.py): off unless the operator allows URL prefixes.
    webhook_allow: Annotated[list[str], NoDecode] = []
    webhook_secret: str | None = None
    webhook_max_attempts: int = Field(8, ge=1, le=30)
    webhook_backoff_s: float = Field(2.0, gt=0, le=3600)
    """Images uploaded for workflows (ComfyUI's POST /upload/image); default: the cache's "uploads"."""
    batch_workers: int = Field(1, ge=0, le=16)
    batch_max_resolution: str = "2048x2048"
    batch_live_share: float = Field(0.25, ge=0.0, le=1.0)
    max_queued_jobs: int = Field(1000, ge=1, le=1_000_000)
    job_timeout_s: float = Field(600.0, gt=0)
    job_max_attempts: int = Field(3, ge=1, le=10)
    job_retry_backoff_s: float = Field(2.0, gt=0)
    job_heartbeat_timeout_s: float = Field(30.0, gt=0)
    job_retention_s: float = Field(7 * 24 * 3600.0, gt=0)

    _split = field_validator(
        "api_keys", "allowed_origins", "allowed_hosts", "ice_servers", "ice_host_addresses", "lora", "controlnet", "upscaler", "model", "webhook_allow", mode="before"
    )(_split_list)

    @field_validator("lora")
    @classmethod
    def _check_loras(cls, value: list[str]) -> list[str]:
        fused = [entry for entry in value if not _named(entry)]
        if len(fused) > 1:
            raise ValueError(f"at most one LoRA is fused into the UNet (a bare PATH); give the others names, NAME=PATH: {fused}")
        _unique([parse_named_path(entry, "--lora") for entry in value if _named(entry)], "--lora")
        return value

    @field_validator("model")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        _unique([_model_entry(entry) for entry in value], "--model")
        return value

    @field_validator("controlnet", "upscaler")
    @classmethod
    def _check_named_paths(cls, value: list[str], info: ValidationInfo) -> list[str]:
        flag = f"--{info.field_name}"
        _unique([parse_named_path(entry, flag) for entry in value], flag)
        return value

    @field_validator("ice_servers")
    @classmethod
    def _check_ice_servers(cls, value: list[str]) -> list[str]:
        for text in value:
            IceServer.parse(text)  # raises ValueError naming the bad URL
        return value

    @property
    def ice_server_list(self) -> list[IceServer]:
        return [IceServer.parse(text) for text in self.ice_servers]

    @field_validator("ice_host_addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            ipaddress.ip_address(address)  # raises ValueError with the bad address in it
        return value

    @field_validator("resolution", "max_resolution", "batch_max_resolution")
    @classmethod
    def _check_resolution(cls, value: str) -> str:
        match = _RESOLUTION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512")
        width, height = int(match[1]), int(match[2])
        for name, side in (("width", width), ("height", height)):
            problem = side_problem(side)
            if problem is not None:
                raise ValueError(f"{value!r}: {name} {problem}")
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> Settings:
        (width, height), (max_width, max_height) = self.size, self._size(self.max_resolution)
        if width > max_width or height > max_height:
            raise ValueError(
                f"--resolution {self.resolution} is over --max-resolution {self.max_resolution}: "
                f"sessions could not ask for the default size; raise --max-resolution too"
            )
        return self

    @model_validator(mode="after")
    def _check_sharing(self) -> Settings:
        if self.sessions_per_slot == 1 and (self.frame_target_ms is not None or not self.batching):
            option = "--frame-target" if self.frame_target_ms is not None else "--no-batching"
            raise ValueError(f"{option} is about sessions sharing a slot: it needs --sessions-per-slot 2 or more")
        if self.sessions_per_slot == "auto" and not self.batching:
            raise ValueError("--sessions-per-slot auto measures batched rounds: it cannot go with --no-batching")
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> Settings:
        if self.batch_queue == "redis" and not self.redis_url:
            raise ValueError("batch_queue 'redis' needs --redis-url (e.g. redis://127.0.0.1:6379/0)")
        if self.webhook_allow and not self.webhook_secret:
            raise ValueError("--webhook-allow needs --webhook-secret: every callback is signed with it")
        for prefix in self.webhook_allow:
            if not re.match(r"^https?://[^/@]+(/.*)?$", prefix):
                raise ValueError(f"--webhook-allow {prefix!r} is not an http(s) URL prefix, e.g. http://127.0.0.1:9000/hooks/")
        return self

    @staticmethod
    def _size(value: str) -> tuple[int, int]:
        width, height = value.split("x")
        return int(width), int(height)

    @property
    def size(self) -> tuple[int, int]:
        return self._size(self.resolution)

    @property
    def binds_beyond_loopback(self) -> bool:
        if self.host in ("localhost",):
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return True

    @property
    def trusted_hosts(self) -> frozenset[str] | None:
        """The Host names the server answers to (http.TrustedHosts), or None for any. On loopback (the
        default) only loopback names and --allowed-host; bound beyond it, any unless --allowed-host
        lists names (then those, the bound address and loopback)."""
        if "*" in self.allowed_hosts or (self.binds_beyond_loopback and not self.allowed_hosts):
            return None
        return frozenset({*LOOPBACK_HOSTS, host_name(self.host), *(host_name(host) for host in self.allowed_hosts)})

    def session_config(self, sharing: Sharing | None = None) -> SessionConfig:
        """The session layer's settings; with `--sessions-per-slot auto`, `sharing` is what start-up
        measured (its count, and its frame target unless --frame-target is given)."""
        if self.sessions_per_slot == "auto":
            if sharing is None:
                raise ValueError("--sessions-per-slot auto needs the start-up measurement (pipelines.sharing)")
            sessions_per_slot, frame_target_ms = sharing.sessions_per_slot, self.frame_target_ms or sharing.frame_target_ms
        else:
            sessions_per_slot, frame_target_ms = self.sessions_per_slot, self.frame_target_ms
        width, height = self.size
        max_width, max_height = self._size(self.max_resolution)
        side = max(max_width, max_height, 4096)
        extra = {"token_secret": self.token_secret} if self.token_secret else {}
        return SessionConfig(
            default_width=width,
            default_height=height,
            max_width=max_width,
            max_height=max_height,
            slots=self.slots,
            sessions_per_slot=sessions_per_slot,
            batching=self.batching,
            frame_target_ms=frame_target_ms,
            overlap_decode=self.overlap_decode,
            max_waiting=self.max_waiting,
            max_connections=self.max_connections,
            max_message_bytes=self.max_message_bytes,
            image_limits=ImageLimits(max_width=side, max_height=side, max_pixels=self.max_image_pixels),
            idle_timeout_s=self.idle_timeout_s,
            stats_interval_s=self.stats_interval_s,
            api_keys=frozenset(self.api_keys),
            token_ttl_s=self.token_ttl_s,
            max_viewers=self.max_viewers,
            recordings_dir=self.recordings_dir or default_cache_dir() / "recordings",
            max_recording_s=self.max_recording_s,
            **extra,
        )

    def model_specs(self) -> list[tuple[str, ModelSpec]]:
        """Every model to serve, by name, the default first. The LoRAs and ControlNets (and the fused
        LoRA) go with the default model: they are made for one architecture."""
        fused = next((entry for entry in self.lora if not _named(entry)), None)
        entries = [_model_entry(entry) for entry in self.model] or [(DEFAULT_MODEL_NAME, "")]
        specs = []
        for index, (name, path) in enumerate(entries):
            first = index == 0
            specs.append(
                (
                    name,
                    ModelSpec(
                        model=path or None,
                        tiny_vae=self.tiny_vae,
                        lora=fused if first else None,
                        adapters=tuple(parse_named_path(entry, "--lora") for entry in self.lora if _named(entry)) if first else (),
                        controlnets=tuple(parse_named_path(entry, "--controlnet") for entry in self.controlnet) if first else (),
                        depth_model=self.depth_model if first else None,
                        upscalers=tuple(parse_named_path(entry, "--upscaler") for entry in self.upscaler) if first else (),
                        device=self.device,
                        dtype=self.dtype,
                    ),
                )
            )
        return specs

    def model_spec(self) -> ModelSpec:
        """The default model's."""
        return self.model_specs()[0][1]

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 2**30)

    def backend_config(self, threads: int) -> BackendConfig:
        """TensorRT engines cover sides from engine_min_resolution (or the session size, if smaller) to
        max_resolution, tuned for the default session size."""
        width, height = self.size
        max_width, max_height = self._size(self.max_resolution)
        shapes = ShapeRange(
            min_side=min(self.engine_min_resolution, width, height),
            opt_side=max(width, height),
            max_side=max(max_width, max_height, width, height),
            max_batch=self.engine_max_batch,
            opt_batch=min(2, self.engine_max_batch),
        )
        return BackendConfig(
            name=self.backend,
            engine_dir=self.engine_dir,
            build_engines=self.build_engines,
            shapes=shapes,
            threads=threads,
            measure_side=max(width, height),
            cuda_graphs=self.cuda_graphs,
        )

    def batch_config(self) -> BatchConfig:
        cache = default_cache_dir()
        max_width, max_height = self._size(self.batch_max_resolution)
        side = max(max_width, max_height, 4096)
        return BatchConfig(
            database_url=self.database_url or f"sqlite:///{cache / 'jobs.db'}",
            results_dir=self.results_dir or cache / "results",
            uploads_dir=self.uploads_dir or (None if self.results_dir else cache / "uploads"),
            queue=self.batch_queue,
            redis_url=self.redis_url,
            embedded_workers=self.batch_workers,
            max_queued=self.max_queued_jobs,
            default_timeout_s=self.job_timeout_s,
            default_max_attempts=self.job_max_attempts,
            retry_backoff_s=self.job_retry_backoff_s,
            heartbeat_timeout_s=self.job_heartbeat_timeout_s,
            retention_s=self.job_retention_s,
            live_share=self.batch_live_share,
            max_width=max(max_width, self.size[0]),
            max_height=max(max_height, self.size[1]),
            image_limits=ImageLimits(max_width=side, max_height=side, max_pixels=self.max_image_pixels),
            api_keys=frozenset(self.api_keys),
            webhooks=WebhookPolicy(tuple(self.webhook_allow), self.webhook_secret or "", self.webhook_max_attempts, self.webhook_backoff_s),
        )


def _named(entry: str) -> bool:
    """Whether a --lora entry is NAME=PATH (a name before any '=', and no path separator in it)."""
    name, equals, _ = entry.partition("=")
    return bool(equals) and "/" not in name and "\\" not in name


def _model_entry(entry: str) -> tuple[str, str]:
    """A --model entry as (name, path): NAME=PATH, or a bare PATH named by itself."""
    return parse_named_path(entry, "--model") if _named(entry) else (entry, entry)


def _unique(pairs: list[tuple[str, str]], option: str) -> None:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{option}: the name {repeated[0]!r} is given twice")


ENV_PREFIX = "STREAMCANVAS_"
OTHER_VARIABLES = frozenset({"STREAMCANVAS_CACHE_DIR", "STREAMCANVAS_TEST_TOY_MODEL", "STREAMCANVAS_WS_FUZZ_CASES", "STREAMCANVAS_WS_FUZZ_SEED"})
"""The STREAMCANVAS_* variables that are not settings: where models and engines are cached
(pipelines.paths), and the test suite's own."""


def setting_variables() -> dict[str, str]:
    """Each setting's environment variable → the setting."""
    return {f"{ENV_PREFIX}{name.upper()}": name for name in Settings.model_fields}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with the STREAMCANVAS_* variables in `environ`: one line for each that is not a
    setting, with the nearest setting's variable (a misspelt STREAMCANVAS_API_KEY would otherwise leave
    the server open, without a word)."""
    known = setting_variables()
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_VARIABLES:
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        problems.append(f"{name} is not a setting" + (f" (did you mean {near[0]}?)" if near else ""))
    return problems


def validation_message(error: pydantic.ValidationError, options: Mapping[str, str] | None = None) -> str:
    """One line a command-line user can act on: every invalid setting, named as the user gave it (the
    option, from `options`: setting → option, and its environment variable), and what is wrong with it."""
    problems: dict[str, list[str]] = {}
    for problem in error.errors():
        setting = str(problem["loc"][0]) if problem["loc"] else "settings"
        problems.setdefault(setting, []).append(problem["msg"])
    lines = []
    for setting, messages in problems.items():
        where = setting
        if setting in Settings.model_fields:
            variable = f"{ENV_PREFIX}{setting.upper()}"
            where = f"{options[setting]} ({variable})" if options and setting in options else variable
        lines.append(f"{where}: {' or '.join(dict.fromkeys(messages))}")
    return "; ".join(lines)
