"""`streamcanvas worker`: a process that runs batch jobs from Redis until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import torch

from streamcanvas.pipelines.devices import in_short_lived_thread
from streamcanvas.pipelines.loading import ModelSpec, inference_threads
from streamcanvas.pipelines.models import load_models

from .queues import Housekeeper, RedisQueue, check_redis, shown_url
from .rendering import QualityRenderer
from .service import BatchConfig
from .store import JobStore, Priority
from .worker import JobExecutor, LiveGate, RetryPolicy

logger = logging.getLogger(__name__)


def run_worker(config: BatchConfig, specs: list[tuple[str, ModelSpec]], threads: int | None = None, budget_bytes: int | None = None) -> None:
    if not config.redis_url:
        raise ValueError("a worker needs --redis-url")
    check_redis(config.redis_url)
    threads = inference_threads(threads)
    models = in_short_lived_thread(lambda: load_models(specs, budget_bytes))
    store = JobStore(config.database_url)
    queue = RedisQueue(config.redis_url, config.redis_namespace, config.heartbeat_timeout_s)
    name = f"{socket.gethostname()}:{os.getpid()}"
    executor = JobExecutor(
        store,
        QualityRenderer(models),
        config.results_dir,
        worker_name=name,
        heartbeat_s=config.heartbeat_s,
        retry=RetryPolicy(config.retry_backoff_s),
        gate=LiveGate(config.live_share, lambda: queue.live_sessions() > 0),
        requeue=queue.submit,
        torch_threads=threads,
    )

    def handle(job_id: str, priority: Priority) -> None:
        torch.set_num_threads(threads)  # per calling thread for OpenMP: this is Dramatiq's worker thread
        try:
            claimed = store.claim(job_id, name, stale_before=time.time() - config.heartbeat_timeout_s)
        except Exception:  # noqa: BLE001 - the database is unreachable: keep the message, try later
            logger.exception("job %s: could not claim it; sending it again in %.0f s", job_id, config.heartbeat_timeout_s)
            queue.submit(job_id, priority, config.heartbeat_timeout_s)
            return
        if claimed is None:
            logger.info("job %s: not claimable (done, cancelled, not yet due, or running elsewhere); skipped", job_id)
            return
        try:
            executor.run(claimed)
        except Exception:  # noqa: BLE001 - its claim goes stale and housekeeping queues it again
            logger.exception("job %s: the worker failed outside the job", job_id)

    # Workers also look for jobs whose worker died, so recovery does not wait for the server.
    housekeeper = Housekeeper(store, queue, config.heartbeat_timeout_s, config.housekeeping_interval_s)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    queue.consume(handle)
    housekeeper.start()
    logger.info("worker %s consuming %s (models: %s)", name, shown_url(config.redis_url), ", ".join(models.names))
    print(f"streamcanvas worker {name} ready", flush=True)
    stopping.wait()
    logger.info("worker %s stopping: the job in hand goes back to the queue at its next step", name)
    housekeeper.stop()
    executor.stop()
    queue.stop()
    store.close()
