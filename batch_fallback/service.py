"""The batch queue's front door in the server: validate and accept jobs, report on them, cancel them.

`BatchService` owns the job store, the queue (embedded or Redis), the in-process workers of the
embedded mode and the housekeeping thread. It knows nothing of HTTP (`api.py` and `a1111.py` are its
adapters) nor of the real-time server: the live sessions reach it only through two callables the
server passes in (`capture_live` for "render this session now", and the count of streaming sessions).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from streamcanvas.codecs.images import ImageLimits
from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.models import ModelSet
from streamcanvas.pipelines.styles import StylePreset

from .errors import InvalidJob
from .kinds import KINDS, AcceptContext, LiveCapture, invalid_job
from .queues import EmbeddedQueue, Housekeeper, JobQueue, RedisQueue, resubmit_queued
from .rendering import QualityRenderer
from .store import JobRecord, JobStatus, JobStore, NewJob, Priority
from .uploads import Uploads
from .webhooks import WebhookPolicy, WebhookSender
from .worker import JobExecutor, LiveGate, RetryPolicy

logger = logging.getLogger(__name__)

PRIORITY_NAMES = {priority.name.lower(): priority for priority in Priority}


@dataclass(frozen=True)
class BatchConfig:
    database_url: str
    results_dir: Path
    uploads_dir: Path | None = None
    """Where workflow images are uploaded (POST /upload/image); default: results_dir / "uploads"."""
    queue: Literal["embedded", "redis"] = "embedded"
    redis_url: str | None = None
    redis_namespace: str = "streamcanvas"
    embedded_workers: int = 1
    max_queued: int = 1000
    default_timeout_s: float = 600.0
    max_timeout_s: float = 6 * 3600.0
    default_max_attempts: int = 3
    retry_backoff_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    retention_s: float = 7 * 24 * 3600.0
    live_share: float = 0.25
    max_width: int = 1024
    max_height: int = 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    api_keys: frozenset[str] = frozenset()
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, self.heartbeat_timeout_s / 5)

    @property
    def housekeeping_interval_s(self) -> float:
        return max(0.5, min(self.heartbeat_timeout_s / 2, self.retention_s / 10, 60.0))


class JobCreate(BaseModel):
    """The body of `POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="the job kind (GET /v1/job-kinds)", json_schema_extra={"enum": list(KINDS)})
    params: dict[str, Any] = Field(description="the kind's parameters")
    priority: Literal["low", "normal", "high"] = "normal"
    timeout_s: float | None = Field(None, gt=0, description="running time allowed; default from the server")
    max_attempts: int | None = Field(None, ge=1, le=10, description="attempts on transient failures")
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed to (signed) when the job ends; must be under a prefix the operator allows")


def open_queue(config: BatchConfig) -> JobQueue | None:
    """The Redis queue when configured (the embedded one is built by the service, which runs it)."""
    if config.queue == "redis":
        if not config.redis_url:
            raise ValueError("the redis queue needs a redis url")
        return RedisQueue(config.redis_url, config.redis_namespace, config.heartbeat_timeout_s)
    return None


class BatchService:
    def __init__(
        self,
        config: BatchConfig,
        models: ModelSet | LoadedModel,
        capture_live: Callable[[str, str], LiveCapture],
        torch_threads: int | None = None,
        styles: Mapping[str, StylePreset] | None = None,
    ) -> None:
        self.config = config
        self.models = models if isinstance(models, ModelSet) else ModelSet.single(models)
        self.model = self.models.default
        self.styles = dict(styles or {})
        self.capture_live = capture_live
        self.store = JobStore(config.database_url)
        self.uploads = Uploads(config.uploads_dir or config.results_dir / "uploads", config.image_limits, max_age_s=config.retention_s)
        self.live_sessions = 0
        self._stopping = threading.Event()
        self._publisher: threading.Thread | None = None
        redis_queue = open_queue(config)
        self.executor: JobExecutor | None = None
        self.queue: JobQueue
        if redis_queue is not None:
            self.queue = redis_queue
        else:
            self.executor = JobExecutor(
                self.store,
                QualityRenderer(self.models),
                config.results_dir,
                worker_name="embedded",
                heartbeat_s=config.heartbeat_s,
                retry=RetryPolicy(config.retry_backoff_s),
                gate=LiveGate(config.live_share, lambda: self.live_sessions > 0),
                requeue=lambda job_id, priority, delay_s: self.queue.submit(job_id, priority, delay_s),
                torch_threads=torch_threads,
            )
            self.queue = EmbeddedQueue(self.store, self.executor.run, config.embedded_workers, torch_threads=torch_threads)
        self.webhooks = WebhookSender(self.store, config.webhooks) if config.webhooks.allowed else None
        self.housekeeper = Housekeeper(
            self.store,
            self.queue,
            stale_after_s=config.heartbeat_timeout_s,
            interval_s=config.housekeeping_interval_s,
            retention_s=config.retention_s,
            results_dir=config.results_dir,
        )

    def start(self) -> None:
        self.config.results_dir.mkdir(parents=True, exist_ok=True)
        self.housekeeper.run_once()
        if isinstance(self.queue, RedisQueue):
            sent = resubmit_queued(self.store, self.queue)
            if sent:
                logger.info("sent %d queued jobs to Redis again (duplicates are claimed once)", sent)
        self.queue.start()
        self.housekeeper.start()
        if self.webhooks is not None:
            self.webhooks.start()
        if isinstance(self.queue, RedisQueue):
            self._publisher = threading.Thread(
                target=self._publish_live_sessions, args=(self.queue,), name="live-sessions", daemon=True
            )
            self._publisher.start()

    def stop(self) -> None:
        """Jobs in hand go back to the queue at their next step (not counted as an attempt)."""
        self._stopping.set()
        if self._publisher is not None:
            self._publisher.join(5)
        self.housekeeper.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.executor is not None:
            self.executor.stop()
        self.queue.stop()
        self.store.close()

    def set_live_sessions(self, count: int) -> None:
        """Called a few times a second, from the event loop, with the number of live sessions
        rendering on this server. A plain assignment; on Redis `_publish_live_sessions` passes it on."""
        self.live_sessions = count

    def _publish_live_sessions(self, queue: RedisQueue) -> None:
        """Redis: tell this host's worker processes the count when it changes, and at least once a second."""
        published: tuple[int, float] | None = None
        while not self._stopping.wait(0.25):
            count, now = self.live_sessions, time.monotonic()
            if published is not None and published[0] == count and now - published[1] < 1.0:
                continue
            try:
                queue.publish_live_sessions(count)
                published = (count, now)
            except RedisError:
                logger.warning("could not publish the live session count to Redis", exc_info=True)

    # --- jobs ----------------------------------------------------------------------------------------

    def create(self, body: object, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Validate completely, then record and queue. Returns (job, created); created is False when the
        idempotency key was already used for this same request."""
        if not isinstance(body, dict):
            raise InvalidJob(f"the body must be a JSON object, got {type(body).__name__}")
        try:
            request = JobCreate.model_validate(body)
        except ValidationError as error:
            raise invalid_job(error) from None
        kind = KINDS.get(request.kind)
        if kind is None:
            raise InvalidJob(f"unknown kind {request.kind!r}; one of {', '.join(KINDS)}", field="kind")
        if request.timeout_s is not None and request.timeout_s > self.config.max_timeout_s:
            raise InvalidJob(f"timeout_s {request.timeout_s:g} is over the limit of {self.config.max_timeout_s:g}", field="timeout_s")
        if request.webhook_url is not None:
            self.config.webhooks.check(request.webhook_url)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidJob("Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
        if idempotency_key is not None:
            # A replay returns the job the first send made, even once a live session it captured is gone.
            existing = self.store.find_idempotent(idempotency_key, request.model_dump())
            if existing is not None:
                return existing, False
        accepted = kind.accept(kind.parse(request.params), self._accept_context())
        priority = PRIORITY_NAMES[request.priority]
        record, created = self.store.create(
            NewJob(
                kind=kind.name,
                params=accepted.params,
                priority=priority,
                max_attempts=request.max_attempts or self.config.default_max_attempts,
                timeout_s=request.timeout_s or self.config.default_timeout_s,
                input_image=accepted.input_image,
                idempotency_key=idempotency_key,
                webhook_url=request.webhook_url,
                request=request.model_dump(),
            ),
            max_queued=self.config.max_queued,
        )
        if created:
            self.queue.submit(record.id, priority)
        return record, created

    def _accept_context(self) -> AcceptContext:
        return AcceptContext(
            max_width=self.config.max_width,
            max_height=self.config.max_height,
            image_limits=self.config.image_limits,
            capture_live=self.capture_live,
            models=self.models.choices(),
            styles=self.styles,
            uploads=self.uploads,
        )

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        return self.store.cancel(job_id)

    def position(self, record: JobRecord) -> int | None:
        return self.store.queue_position(record) if record.status is JobStatus.QUEUED else None

    async def events(self, job_id: str, poll_s: float = 0.2) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs until the job ends: queued (with position), started, progress (with a
        preview when the job keeps one), then finished, failed or cancelled.

        The job is sampled every `poll_s`: a fast job's steps may be skipped, never reordered."""
        record = await asyncio.to_thread(self.store.get, job_id)
        last: tuple[Any, ...] | None = None
        while True:
            key: tuple[Any, ...]
            if record.status is JobStatus.QUEUED:
                position = await asyncio.to_thread(self.store.queue_position, record)
                key = ("queued", position, record.attempts)
                if key != last:
                    yield "queued", {"position": position, "attempts": record.attempts, "error": record.error}
            elif record.status is JobStatus.RUNNING:
                key = ("running", record.attempts, record.step, record.updated_at)
                if last is None or last[:2] != key[:2]:
                    yield "started", {"attempt": record.attempts, "worker": record.worker}
                if record.step and (last is None or last[:3] != key[:3]):
                    data: dict[str, Any] = {"step": record.step, "steps": record.steps}
                    if record.params.get("preview"):
                        preview = await asyncio.to_thread(self.store.preview, job_id)
                        if preview:
                            data["preview"] = "data:image/jpeg;base64," + base64.b64encode(preview).decode()
                    yield "progress", data
            else:
                yield record.status.value, {
                    "error": record.error,
                    "results": len(record.results),
                    "step": record.step,
                    "steps": record.steps,
                }
                return
            last = key
            await asyncio.sleep(poll_s)
            record = await asyncio.to_thread(self.store.get, job_id)

