"""Typed errors of the batch queue. Each has an HTTP status and a stable `code` that API clients see."""

from __future__ import annotations


class BatchError(Exception):
    status = 400
    code = "batch_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidJob(BatchError):
    """The request is malformed, names an unknown field or kind, or has a value out of range."""

    status = 422
    code = "invalid_job"


class JobNotFound(BatchError):
    status = 404
    code = "job_not_found"


class JobConflict(BatchError):
    """The job cannot do that in its state (cancel a finished job), or an idempotency key was reused
    with a different request."""

    status = 409
    code = "job_conflict"


class QueueFull(BatchError):
    status = 503
    code = "queue_full"


class QueueUnavailable(Exception):
    """The job queue's Redis does not answer at start-up: the command stops and says where it looked."""


class Unauthorized(BatchError):
    status = 401
    code = "unauthorized"


class Forbidden(BatchError):
    status = 403
    code = "forbidden"


class JobInterrupted(Exception):
    """Raised inside a running job to stop it at the next step; not an error of the request."""


class JobCancelled(JobInterrupted):
    pass


class JobTimedOut(JobInterrupted):
    pass


class WorkerStopping(JobInterrupted):
    """The worker is shutting down: the job goes back to the queue without using up an attempt."""


class JobLost(JobInterrupted):
    """This worker no longer owns the job (its claim was taken over after a missed heartbeat)."""
