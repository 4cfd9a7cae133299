"""How job ids reach workers: the embedded queue (the database itself) or Dramatiq on Redis.

Both hand a worker a job id; the worker then *claims* the job in the database (`JobStore.claim*`),
which succeeds for exactly one worker. That is what makes duplicate deliveries harmless, and why the
queue never has to be the record of a job: a job that is in the database but whose message was lost
(a crash between the insert and the send, a Redis flush) is sent again by `resubmit_queued()` when a
server starts, and a job whose worker died is queued again by `Housekeeper`.

- `EmbeddedQueue`: worker threads inside the server take the next due job straight from the database,
  highest tier first, then oldest. Nothing else to run: `make serve` needs no Redis.
- `RedisQueue`: Dramatiq's Redis broker, one queue (and actor) per tier; `streamcanvas worker`
  processes, on this machine or others, consume them. Dramatiq gives delayed delivery (retry backoff),
  acknowledgements and the re-delivery of messages held by a dead worker; tiers map onto actor
  priorities, so a worker always takes a waiting high-tier job before a lower one.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
from redis.exceptions import RedisError

from .errors import QueueUnavailable
from .results import delete_results
from .store import ClaimedJob, JobStore, Priority

logger = logging.getLogger(__name__)

Runner = Callable[[ClaimedJob], object]


class EmbeddedQueue:
    mode = "embedded"

    def __init__(self, store: JobStore, runner: Runner, workers: int = 1, poll_s: float = 0.5, torch_threads: int | None = None) -> None:
        self.store = store
        self.runner = runner
        self.poll_s = poll_s
        self.torch_threads = torch_threads
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(f"embedded-{socket.gethostname()}-{index}",), name=f"batch-{index}", daemon=True)
            for index in range(workers)
        ]

    def submit(self, job_id: str, priority: Priority, delay_s: float = 0.0) -> None:
        self._wake.set()  # the row is the message; a delayed retry is picked up once due (run_after)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self, name: str) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        while not self._stopping.is_set():
            try:
                claimed = self.store.claim_next(name, stale_before=0.0)
            except Exception:  # noqa: BLE001 - keep the worker alive through a database hiccup
                logger.exception("claiming the next job failed")
                claimed = None
            if claimed is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self.runner(claimed)
            except Exception:  # noqa: BLE001 - its claim goes stale and housekeeping queues it again
                logger.exception("job %s: the worker failed outside the job", claimed.claim.job_id)


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """Raise `QueueUnavailable` unless a Redis answers a PING at `url` within `timeout_s`. Run before
    anything slow at start-up: without it a worker loaded its models, said "ready" and then logged
    Dramatiq's connection errors every few seconds, and a server failed inside its start-up hook."""
    import redis

    client = None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        client.ping()
    except (RedisError, ValueError) as error:
        raise QueueUnavailable(
            f"no Redis answers at {shown_url(url)} ({error}); start redis-server there, or give --redis-url "
            "(STREAMCANVAS_REDIS_URL) the address of the one the server and workers share"
        ) from error
    finally:
        if client is not None:
            client.close()


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisQueue:
    mode = "redis"

    def __init__(
        self,
        url: str,
        namespace: str = "streamcanvas",
        heartbeat_timeout_s: float = 30.0,
    ) -> None:
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        self.url = url
        self.namespace = namespace
        # Every broker call has this chance in a million of running Redis-side maintenance, which
        # re-queues the messages of workers whose Dramatiq heartbeat is older than heartbeat_timeout.
        self.broker = RedisBroker(
            url=url,
            namespace=namespace,
            middleware=[],
            heartbeat_timeout=int(heartbeat_timeout_s * 1000),
            maintenance_chance=100_000,
        )
        self._handler: Callable[[str, Priority], None] | None = None
        self.actors = {
            priority: dramatiq.actor(
                functools.partial(self._handle, priority=priority),
                actor_name=f"run_job_{priority.name.lower()}",
                queue_name=f"jobs-{priority.name.lower()}",
                priority=(Priority.HIGH - priority) * 10,  # Dramatiq runs lower numbers first
                broker=self.broker,
            )
            for priority in Priority
        }
        self._worker = None

    def submit(self, job_id: str, priority: Priority, delay_s: float = 0.0) -> None:
        delay = int(delay_s * 1000) if delay_s > 0 else None
        self.actors[priority].send_with_options(args=(job_id,), delay=delay)

    def _handle(self, job_id: str, *, priority: Priority) -> None:
        if self._handler is None:
            raise RuntimeError("this process does not consume jobs (no handler set)")
        self._handler(job_id, priority)

    def consume(self, handler: Callable[[str, Priority], None]) -> None:
        """Start consuming in this process (`streamcanvas worker`): one job at a time."""
        from dramatiq import Worker

        self._handler = handler
        # worker_timeout bounds how long an idle consumer sleeps between polls of Redis (its back-off
        # grows to this): 100 ms instead of Dramatiq's 1 s, so a new job starts within ~0.1 s.
        worker = Worker(self.broker, worker_threads=1, worker_timeout=100)
        worker.queue_prefetch = 1  # hold as few messages as possible while busy, so idle workers get them
        worker.start()
        self._worker = worker

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        if self._worker is not None:
            self._worker.stop(timeout=int(timeout * 1000))
        self.broker.close()

    # Live sessions on a host tell that host's workers to yield the device (see worker.LiveGate).
    def _live_key(self) -> str:
        return f"{self.namespace}:live-sessions:{socket.gethostname()}"

    def publish_live_sessions(self, count: int, ttl_s: float = 3.0) -> None:
        self.broker.client.set(self._live_key(), count, px=int(ttl_s * 1000))

    def live_sessions(self) -> int:
        """Live sessions streaming on this host; 0 when Redis cannot say (the count is advisory)."""
        try:
            value = self.broker.client.get(self._live_key())
        except RedisError:
            logger.warning("could not read the live session count from Redis", exc_info=True)
            return 0
        return int(value) if value else 0


JobQueue = EmbeddedQueue | RedisQueue


def resubmit_queued(store: JobStore, queue: JobQueue) -> int:
    """Send every queued job to the queue again (at start-up): a job is never only in the database."""
    now = time.time()
    queued = store.queued()
    for job_id, priority, run_after in queued:
        queue.submit(job_id, priority, max(0.0, run_after - now))
    return len(queued)


class Housekeeper:
    """Periodically: queue again the jobs of workers that stopped heartbeating; delete expired jobs."""

    def __init__(
        self,
        store: JobStore,
        queue: JobQueue,
        stale_after_s: float,
        interval_s: float,
        retention_s: float | None = None,
        results_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.stale_after_s = stale_after_s
        self.interval_s = interval_s
        self.retention_s = retention_s
        self.results_dir = results_dir
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def run_once(self) -> None:
        requeued, failed = self.store.recover_stale(time.time() - self.stale_after_s)
        for job_id in requeued:
            logger.warning("job %s: its worker stopped heartbeating; queued again", job_id)
            self.queue.submit(job_id, self.store.get(job_id).priority)
        for job_id in failed:
            logger.error("job %s: its worker stopped heartbeating on its last attempt", job_id)
        if self.retention_s is not None and self.results_dir is not None:
            for record in self.store.purge(time.time() - self.retention_s):
                delete_results(self.results_dir, record.id)

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - housekeeping retries on its next round
                logger.exception("batch housekeeping failed")
