"""The job store on real databases — a SQLite file and a PostgreSQL server: claims are exclusive, a
taken-over attempt cannot write, and stale jobs come back. Several threads and two store objects (as
two processes would) share one database."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from batch_helpers import PostgresServer

from streamcanvas.batch_fallback.errors import JobConflict, QueueFull
from streamcanvas.batch_fallback.store import JobStatus, JobStore, NewJob, Priority, ResultRecord, jobs


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"jobs_{uuid.uuid4().hex[:12]}"  # a database of its own for each test
    engine = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def test_every_job_is_claimed_by_exactly_one_of_many_workers(url: str) -> None:
    stores = [JobStore(url), JobStore(url)]  # two engines on one file, like server and worker processes
    created = [stores[0].create(NewJob("txt2img", {"n": index}))[0].id for index in range(60)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work(name: str, store: JobStore) -> None:
        start.wait(10)  # all four race from the first claim on
        while (job := store.claim_next(name, stale_before=0.0)) is not None:
            time.sleep(0.001)  # hold it a moment, as a real job would, so the others get their turn
            assert store.finish(job.claim, [])
            with lock:
                claimed.append((job.claim.job_id, name))

    threads = [threading.Thread(target=work, args=(f"w{index}", stores[index % 2])) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(job_id for job_id, _ in claimed) == sorted(created)  # each exactly once
    assert stores[1].counts()["finished"] == 60


def test_tiers_then_age_decide_the_order(url: str) -> None:
    store = JobStore(url)
    low = store.create(NewJob("txt2img", {}, Priority.LOW))[0]
    normal = store.create(NewJob("txt2img", {}, Priority.NORMAL))[0]
    high_old = store.create(NewJob("txt2img", {}, Priority.HIGH))[0]
    high_new = store.create(NewJob("txt2img", {}, Priority.HIGH))[0]
    assert [store.queue_position(store.get(job.id)) for job in (high_old, high_new, normal, low)] == [1, 2, 3, 4]
    order = []
    while (job := store.claim_next("w", 0.0)) is not None:
        order.append(job.claim.job_id)
        store.finish(job.claim, [])
    assert order == [high_old.id, high_new.id, normal.id, low.id]


def test_a_taken_over_attempt_cannot_write_its_outcome(url: str) -> None:
    store = JobStore(url)
    job = store.create(NewJob("txt2img", {}, max_attempts=3))[0]
    first = store.claim(job.id, "w1", stale_before=0.0)
    assert first is not None and store.claim(job.id, "w2", stale_before=0.0) is None  # held and fresh
    time.sleep(0.05)
    requeued, failed = store.recover_stale(stale_before=time.time())  # w1 stopped heartbeating
    assert requeued == [job.id] and failed == []
    second = store.claim(job.id, "w2", stale_before=0.0)
    assert second is not None and second.claim.attempt == 2
    assert store.heartbeat(first.claim) == (False, False)
    assert not store.finish(first.claim, [ResultRecord(0, "stale.png", 1, 8, 8, 1)])
    assert not store.end(first.claim, JobStatus.FAILED, "late")
    assert store.finish(second.claim, [ResultRecord(0, "fresh.png", 1, 8, 8, 1)])
    record = store.get(job.id)
    assert record.status is JobStatus.FINISHED and [r.path for r in record.results] == ["fresh.png"]


def test_a_job_whose_worker_keeps_dying_fails_after_its_last_attempt(url: str) -> None:
    store = JobStore(url)
    job = store.create(NewJob("txt2img", {}, max_attempts=2))[0]
    for attempt in (1, 2):
        claimed = store.claim_next(f"w{attempt}", 0.0)
        assert claimed is not None and claimed.claim.attempt == attempt
        time.sleep(0.01)
        store.recover_stale(stale_before=time.time())
    record = store.get(job.id)
    assert record.status is JobStatus.FAILED and "no attempts left" in (record.error or "")


def test_cancel_moves_queued_at_once_and_flags_running(url: str) -> None:
    store = JobStore(url)
    queued = store.create(NewJob("txt2img", {}))[0]
    running_job = store.create(NewJob("txt2img", {}, Priority.HIGH))[0]
    running = store.claim_next("w", 0.0)
    assert running is not None and running.claim.job_id == running_job.id
    assert store.cancel(queued.id).status is JobStatus.CANCELLED
    flagged = store.cancel(running_job.id)
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
    assert store.heartbeat(running.claim) == (True, True)
    assert store.end(running.claim, JobStatus.CANCELLED, "cancelled at step 3 of 9")
    with pytest.raises(JobConflict):
        store.cancel(running_job.id)


def test_idempotency_keys(url: str) -> None:
    store = JobStore(url)
    request = {"kind": "txt2img", "params": {"prompt": "x"}}
    first, created = store.create(NewJob("txt2img", {"seed": 1}, idempotency_key="k", request=request))
    again, created_again = store.create(NewJob("txt2img", {"seed": 2}, idempotency_key="k", request=request))
    assert created and not created_again and again.id == first.id and again.params == {"seed": 1}
    with pytest.raises(JobConflict):
        store.create(NewJob("txt2img", {}, idempotency_key="k", request={**request, "priority": "high"}))


def test_purge_deletes_only_jobs_that_ended_before_the_cutoff(url: str) -> None:
    store = JobStore(url)
    ended = store.create(NewJob("txt2img", {}))[0]
    waiting = store.create(NewJob("txt2img", {}))[0]
    claimed = store.claim(ended.id, "w", 0.0)
    assert claimed is not None and store.finish(claimed.claim, [ResultRecord(0, "a.png", 1, 8, 8, 1)])
    assert store.purge(ended_before=time.time() - 60) == []
    purged = store.purge(ended_before=time.time() + 1)
    assert [record.id for record in purged] == [ended.id] and purged[0].results[0].path == "a.png"
    assert [record.id for record in store.list()] == [waiting.id]


def test_a_stale_job_is_not_taken_over_past_its_attempts_or_once_cancelled(url: str) -> None:
    store = JobStore(url)
    last_try = store.create(NewJob("txt2img", {}, max_attempts=1))[0]
    cancelled = store.create(NewJob("txt2img", {}, max_attempts=3))[0]
    assert store.claim(last_try.id, "w1", 0.0) is not None
    held = store.claim(cancelled.id, "w1", 0.0)
    assert held is not None
    store.cancel(cancelled.id)
    time.sleep(0.01)
    now = time.time()
    assert store.claim(last_try.id, "w2", stale_before=now) is None  # a redelivered message cannot run attempt 2
    assert store.claim(cancelled.id, "w2", stale_before=now) is None
    requeued, ended = store.recover_stale(stale_before=now)
    assert requeued == [] and sorted(ended) == sorted([last_try.id, cancelled.id])
    assert store.get(last_try.id).status is JobStatus.FAILED and store.get(cancelled.id).status is JobStatus.CANCELLED


def test_pages_do_not_skip_jobs_created_at_the_same_instant(url: str) -> None:
    store = JobStore(url)
    created = {store.create(NewJob("txt2img", {"n": index}))[0].id for index in range(7)}
    with store.engine.begin() as connection:  # the same timestamp for all: the id breaks the tie
        connection.execute(jobs.update().values(created_at=1000.0))
    seen: list[str] = []
    before = None
    while page := store.list(limit=3, before=before):
        seen += [record.id for record in page]
        before = (page[-1].created_at, page[-1].id)
    assert sorted(seen) == sorted(created) and len(seen) == 7


def test_the_queue_bound_holds_under_concurrent_creates(url: str) -> None:
    store = JobStore(url)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            store.create(NewJob("txt2img", {}), max_queued=10)
            outcome = "created"
        except QueueFull:
            outcome = "full"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 16 and outcomes.count("created") >= 10
    if url.startswith("sqlite"):
        assert outcomes.count("created") == 10 and store.counts()["queued"] == 10
