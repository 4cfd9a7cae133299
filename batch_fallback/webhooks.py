"""Job callbacks: a POST to the job's `webhook_url` once it has ended, signed, retried with backoff.

The store arms a callback in the same transaction that ends its job, so an ending is never missed;
`WebhookSender` delivers them from a thread of its own, so a slow or dead receiver never holds up the
queue. Only URLs under one of the operator's allowed prefixes are accepted (checked when the job is
created), redirects are not followed, and no proxy is used.

Each request carries `X-Streamcanvas-Event` (`job.finished`, `job.failed`, `job.cancelled`),
`X-Streamcanvas-Delivery` (job id and attempt), `X-Streamcanvas-Timestamp` (Unix seconds) and
`X-Streamcanvas-Signature: sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY` with the webhook secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidJob
from .store import JobRecord, JobStore, Webhook

logger = logging.getLogger(__name__)

LEASE_S = 60.0
MAX_BACKOFF_S = 600.0


@dataclass(frozen=True)
class WebhookPolicy:
    allowed: tuple[str, ...] = ()
    """URL prefixes callbacks may go to (scheme, host and port must match; the path must start with
    the prefix's path). Empty: jobs may not name a webhook."""
    secret: str = ""
    max_attempts: int = 8
    backoff_s: float = 2.0
    timeout_s: float = 10.0

    def check(self, url: str) -> str:
        """The URL if the operator allows it; InvalidJob saying why not otherwise."""
        if not self.allowed:
            raise InvalidJob("this server sends no webhooks (its operator allows none: --webhook-allow)", field="webhook_url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise InvalidJob(f"webhook_url {url!r} is not an http(s) URL without credentials", field="webhook_url")
        for prefix in self.allowed:
            allowed = urlsplit(prefix)
            same_origin = (parts.scheme, parts.hostname, parts.port) == (allowed.scheme, allowed.hostname, allowed.port)
            if same_origin and parts.path.startswith(allowed.path or "/"):
                return url
        raise InvalidJob(f"webhook_url {url!r} is not under an allowed prefix ({', '.join(self.allowed)})", field="webhook_url")

    def delay(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** max(0, attempt - 1))


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def payload(record: JobRecord, event: str) -> dict[str, Any]:
    base = f"/v1/jobs/{record.id}"
    return {
        "event": f"job.{event}",
        "job": {
            "id": record.id,
            "kind": record.kind,
            "status": record.status.value,
            "error": record.error,
            "attempts": record.attempts,
            "created_at": record.created_at,
            "finished_at": record.finished_at,
            "url": base,
            "results": [
                {"index": r.index, "url": f"{base}/results/{r.index}{Path(r.path).suffix}", "seed": r.seed, "width": r.width, "height": r.height, "bytes": r.bytes}
                for r in record.results
            ],
        },
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could lead off the allow-list: it counts as a failed attempt


class WebhookSender:
    def __init__(self, store: JobStore, policy: WebhookPolicy, interval_s: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.interval_s = interval_s
        self.clock = clock
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.policy.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the database is briefly unavailable: try again next round
                logger.warning("webhooks: a round of deliveries failed", exc_info=True)

    def run_once(self) -> int:
        """Deliver what is due; returns how many were attempted."""
        due = self.store.due_webhooks(self.clock(), LEASE_S)
        for webhook in due:
            if self._stop.is_set():
                break
            self._deliver(webhook)
        return len(due)

    def _deliver(self, webhook: Webhook) -> None:
        attempt = webhook.attempts + 1
        record = self.store.get(webhook.job_id)
        body = json.dumps(payload(record, webhook.event or record.status.value)).encode()
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "streamcanvas-webhooks",
            "X-Streamcanvas-Event": f"job.{webhook.event}",
            "X-Streamcanvas-Delivery": f"{webhook.job_id}-{attempt}",
            "X-Streamcanvas-Timestamp": str(timestamp),
            "X-Streamcanvas-Signature": sign(self.policy.secret, timestamp, body),
        }
        error: str | None = None
        try:
            request = urllib.request.Request(webhook.url, data=body, headers=headers, method="POST")
            with self._opener.open(request, timeout=self.policy.timeout_s) as response:
                if not 200 <= response.status < 300:
                    error = f"HTTP {response.status}"
        except urllib.error.HTTPError as failure:
            error = f"HTTP {failure.code}"
        except (urllib.error.URLError, OSError) as failure:
            error = f"{type(failure).__name__}: {getattr(failure, 'reason', failure)}"
        retry_at = None
        if error is not None and attempt < self.policy.max_attempts:
            retry_at = self.clock() + self.policy.delay(attempt)
        if error is None:
            logger.info("webhook for job %s delivered (attempt %d)", webhook.job_id, attempt)
        elif retry_at is None:
            logger.error("webhook for job %s: attempt %d failed (%s); giving up", webhook.job_id, attempt, error)
        else:
            logger.warning("webhook for job %s: attempt %d failed (%s); again in %.1f s", webhook.job_id, attempt, error, retry_at - self.clock())
        self.store.webhook_attempted(webhook.job_id, self.clock(), error, retry_at)
