"""Running one claimed job: progress, cancellation, timeout, heartbeats, retries and the result files.

The same `JobExecutor` serves the embedded queue (a thread in the server) and `streamcanvas worker`
processes on Redis. What it guarantees, with the store's conditional writes:

- every attempt ends in exactly one recorded outcome: finished (with its result rows), failed with a
  reason, cancelled, or queued again for a retry;
- while it runs, a heartbeat thread refreshes the claim; if the worker dies (even SIGKILL), the claim
  goes stale and housekeeping queues the job again (`JobStore.recover_stale`), so a job is never lost.
  Results are idempotent — same seed, same files at the same paths — so running an attempt twice is
  harmless (at-least-once execution).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from .errors import JobCancelled, JobLost, JobTimedOut, WorkerStopping
from .kinds import KINDS
from .rendering import QualityRenderer
from .results import write_results
from .store import ClaimedJob, JobStatus, JobStore, Priority, Stage

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, OperationalError, RedisError, torch.OutOfMemoryError)
"""Failures worth another attempt: a full or missing disk, a database or Redis hiccup, GPU memory pressure."""


@dataclass(frozen=True)
class RetryPolicy:
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff: backoff_s, 2×, 4×, … capped at max_backoff_s."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))


class LiveGate:
    """How a batch job shares the device with live sessions.

    While any live session is streaming on this device, the batch job may use at most `share` of the
    device's time: after a step that took t seconds it pauses t·(1−share)/share. With share 0 it waits
    until no live session streams; with share 1 it never yields. Time spent paused does not count
    against the job's timeout.
    """

    def __init__(self, share: float, live_active: Callable[[], bool] = lambda: False) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be within [0, 1], got {share}")
        self.share = share
        self.live_active = live_active

    def after_step(self, step_s: float, check: Callable[[], None], live: bool | None = None) -> float:
        """Pause as the policy says (calling `check` to honour cancellation and shutdown); returns the
        seconds paused. `live` is whether live sessions stream, if the caller has just asked."""
        if live is None:
            live = self.live_active()
        if self.share >= 1.0 or not live:
            return 0.0
        started = time.monotonic()
        pause_until = started + (step_s * (1 - self.share) / self.share if self.share > 0 else float("inf"))
        while time.monotonic() < pause_until and self.live_active():
            check()
            time.sleep(min(0.1, max(0.0, pause_until - time.monotonic())))
        return time.monotonic() - started


class JobExecutor:
    def __init__(
        self,
        store: JobStore,
        renderer: QualityRenderer,
        results_dir: Path,
        worker_name: str,
        *,
        heartbeat_s: float = 2.0,
        retry: RetryPolicy = RetryPolicy(),
        gate: LiveGate | None = None,
        requeue: Callable[[str, Priority, float], None] = lambda job_id, priority, delay_s: None,
        preview_interval_s: float = 0.5,
        torch_threads: int | None = None,
    ) -> None:
        self.store = store
        self.renderer = renderer
        self.results_dir = results_dir
        self.worker_name = worker_name
        self.heartbeat_s = heartbeat_s
        self.retry = retry
        self.gate = gate or LiveGate(1.0)
        self.requeue = requeue
        self.preview_interval_s = preview_interval_s
        self.torch_threads = torch_threads
        self.stopping = threading.Event()
        """Set when the worker shuts down: the job in hand is put back in the queue at its next step."""

    def stop(self) -> None:
        self.stopping.set()

    def run(self, claimed: ClaimedJob) -> JobStatus | None:
        """Run one attempt to its recorded end; returns the outcome (None when the claim was lost)."""
        claim, record = claimed.claim, claimed.record
        stop_heartbeat = threading.Event()
        flags = {"lost": False, "cancel": False}

        def beat() -> None:
            while not stop_heartbeat.wait(self.heartbeat_s):
                try:
                    owned, cancel = self.store.heartbeat(claim)
                except Exception:  # noqa: BLE001 - the database is briefly unavailable: beat again next time
                    logger.warning("job %s: heartbeat failed", claim.job_id, exc_info=True)
                    continue
                flags["lost"], flags["cancel"] = not owned, cancel

        heartbeat = threading.Thread(target=beat, name=f"heartbeat-{claim.job_id[:8]}", daemon=True)
        heartbeat.start()
        started = time.monotonic()
        paused = 0.0
        last_step_at: float | None = None  # the first step also built the pipeline: it is not timed
        last_preview_at = 0.0
        position = {"step": 0, "steps": 0}
        threads_used = {torch.get_num_threads()}  # the counts the job's torch ops ran on (CPU)

        def check_interrupts() -> None:
            if self.stopping.is_set():
                raise WorkerStopping(f"interrupted at step {position['step']} of {position['steps']} by a worker shutdown")
            if flags["lost"]:
                raise JobLost(f"job {claim.job_id} attempt {claim.attempt} was taken over")
            if flags["cancel"]:
                raise JobCancelled(f"cancelled at step {position['step']} of {position['steps']}")

        def check() -> None:
            check_interrupts()
            running_s = time.monotonic() - started - paused
            if running_s > record.timeout_s:
                raise JobTimedOut(f"timed out after {running_s:.1f} s (timeout_s={record.timeout_s:g})")

        def on_step(step: int, steps: int, make_preview: Callable[[], bytes]) -> None:
            nonlocal paused, last_step_at, last_preview_at
            position.update(step=step, steps=steps)
            now = time.monotonic()
            preview = None
            if record.params.get("preview") and (now - last_preview_at >= self.preview_interval_s or step == steps):
                preview = make_preview()
                last_preview_at = now
            owned, cancel = self.store.progress(claim, step, steps, preview)
            flags["lost"] = flags["lost"] or not owned
            flags["cancel"] = flags["cancel"] or cancel
            check()
            live = self.gate.live_active()
            threads_used.add(self._use_threads(live))
            step_s = now - last_step_at if last_step_at is not None else 0.0
            paused += self.gate.after_step(step_s, check_interrupts, live)  # a pause is not running time
            last_step_at = time.monotonic()

        def on_stage(stage: Stage) -> None:
            owned, cancel = self.store.stage(claim, stage)
            flags["lost"] = flags["lost"] or not owned
            flags["cancel"] = flags["cancel"] or cancel
            check()

        try:
            logger.info("job %s (%s) attempt %d started on %s", claim.job_id, record.kind, claim.attempt, self.worker_name)
            check()
            kind = KINDS.get(record.kind)
            if kind is None:
                raise ValueError(f"this worker does not know the job kind {record.kind!r} (an older version?)")
            images = kind.run(record.params, claimed.input_image, self.renderer, on_step, on_stage)
            check()
            rendered_on = {"torch_threads": sorted(threads_used)} if self.renderer.model.placement.device.type == "cpu" else {}
            produced = write_results(self.results_dir, claim.job_id, record.kind, images, rendered_on)
            outcome = JobStatus.FINISHED if self.store.finish(claim, produced) else None
        except JobLost:
            outcome = None
        except WorkerStopping as reason:
            outcome = JobStatus.QUEUED if self.store.release(claim, str(reason)) else None
            if outcome is not None:
                self.requeue(claim.job_id, record.priority, 0.0)
        except JobCancelled as reason:
            outcome = JobStatus.CANCELLED if self.store.end(claim, JobStatus.CANCELLED, str(reason)) else None
        except JobTimedOut as reason:
            outcome = JobStatus.FAILED if self.store.end(claim, JobStatus.FAILED, str(reason)) else None
        except TRANSIENT_ERRORS as error:
            outcome = self._transient(claimed, error)
        except Exception as error:  # noqa: BLE001 - a worker is an entry point: the job fails with the reason
            logger.exception("job %s failed", claim.job_id)
            reason = f"{type(error).__name__}: {error}"
            outcome = JobStatus.FAILED if self.store.end(claim, JobStatus.FAILED, reason) else None
        finally:
            stop_heartbeat.set()
            heartbeat.join()
            self._use_threads(False)
        logger.info("job %s attempt %d ended: %s", claim.job_id, claim.attempt, outcome.value if outcome else "claim lost")
        return outcome

    def _use_threads(self, live: bool) -> int:
        """On the CPU, one torch thread while live sessions stream, so the batch job's OpenMP pool and
        the live slots' together do not outnumber the cores; all of them otherwise. Returns the count
        now in use. (The count changes the order of float sums, so the last bits of the image: the
        result records the counts a job ran on.)"""
        if self.torch_threads is None or self.torch_threads <= 1:
            return torch.get_num_threads()
        wanted = 1 if live else self.torch_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted

    def _transient(self, claimed: ClaimedJob, error: BaseException) -> JobStatus | None:
        claim, record = claimed.claim, claimed.record
        reason = f"attempt {claim.attempt} of {record.max_attempts} failed: {type(error).__name__}: {error}"
        if claim.attempt >= record.max_attempts:
            logger.error("job %s: %s; giving up", claim.job_id, reason)
            return JobStatus.FAILED if self.store.end(claim, JobStatus.FAILED, reason) else None
        delay = self.retry.delay(claim.attempt)
        logger.warning("job %s: %s; retrying in %.1f s", claim.job_id, reason, delay)
        if not self.store.retry_later(claim, f"{reason}; retrying in {delay:g} s", time.time() + delay):
            return None
        self.requeue(claim.job_id, record.priority, delay)
        return JobStatus.QUEUED
