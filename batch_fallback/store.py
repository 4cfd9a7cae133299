"""The durable record of every job: a SQL database through SQLAlchemy (SQLite by default).

The database, not the queue, is the source of truth. A job is a row from the moment it is accepted
until retention deletes it; its status only moves forward:

    queued → running → finished | failed | cancelled        (running → queued again on a retry or
    queued → cancelled                                        when its worker stopped heartbeating)

A worker owns a running job through its `Claim` (worker name + attempt number). Every write a worker
makes is conditional on still owning the claim, so a worker that was presumed dead and comes back
cannot overwrite the outcome of the attempt that replaced it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .errors import JobConflict, JobNotFound, QueueFull


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)


class Priority(enum.IntEnum):
    """Tiers: a queued job of a higher tier always starts before any queued job of a lower one."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("params", JSON, nullable=False),
    Column("input_image", LargeBinary, nullable=True),
    Column("idempotency_key", String(255), unique=True, nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("run_after", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("worker", String(255), nullable=True),
    Column("step", Integer, nullable=False, default=0),
    Column("steps", Integer, nullable=False, default=0),
    Column("preview", LargeBinary, nullable=True),
    Column("error", Text, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
)
Index("ix_jobs_dispatch", jobs.c.status, jobs.c.priority, jobs.c.created_at)

results = Table(
    "results",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("index", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("seed", BigInteger, nullable=False),  # ComfyUI's seeds go to 2**63 - 1
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("bytes", Integer, nullable=False),
)

stages = Table(
    # Where a multi-part job (a workflow) stands. A table of its own, so that databases made before it
    # gain it from create_all without a migration.
    "job_stages",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("current", String(64), nullable=True),
    Column("done", JSON, nullable=False),
    Column("outputs", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)


webhooks = Table(
    # A job's callback: armed ("pending") in the transaction that ends the job, so no ending is missed.
    "webhooks",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("url", Text, nullable=False),
    Column("state", String(16), nullable=False),  # waiting → pending → delivered | failed
    Column("event", String(16), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", Float, nullable=True),
)
Index("ix_webhooks_due", webhooks.c.state, webhooks.c.next_at)


@dataclass(frozen=True)
class Webhook:
    job_id: str
    url: str
    state: str
    event: str | None
    attempts: int
    next_at: float | None
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class Stage:
    """Where a multi-part job stands: the part running now (None once all ran), the parts done in
    order, and what each output part produced (a workflow's output nodes and their files)."""

    current: str | None
    done: tuple[str, ...] = ()
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultRecord:
    index: int
    path: str
    seed: int
    width: int
    height: int
    bytes: int


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    status: JobStatus
    priority: Priority
    params: dict[str, Any]
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    timeout_s: float
    created_at: float
    run_after: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    updated_at: float
    worker: str | None
    step: int
    steps: int
    has_preview: bool
    error: str | None
    cancel_requested: bool
    results: tuple[ResultRecord, ...] = ()


@dataclass(frozen=True)
class NewJob:
    kind: str
    params: dict[str, Any]
    priority: Priority = Priority.NORMAL
    max_attempts: int = 3
    timeout_s: float = 600.0
    input_image: bytes | None = None
    idempotency_key: str | None = None
    webhook_url: str | None = None
    """Called (POST) once the job has ended; checked against the operator's allow-list beforehand."""
    request: dict[str, Any] | None = None
    """The request as the client sent it; what an idempotency key is bound to (the stored params may
    differ between two sends of it, e.g. a seed picked at random). Required with an idempotency key."""

    def __post_init__(self) -> None:
        if self.idempotency_key is not None and self.request is None:
            raise ValueError("a job with an idempotency key needs the request it was made from")

    def request_hash(self) -> str:
        return _hash_request(self.request)


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one attempt of a running job."""

    job_id: str
    worker: str
    attempt: int


@dataclass(frozen=True)
class ClaimedJob:
    claim: Claim
    record: JobRecord
    input_image: bytes | None


_READ_ONLY = "streamcanvas_read_only"

_SUMMARY_COLUMNS = [column for column in jobs.c if column.name not in ("input_image", "preview", "request_hash")]


class JobStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction that writes (on SQLite: BEGIN IMMEDIATE, so it never has to upgrade a lock)."""
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction (on SQLite: a deferred BEGIN, which never waits for a writer in WAL)."""
        with self.engine.connect().execution_options(**{_READ_ONLY: True}) as connection, connection.begin():
            yield connection

    # --- the API side --------------------------------------------------------------------------------

    def create(self, new: NewJob, max_queued: int | None = None) -> tuple[JobRecord, bool]:
        """Insert a queued job; with an idempotency key already used, the job it made (created=False).

        Raises JobConflict when the key was used for a different request, and QueueFull when
        `max_queued` jobs are already queued (counted in the inserting transaction: exact on SQLite,
        whose writers are serialised; on other databases concurrent creates may pass it by a few).
        """
        now = time.time()
        job_id = uuid.uuid4().hex
        row = {
            "id": job_id,
            "kind": new.kind,
            "status": JobStatus.QUEUED.value,
            "priority": int(new.priority),
            "params": new.params,
            "input_image": new.input_image,
            "idempotency_key": new.idempotency_key,
            "request_hash": new.request_hash() if new.idempotency_key else None,
            "attempts": 0,
            "max_attempts": new.max_attempts,
            "timeout_s": new.timeout_s,
            "created_at": now,
            "run_after": now,
            "updated_at": now,
            "step": 0,
            "steps": 0,
            "cancel_requested": False,
        }
        try:
            with self._transaction() as connection:
                if max_queued is not None:
                    queued = connection.execute(
                        select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED.value)
                    ).scalar_one()
                    if queued >= max_queued:
                        raise QueueFull(f"{queued} jobs are queued, the limit is {max_queued}; try again later")
                connection.execute(insert(jobs).values(**row))
                if new.webhook_url is not None:
                    connection.execute(insert(webhooks).values(job_id=job_id, url=new.webhook_url, state="waiting", attempts=0))
        except IntegrityError:
            if new.idempotency_key is None:
                raise
            existing = self.find_idempotent(new.idempotency_key, new.request)
            if existing is None:  # deleted by retention between the two statements: try once more
                return self.create(new)
            return existing, False
        return self.get(job_id), True

    def find_idempotent(self, key: str, request: dict[str, Any] | None) -> JobRecord | None:
        """The job an idempotency key made, if any; JobConflict when it was made by another request."""
        with self._read() as connection:
            existing = connection.execute(
                select(jobs.c.id, jobs.c.request_hash).where(jobs.c.idempotency_key == key)
            ).one_or_none()
        if existing is None:
            return None
        if existing.request_hash != _hash_request(request):
            raise JobConflict(
                f"idempotency key {key!r} was already used for a different request (job {existing.id})",
                field="Idempotency-Key",
            )
        return self.get(existing.id)

    def get(self, job_id: str) -> JobRecord:
        return self.snapshot(job_id)[0]

    def snapshot(self, job_id: str) -> tuple[JobRecord, Stage | None]:
        """The job and its stage as of one moment (a step recorded belongs to the stage read with it)."""
        with self._read() as connection:
            row = connection.execute(select(*_SUMMARY_COLUMNS).where(jobs.c.id == job_id)).one_or_none()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            has_preview = connection.execute(
                select(jobs.c.preview.is_not(None)).where(jobs.c.id == job_id)
            ).scalar_one()
            result_rows = connection.execute(
                select(results).where(results.c.job_id == job_id).order_by(results.c.index)
            ).all()
            stage = connection.execute(select(stages).where(stages.c.job_id == job_id)).first()
        record = _record(row, bool(has_preview), result_rows)
        return record, None if stage is None else Stage(stage.current, tuple(stage.done), dict(stage.outputs))

    def preview(self, job_id: str) -> bytes | None:
        with self._read() as connection:
            return connection.execute(select(jobs.c.preview).where(jobs.c.id == job_id)).scalar_one_or_none()

    def list(
        self,
        status: JobStatus | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        kind: str | None = None,
        statuses: tuple[JobStatus, ...] = (),
    ) -> list[JobRecord]:
        """Newest first; `before` is the (created_at, id) of the last job of the previous page."""
        query = select(*_SUMMARY_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if statuses:
            query = query.where(jobs.c.status.in_([value.value for value in statuses]))
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if before is not None:
            created_at, job_id = before
            query = query.where(
                or_(jobs.c.created_at < created_at, and_(jobs.c.created_at == created_at, jobs.c.id < job_id))
            )
        with self._read() as connection:
            rows = connection.execute(query).all()
            result_rows = connection.execute(
                select(results).where(results.c.job_id.in_([row.id for row in rows])).order_by(results.c.index)
            ).all()
        by_job: dict[str, list[Any]] = {}
        for result in result_rows:
            by_job.setdefault(result.job_id, []).append(result)
        return [_record(row, False, by_job.get(row.id, [])) for row in rows]

    def count(self, kind: str, statuses: tuple[JobStatus, ...]) -> int:
        """How many jobs of this kind are in these states."""
        query = select(func.count()).select_from(jobs).where(jobs.c.kind == kind, jobs.c.status.in_([value.value for value in statuses]))
        with self._read() as connection:
            return int(connection.execute(query).scalar_one())

    def queue_position(self, record: JobRecord) -> int:
        """1-based place among queued jobs: higher tiers first, then by age."""
        ahead = or_(
            jobs.c.priority > int(record.priority),
            and_(jobs.c.priority == int(record.priority), jobs.c.created_at < record.created_at),
        )
        with self._read() as connection:
            count = connection.execute(
                select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED.value, ahead)
            ).scalar_one()
        return int(count) + 1

    def queue_positions(self) -> dict[str, int]:
        """Every queued job's 1-based place, as `queue_position` counts it (the queue is bounded)."""
        order = (jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
        with self._read() as connection:
            ids = connection.execute(select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED.value).order_by(*order)).scalars()
            return {job_id: place for place, job_id in enumerate(ids, start=1)}

    def counts(self) -> dict[str, int]:
        with self._read() as connection:
            rows = connection.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        found = {status: 0 for status in JobStatus}
        for status, count in rows:
            found[JobStatus(status)] = count
        return {status.value: count for status, count in found.items()}

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once; ask a running one to stop at its next step."""
        now = time.time()
        with self._transaction() as connection:
            status = connection.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one_or_none()
            if status is None:
                raise JobNotFound(f"no job {job_id!r}")
            if JobStatus(status).terminal:
                raise JobConflict(f"job {job_id} has already ended ({status}); nothing to cancel")
            if status == JobStatus.QUEUED.value:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now, error="cancelled while queued")
                )
                _arm_webhook(connection, job_id, JobStatus.CANCELLED, now)
            else:
                connection.execute(
                    update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True, updated_at=now)
                )
        return self.get(job_id)

    def request_cancel_running(self, kind: str | None = None, job_id: str | None = None) -> list[str]:
        """Ask every running job (of this kind; or this one job) to stop (A1111's and ComfyUI's interrupt)."""
        query = select(jobs.c.id).where(jobs.c.status == JobStatus.RUNNING.value)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if job_id is not None:
            query = query.where(jobs.c.id == job_id)
        with self._transaction() as connection:
            ids = connection.execute(query).scalars().all()
            if ids:
                connection.execute(
                    update(jobs).where(jobs.c.id.in_(ids)).values(cancel_requested=True, updated_at=time.time())
                )
        return list(ids)

    # --- the worker side -----------------------------------------------------------------------------

    def claim_next(self, worker: str, stale_before: float) -> ClaimedJob | None:
        """Take the next due queued job (highest tier, then oldest) — the embedded queue's dispatch."""
        now = time.time()
        with self._transaction() as connection:
            # SKIP LOCKED (PostgreSQL, MySQL): concurrent claimers pass over a row another one is taking;
            # SQLite serialises writers with BEGIN IMMEDIATE instead and renders no locking clause.
            job_id = connection.execute(
                select(jobs.c.id)
                .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.run_after <= now)
                .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job_id is None:
                return None
            return self._claim(connection, job_id, worker, stale_before, now)

    def claim(self, job_id: str, worker: str, stale_before: float) -> ClaimedJob | None:
        """Take this job if it is queued and due (or running for a worker that stopped heartbeating)."""
        now = time.time()
        with self._transaction() as connection:
            return self._claim(connection, job_id, worker, stale_before, now)

    def _claim(self, connection: Connection, job_id: str, worker: str, stale_before: float, now: float) -> ClaimedJob | None:
        claimable = or_(
            and_(jobs.c.status == JobStatus.QUEUED.value, jobs.c.run_after <= now),
            and_(
                jobs.c.status == JobStatus.RUNNING.value,
                jobs.c.heartbeat_at < stale_before,
                jobs.c.attempts < jobs.c.max_attempts,
                jobs.c.cancel_requested.is_(False),
            ),
        )
        changed = connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id, claimable)
            .values(
                status=JobStatus.RUNNING.value,
                worker=worker,
                attempts=jobs.c.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                updated_at=now,
                step=0,
                preview=None,
            )
        ).rowcount
        if changed != 1:
            return None
        connection.execute(delete(stages).where(stages.c.job_id == job_id))  # a new attempt starts over
        row = connection.execute(select(*_SUMMARY_COLUMNS).where(jobs.c.id == job_id)).one()
        image = connection.execute(select(jobs.c.input_image).where(jobs.c.id == job_id)).scalar_one()
        record = _record(row, False, [])
        return ClaimedJob(Claim(job_id, worker, record.attempts), record, image)

    def _owned(self, claim: Claim):  # type: ignore[no-untyped-def]
        return and_(
            jobs.c.id == claim.job_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.worker == claim.worker,
            jobs.c.attempts == claim.attempt,
        )

    def _update_owned(self, connection: Connection, claim: Claim, **values: Any) -> bool:
        return connection.execute(update(jobs).where(self._owned(claim)).values(**values)).rowcount == 1

    def heartbeat(self, claim: Claim) -> tuple[bool, bool]:
        """Refresh the claim; returns (still owned, cancel requested)."""
        return self._touch(claim, heartbeat_at=time.time())

    def progress(self, claim: Claim, step: int, steps: int, preview: bytes | None) -> tuple[bool, bool]:
        """Record step k of n (and a preview); returns (still owned, cancel requested)."""
        now = time.time()
        values: dict[str, Any] = {"step": step, "steps": steps, "heartbeat_at": now, "updated_at": now}
        if preview is not None:
            values["preview"] = preview
        return self._touch(claim, **values)

    def stage(self, claim: Claim, stage: Stage) -> tuple[bool, bool]:
        """Record where a multi-part job stands; returns (still owned, cancel requested)."""
        now = time.time()
        with self._transaction() as connection:
            # The step count starts again with each part (it counts the running part's steps).
            if not self._update_owned(connection, claim, heartbeat_at=now, updated_at=now, step=0, steps=0):
                return False, False
            connection.execute(delete(stages).where(stages.c.job_id == claim.job_id))
            connection.execute(
                insert(stages).values(job_id=claim.job_id, current=stage.current, done=list(stage.done), outputs=stage.outputs, updated_at=now)
            )
            cancel = connection.execute(select(jobs.c.cancel_requested).where(jobs.c.id == claim.job_id)).scalar_one()
        return True, bool(cancel)

    def stage_of(self, job_id: str) -> Stage | None:
        """The last stage a multi-part job recorded (None before its first, or for other jobs)."""
        return self.snapshot(job_id)[1]

    def _touch(self, claim: Claim, **values: Any) -> tuple[bool, bool]:
        with self._transaction() as connection:
            if not self._update_owned(connection, claim, **values):
                return False, False
            cancel = connection.execute(select(jobs.c.cancel_requested).where(jobs.c.id == claim.job_id)).scalar_one()
        return True, bool(cancel)

    def finish(self, claim: Claim, produced: list[ResultRecord]) -> bool:
        now = time.time()
        with self._transaction() as connection:
            if not self._update_owned(
                connection, claim, status=JobStatus.FINISHED.value, finished_at=now, updated_at=now, error=None
            ):
                return False
            connection.execute(delete(results).where(results.c.job_id == claim.job_id))
            if produced:
                connection.execute(insert(results), [{"job_id": claim.job_id, **result.__dict__} for result in produced])
            _arm_webhook(connection, claim.job_id, JobStatus.FINISHED, now)
        return True

    def end(self, claim: Claim, status: JobStatus, reason: str) -> bool:
        """Record a failed or cancelled attempt as the job's end."""
        now = time.time()
        with self._transaction() as connection:
            if not self._update_owned(connection, claim, status=status.value, finished_at=now, updated_at=now, error=reason):
                return False
            _arm_webhook(connection, claim.job_id, status, now)
            return True

    def retry_later(self, claim: Claim, reason: str, run_after: float) -> bool:
        with self._transaction() as connection:
            return self._update_owned(
                connection,
                claim,
                status=JobStatus.QUEUED.value,
                run_after=run_after,
                updated_at=time.time(),
                error=reason,
                worker=None,
            )

    def release(self, claim: Claim, reason: str) -> bool:
        """Put a running job back in the queue at once, the attempt not counted (a worker shutting down)."""
        with self._transaction() as connection:
            return self._update_owned(
                connection,
                claim,
                status=JobStatus.QUEUED.value,
                attempts=jobs.c.attempts - 1,
                run_after=time.time(),
                updated_at=time.time(),
                error=reason,
                worker=None,
            )

    # --- housekeeping --------------------------------------------------------------------------------

    def recover_stale(self, stale_before: float) -> tuple[list[str], list[str]]:
        """Running jobs whose worker stopped heartbeating: back to queued, or failed after their last
        attempt. Returns (requeued ids, failed ids)."""
        now = time.time()
        with self._transaction() as connection:
            rows = connection.execute(
                select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts, jobs.c.cancel_requested, jobs.c.worker).where(
                    jobs.c.status == JobStatus.RUNNING.value, jobs.c.heartbeat_at < stale_before
                )
            ).all()
            requeued, failed = [], []
            for row in rows:
                lost = f"worker {row.worker} stopped responding during attempt {row.attempts}"
                where = and_(
                    jobs.c.id == row.id,
                    jobs.c.status == JobStatus.RUNNING.value,
                    jobs.c.attempts == row.attempts,
                    jobs.c.heartbeat_at < stale_before,  # a heartbeat since the select keeps it (READ COMMITTED)
                )
                if row.cancel_requested:
                    values = {"status": JobStatus.CANCELLED.value, "finished_at": now, "error": f"cancelled ({lost})"}
                    failed.append(row.id)
                elif row.attempts >= row.max_attempts:
                    values = {"status": JobStatus.FAILED.value, "finished_at": now, "error": f"{lost}; no attempts left"}
                    failed.append(row.id)
                else:
                    values = {"status": JobStatus.QUEUED.value, "run_after": now, "error": lost, "worker": None}
                    requeued.append(row.id)
                if connection.execute(update(jobs).where(where).values(updated_at=now, **values)).rowcount != 1:
                    (requeued if values["status"] == JobStatus.QUEUED.value else failed).pop()
                elif values["status"] != JobStatus.QUEUED.value:
                    _arm_webhook(connection, row.id, JobStatus(values["status"]), now)
        return requeued, failed

    # --- webhooks ------------------------------------------------------------------------------------

    def webhook(self, job_id: str) -> Webhook | None:
        with self._read() as connection:
            row = connection.execute(select(webhooks).where(webhooks.c.job_id == job_id)).first()
        return None if row is None else Webhook(**row._mapping)

    def due_webhooks(self, now: float, lease_s: float, limit: int = 16) -> list[Webhook]:
        """Take the callbacks due now: each is leased (its next_at moved past the lease) to one sender,
        so two servers on one database do not both deliver it."""
        with self._read() as connection:
            rows = connection.execute(
                select(webhooks).where(webhooks.c.state == "pending", webhooks.c.next_at <= now).order_by(webhooks.c.next_at).limit(limit)
            ).all()
        taken = []
        for row in rows:
            with self._transaction() as connection:
                leased = connection.execute(
                    update(webhooks)
                    .where(webhooks.c.job_id == row.job_id, webhooks.c.state == "pending", webhooks.c.next_at == row.next_at)
                    .values(next_at=now + lease_s)
                ).rowcount
            if leased == 1:
                taken.append(Webhook(**row._mapping))
        return taken

    def webhook_attempted(self, job_id: str, now: float, error: str | None, retry_at: float | None) -> None:
        """Record one delivery attempt: delivered (error None), to be retried at `retry_at`, or given up."""
        values: dict[str, Any] = {"attempts": webhooks.c.attempts + 1, "last_error": error}
        if error is None:
            values.update(state="delivered", delivered_at=now, next_at=None)
        elif retry_at is None:
            values.update(state="failed", next_at=None)
        else:
            values.update(next_at=retry_at)
        with self._transaction() as connection:
            connection.execute(update(webhooks).where(webhooks.c.job_id == job_id, webhooks.c.state == "pending").values(**values))

    def queued(self) -> list[tuple[str, Priority, float]]:
        """Every queued job: (id, priority, run_after)."""
        with self._read() as connection:
            rows = connection.execute(
                select(jobs.c.id, jobs.c.priority, jobs.c.run_after)
                .where(jobs.c.status == JobStatus.QUEUED.value)
                .order_by(jobs.c.priority.desc(), jobs.c.created_at)
            ).all()
        return [(row.id, Priority(row.priority), row.run_after) for row in rows]

    def purge(self, ended_before: float) -> list[JobRecord]:
        """Delete jobs that ended before the cutoff; returns them (with their results) so files can go."""
        with self._transaction() as connection:
            ids = connection.execute(
                select(jobs.c.id).where(
                    jobs.c.status.in_([status.value for status in JobStatus if status.terminal]),
                    jobs.c.finished_at < ended_before,
                )
            ).scalars().all()
        purged = []
        for job_id in ids:
            record = self.get(job_id)
            with self._transaction() as connection:
                connection.execute(delete(results).where(results.c.job_id == job_id))
                connection.execute(delete(stages).where(stages.c.job_id == job_id))
                connection.execute(delete(webhooks).where(webhooks.c.job_id == job_id))
                connection.execute(delete(jobs).where(jobs.c.id == job_id))
            purged.append(record)
        return purged


def _arm_webhook(connection: Connection, job_id: str, status: JobStatus, now: float) -> None:
    """The job has just ended: its callback (if it has one) is due now."""
    connection.execute(
        update(webhooks).where(webhooks.c.job_id == job_id, webhooks.c.state == "waiting").values(state="pending", event=status.value, next_at=now)
    )


def _hash_request(request: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _record(row: Any, has_preview: bool, result_rows: list[Any]) -> JobRecord:
    return JobRecord(
        id=row.id,
        kind=row.kind,
        status=JobStatus(row.status),
        priority=Priority(row.priority),
        params=row.params,
        idempotency_key=row.idempotency_key,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        created_at=row.created_at,
        run_after=row.run_after,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        updated_at=row.updated_at,
        worker=row.worker,
        step=row.step,
        steps=row.steps,
        has_preview=has_preview,
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        results=tuple(
            ResultRecord(r.index, r.path, r.seed, r.width, r.height, r.bytes) for r in result_rows
        ),
    )


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    # SQLite: WAL so readers never wait for the writer, and every writing transaction BEGIN IMMEDIATE
    # so two processes (server and workers) never deadlock upgrading a read lock to a write lock.
    # synchronous=FULL: a job acknowledged to a client survives a power loss, not just a crash.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
