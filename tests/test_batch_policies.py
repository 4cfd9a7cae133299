"""Batch policies that need a server of their own: retries of transient failures, retention, and
sharing the device with live sessions."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_helpers import Jobs
from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, make_canvas

QUICK = {"prompt": "a red house", "width": TEST_RESOLUTION, "height": TEST_RESOLUTION, "steps": 4, "scheduler": "euler"}


@pytest.fixture(scope="module")
def yielding_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    """Batch jobs pause entirely while a live session streams; retries come back after 0.3 s, 0.6 s, …"""
    env = {"STREAMCANVAS_BATCH_LIVE_SHARE": "0", "STREAMCANVAS_JOB_RETRY_BACKOFF_S": "0.3"}
    process = start_server(cache_dir, artifacts_dir, "batch-yielding", env=env)
    yield process
    process.stop()


def test_transient_failures_are_retried_with_backoff(yielding_server: ServerProcess, cache_dir: Path) -> None:
    results = cache_dir / "results-batch-yielding"
    shutil.rmtree(results)
    results.write_text("a file where the results directory should be")  # every write of results fails
    jobs = Jobs(yielding_server.base_url)
    try:
        gives_up = jobs.wait(jobs.create("txt2img", QUICK, max_attempts=2)["id"])
        assert gives_up["status"] == "failed" and gives_up["attempts"] == 2
        assert gives_up["error"].startswith("attempt 2 of 2 failed:") and gives_up["results"] == []

        recovers = jobs.create("txt2img", QUICK, max_attempts=10)
        waiting = jobs.wait(recovers["id"], {"queued"}, timeout=60)
        while waiting["attempts"] < 1:
            waiting = jobs.wait(recovers["id"], {"queued"}, timeout=60)
        assert "retrying in" in waiting["error"]
        results.unlink()
        results.mkdir()
        done = jobs.wait(recovers["id"])
        assert done["status"] == "finished" and done["attempts"] >= 2 and done["error"] is None
        assert jobs.image(done["results"][0]["url"]).size == (TEST_RESOLUTION, TEST_RESOLUTION)
    finally:
        if results.is_file():
            results.unlink()
            results.mkdir()
        jobs.close()


async def test_batch_jobs_wait_while_a_live_session_streams(yielding_server: ServerProcess) -> None:
    jobs = Jobs(yielding_server.base_url)
    try:
        async with Client.connect(yielding_server.ws_url) as client:
            await client.hello(params={"prompt": "live"})

            async def draw(seconds: float) -> None:
                """A person drawing: a new canvas about three times a second."""
                deadline = time.monotonic() + seconds
                seed = 0
                while time.monotonic() < deadline:
                    seed += 1
                    await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, seed)))
                    await asyncio.sleep(0.3)

            await draw(1.0)  # the server tells the batch queue about live sessions four times a second
            # Its timeout counts running time only: waiting for the live session longer than that is fine.
            created = jobs.create("txt2img", {**QUICK, "steps": 10}, timeout_s=3)
            drawing = asyncio.create_task(draw(6.0))
            running = await asyncio.to_thread(jobs.wait, created["id"], {"running"}, 60.0, 1)
            for _ in range(8):  # four seconds: with a share of 0 the job stays at its first step
                await asyncio.sleep(0.5)
                job = jobs.get(created["id"])
                assert job["status"] == "running" and job["progress"]["step"] == running["progress"]["step"]
            await drawing
            # The person stops drawing but keeps the page open: the job goes on without waiting for it to close.
            done = await asyncio.to_thread(jobs.wait, created["id"], {"finished"}, 60.0)
            assert done["progress"]["step"] == 10
            assert client.connection.state.name == "OPEN"
    finally:
        jobs.close()


def test_ended_jobs_and_their_files_are_deleted_after_the_retention(cache_dir: Path, artifacts_dir: Path) -> None:
    server = start_server(cache_dir, artifacts_dir, "batch-retention", env={"STREAMCANVAS_JOB_RETENTION_S": "2"})
    jobs = Jobs(server.base_url)
    try:
        done = jobs.wait(jobs.create("txt2img", QUICK)["id"])
        assert done["status"] == "finished"
        files = cache_dir / "results-batch-retention" / done["id"]
        assert (files / "0.png").is_file()
        deadline = time.monotonic() + 30
        while jobs.http.get(f"/v1/jobs/{done['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the job outlived its retention"
            time.sleep(0.2)
        assert not files.exists()
        assert jobs.http.get(done["results"][0]["url"]).status_code == 404
    finally:
        jobs.close()
        server.stop()
