"""Job callbacks: a real server POSTs to a real HTTP receiver on loopback when jobs end, signed, retried
with backoff, and never holding up the queue."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batch_helpers import Jobs
from conftest import TEST_RESOLUTION, start_server
from helpers import ServerProcess, free_port

SECRET = "test-webhook-secret"
QUICK = {"prompt": "a red house", "width": TEST_RESOLUTION, "height": TEST_RESOLUTION, "steps": 2, "scheduler": "euler"}


@dataclass
class Receiver:
    """An HTTP server on loopback that records every callback and answers as scripted per path."""

    port: int
    received: list[dict[str, Any]] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    """path → statuses to answer in turn (then 200)."""
    hold_s: dict[str, float] = field(default_factory=dict)
    """path → seconds to wait before answering."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def calls(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [call for call in self.received if call["path"] == path]

    def wait_for(self, path: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(calls := self.calls(path)) >= count:
                return calls
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.calls(path))} callbacks, wanted {count}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.received.append({"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()})
                statuses = state.script.get(self.path, [])
                status = statuses.pop(0) if statuses else 200
            time.sleep(state.hold_s.get(self.path, 0.0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hooked(cache_dir: Path, artifacts_dir: Path, receiver: Receiver) -> Iterator[ServerProcess]:
    process = start_server(
        cache_dir,
        artifacts_dir,
        "webhooks",
        "--webhook-allow", receiver.url("/hooks/"),
        env={"STREAMCANVAS_WEBHOOK_SECRET": SECRET, "STREAMCANVAS_WEBHOOK_BACKOFF_S": "0.2", "STREAMCANVAS_WEBHOOK_MAX_ATTEMPTS": "3"},
    )
    yield process
    process.stop()


@pytest.fixture
def jobs(hooked: ServerProcess) -> Iterator[Jobs]:
    client = Jobs(hooked.base_url)
    yield client
    client.close()


def verified(call: dict[str, Any]) -> dict[str, Any]:
    """The callback's JSON, after checking its signature as a receiver would."""
    headers = {name.lower(): value for name, value in call["headers"].items()}
    signed = f"{headers['x-streamcanvas-timestamp']}.".encode() + call["body"]
    expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-streamcanvas-signature"], expected)
    assert abs(int(headers["x-streamcanvas-timestamp"]) - time.time()) < 120
    return json.loads(call["body"])


def test_a_finished_job_calls_back_signed(jobs: Jobs, receiver: Receiver) -> None:
    job = jobs.create("txt2img", {**QUICK, "batch_size": 2}, webhook_url=receiver.url("/hooks/done"))
    assert jobs.wait(job["id"])["status"] == "finished"
    (call,) = receiver.wait_for("/hooks/done", 1)
    body = verified(call)
    assert body["event"] == "job.finished" and body["job"]["id"] == job["id"] and body["job"]["status"] == "finished"
    assert [result["url"] for result in body["job"]["results"]] == [f"/v1/jobs/{job['id']}/results/{index}.png" for index in (0, 1)]
    assert call["headers"]["X-Streamcanvas-Delivery"] == f"{job['id']}-1"
    deadline = time.monotonic() + 10
    while (view := jobs.get(job["id"]))["webhook"]["state"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert view["webhook"] == {"url": receiver.url("/hooks/done"), "state": "delivered", "attempts": 1, "last_error": None,
                               "delivered_at": view["webhook"]["delivered_at"]}
    tampered = dict(call, body=call["body"].replace(b"finished", b"failed!!"))
    with pytest.raises(AssertionError):
        verified(tampered)


def test_a_failing_receiver_is_retried_with_backoff_then_given_up(jobs: Jobs, receiver: Receiver) -> None:
    receiver.script["/hooks/flaky"] = [500, 503]
    receiver.script["/hooks/down"] = [500, 500, 500, 500]
    flaky = jobs.create("txt2img", QUICK, webhook_url=receiver.url("/hooks/flaky"))
    down = jobs.create("txt2img", QUICK, webhook_url=receiver.url("/hooks/down"))
    calls = receiver.wait_for("/hooks/flaky", 3)
    assert [call["headers"]["X-Streamcanvas-Delivery"] for call in calls] == [f"{flaky['id']}-{n}" for n in (1, 2, 3)]
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(calls, calls[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # 0.2 s, then doubled
    receiver.wait_for("/hooks/down", 3)
    deadline = time.monotonic() + 10
    while jobs.get(down["id"])["webhook"]["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    webhook = jobs.get(down["id"])["webhook"]
    assert webhook["state"] == "failed" and webhook["attempts"] == 3 and webhook["last_error"] == "HTTP 500"
    time.sleep(1.0)
    assert len(receiver.calls("/hooks/down")) == 3  # max attempts 3: no fourth
    assert jobs.get(flaky["id"])["webhook"]["state"] == "delivered"


def test_a_hanging_receiver_does_not_hold_up_the_queue(jobs: Jobs, receiver: Receiver) -> None:
    receiver.hold_s["/hooks/slow"] = 4.0
    slow = jobs.create("txt2img", QUICK, webhook_url=receiver.url("/hooks/slow"))
    receiver.wait_for("/hooks/slow", 1)
    started = time.monotonic()
    after = jobs.wait(jobs.create("txt2img", QUICK)["id"])
    assert after["status"] == "finished" and time.monotonic() - started < 4.0  # while the callback still hangs
    assert jobs.get(slow["id"])["webhook"]["state"] == "pending"
    receiver.hold_s.clear()


def test_cancelled_jobs_call_back_and_other_urls_are_refused(jobs: Jobs, receiver: Receiver) -> None:
    blocker = jobs.create("txt2img", {**QUICK, "steps": 150, "width": 512, "height": 512})
    waiting = jobs.create("txt2img", QUICK, webhook_url=receiver.url("/hooks/cancelled"))
    jobs.http.post(f"/v1/jobs/{waiting['id']}/cancel")
    body = verified(receiver.wait_for("/hooks/cancelled", 1)[0])
    assert body["event"] == "job.cancelled" and body["job"]["error"] == "cancelled while queued"
    jobs.http.post(f"/v1/jobs/{blocker['id']}/cancel")
    for url in ("http://127.0.0.1:1/hooks/x", receiver.url("/elsewhere"), f"http://user:pw@127.0.0.1:{receiver.port}/hooks/", "file:///etc/passwd"):
        refused = jobs.create("txt2img", QUICK, expect=422, webhook_url=url)
        assert refused["field"] == "webhook_url", refused
