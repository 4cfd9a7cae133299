"""The batch queue end to end: a real server with the tiny model, in both deployments.

`embedded`: the server alone (SQLite + its in-process worker). `redis`: the server on a real
redis-server with a separate `streamcanvas worker` process. `redis-postgresql`: the same with the job
database on a real PostgreSQL server, as a queue spanning machines runs. Every test runs against each,
through the HTTP API; the last ones kill workers and servers with SIGKILL and check that every job
still ends.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_helpers import TERMINAL, Jobs, PostgresServer, RedisServer, WorkerProcess, png_base64
from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, make_canvas, server_env
from streamcanvas.batch_fallback.queues import RedisQueue
from streamcanvas.batch_fallback.store import JobStatus, JobStore

SIZE = TEST_RESOLUTION
HEARTBEAT_TIMEOUT_S = 2.0
BATCH_ENV = {
    "STREAMCANVAS_JOB_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
    "STREAMCANVAS_JOB_RETRY_BACKOFF_S": "0.3",
}
QUICK = {"prompt": "a red house", "width": SIZE, "height": SIZE, "steps": 4, "scheduler": "euler"}
LONG = {"prompt": "a long render", "width": 512, "height": 512, "steps": 150, "scheduler": "euler"}
"""Runs for many seconds on this CPU: something to keep the one worker busy, or to kill mid-job."""


@dataclass
class Deployment:
    mode: str
    name: str
    cache_dir: Path
    artifacts_dir: Path
    server: ServerProcess
    jobs: Jobs
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def database_url(self) -> str:  # as start_server names them, unless on PostgreSQL
        if self.postgres is not None:
            return self.postgres.url
        return f"sqlite:///{self.cache_dir / f'jobs-{self.name}.db'}"

    @property
    def results_dir(self) -> Path:
        return self.cache_dir / f"results-{self.name}"

    def start_worker(self) -> WorkerProcess:
        assert self.redis is not None
        worker = WorkerProcess(
            ["--redis-url", self.redis.url, "--database-url", self.database_url, "--results-dir", str(self.results_dir), "--threads", "2"],
            {**server_env(self.cache_dir), **BATCH_ENV},
            self.artifacts_dir / f"worker-{self.name}-{len(self.workers)}.log",
        ).start()
        self.workers.append(worker)
        return worker

    def kill_server_and_restart(self, before_restart=lambda: None) -> None:  # type: ignore[no-untyped-def]
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(10)
        before_restart()
        self.server.start()


def deploy(mode: str, name: str, cache_dir: Path, artifacts_dir: Path, env: dict[str, str] | None = None) -> Deployment:
    """embedded | redis | redis-postgresql (the deployment that spans machines: Redis, a database
    server, worker processes)."""
    redis = RedisServer(cache_dir / f"redis-{name}").start() if mode.startswith("redis") else None
    postgres = PostgresServer().start() if mode.endswith("postgresql") else None
    # start_server gives the server a job database and results directory named after it.
    args = ["--batch-queue", "redis", "--redis-url", redis.url] if redis is not None else []
    if postgres is not None:
        args += ["--database-url", postgres.url, "--results-dir", str(cache_dir / f"results-{name}")]
    server = start_server(cache_dir, artifacts_dir, name, *args, env={**BATCH_ENV, **(env or {})})
    deployment = Deployment(mode, name, cache_dir, artifacts_dir, server, Jobs(server.base_url), redis, postgres)
    if redis is not None:
        deployment.start_worker()
    return deployment


def tear_down(deployment: Deployment) -> None:
    deployment.jobs.close()
    for worker in deployment.workers:
        worker.stop()
    deployment.server.stop()
    if deployment.redis is not None:
        deployment.redis.stop()
    if deployment.postgres is not None:
        deployment.postgres.stop()


@pytest.fixture(scope="module", params=["embedded", "redis", "redis-postgresql"])
def deployment(request: pytest.FixtureRequest, cache_dir: Path, artifacts_dir: Path) -> Iterator[Deployment]:
    deployed = deploy(request.param, f"batch-{request.param}", cache_dir, artifacts_dir)
    yield deployed
    tear_down(deployed)


def drain(deployment: Deployment) -> None:
    """Cancel whatever a previous test left running or queued, so each test starts on an idle worker."""
    for job in deployment.jobs.http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
        if job["status"] not in TERMINAL:
            deployment.jobs.cancel(job["id"])
    for job in deployment.jobs.http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
        if job["status"] not in TERMINAL:
            deployment.jobs.wait(job["id"])


def decode_data_url(url: str) -> Image.Image:
    header, _, data = url.partition(",")
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


# --- create, progress, results --------------------------------------------------------------------


def test_a_job_streams_progress_and_its_results_download(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    response = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": {**QUICK, "steps": 20, "batch_size": 2, "preview": True, "seed": 1234}})
    assert response.status_code == 201
    created = response.json()
    assert response.headers["location"] == f"/v1/jobs/{created['id']}"
    assert created["status"] in ("queued", "running") and created["params"]["seed"] == 1234

    events = jobs.events(created["id"])
    names = [name for name, _ in events]
    assert names[-1] == "finished" and "started" in names
    # Progress is sampled (a fast job's steps may be skipped), in order, and the end says where it got.
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps and steps == sorted(steps) and all(data["steps"] == 20 for name, data in events if name == "progress")
    assert events[-1][1]["step"] == events[-1][1]["steps"] == 20 and events[-1][1]["results"] == 2
    previews = [decode_data_url(data["preview"]) for name, data in events if name == "progress" and "preview" in data]
    assert previews and max(previews[-1].size) <= 128

    job = jobs.get(created["id"])
    assert job["status"] == "finished" and job["attempts"] == 1 and job["error"] is None
    assert [result["seed"] for result in job["results"]] == [1234, 1235]
    images = [jobs.image(result["url"]) for result in job["results"]]
    assert all(image.size == (SIZE, SIZE) for image in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two seeds, two images
    embedded = json.loads(images[1].text["streamcanvas"])
    assert embedded["job_id"] == job["id"] and embedded["seed"] == 1235 and embedded["prompt"] == "a red house"
    assert "Seed: 1235" in images[1].text["parameters"] and "Steps: 20" in images[1].text["parameters"]
    assert jobs.http.get(f"/v1/jobs/{job['id']}/results/2.png").status_code == 404
    assert jobs.http.get(f"/v1/jobs/{job['id']}/preview.jpg").headers["content-type"] == "image/jpeg"


def test_the_same_seed_renders_the_same_image(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    first, second, other = (
        jobs.create("txt2img", {**QUICK, "seed": seed, "scheduler": "dpmpp_2m"}) for seed in (77, 77, 78)
    )
    pixels = []
    for created in (first, second, other):
        job = jobs.wait(created["id"])
        assert job["status"] == "finished"
        pixels.append(np.asarray(jobs.image(job["results"][0]["url"])))
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_img2img_starts_from_the_image(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    base = {"prompt": "a red house", "steps": 8, "scheduler": "euler", "seed": 5, "strength": 0.5}
    results = []
    for seed in (1, 2):
        created = jobs.create("img2img", {**base, "image": png_base64(make_canvas(SIZE, seed))})
        assert created["params"]["width"] == SIZE and created["params"]["height"] == SIZE  # from the image
        job = jobs.wait(created["id"])
        assert job["status"] == "finished" and job["progress"]["steps"] == 4  # 8 steps × strength 0.5
        results.append(np.asarray(jobs.image(job["results"][0]["url"])))
    assert not np.array_equal(results[0], results[1])
    # 1 step × strength 0.5 rounds to no step at all in diffusers' arithmetic: one step runs, at half noise.
    short = jobs.wait(jobs.create("img2img", {**base, "steps": 1, "image": png_base64(make_canvas(SIZE, 1))})["id"])
    assert short["status"] == "finished" and short["progress"]["steps"] == 1, short
    assert not np.array_equal(np.asarray(jobs.image(short["results"][0]["url"])), make_canvas(SIZE, 1))


# --- validation ---------------------------------------------------------------------------------------


BAD_REQUESTS = [
    ({"kind": "sculpture", "params": {}}, 422, "kind"),
    ({"kind": "txt2img"}, 422, "params"),
    ({"kind": "txt2img", "params": {"prompt": "x", "colour": "red"}}, 422, "params.colour"),
    ({"kind": "txt2img", "params": {"width": 128}}, 422, "params.prompt"),
    ({"kind": "txt2img", "params": {"prompt": "x", "width": 100}}, 422, "params.width"),
    ({"kind": "txt2img", "params": {"prompt": "x", "height": 4096}}, 422, "params.height"),
    ({"kind": "txt2img", "params": {"prompt": "x", "steps": 0}}, 422, "params.steps"),
    ({"kind": "txt2img", "params": {"prompt": "x", "steps": 10_000}}, 422, "params.steps"),
    ({"kind": "txt2img", "params": {"prompt": "x", "batch_size": 9}}, 422, "params.batch_size"),
    ({"kind": "txt2img", "params": {"prompt": "x", "scheduler": "magic"}}, 422, "params.scheduler"),
    ({"kind": "txt2img", "params": {"prompt": "x", "sigmas": "swirly"}}, 422, "params.sigmas"),
    ({"kind": "txt2img", "params": {"prompt": "x", "scheduler": "ddim", "sigmas": "karras"}}, 422, "params.sigmas"),
    ({"kind": "txt2img", "params": {"prompt": "x", "seed": -5}}, 422, "params.seed"),
    ({"kind": "txt2img", "params": {"prompt": ["x"]}}, 422, "params.prompt"),
    ({"kind": "txt2img", "params": "prompt=x"}, 422, "params"),
    ({"kind": "txt2img", "params": {"prompt": "x"}, "priority": "urgent"}, 422, "priority"),
    ({"kind": "txt2img", "params": {"prompt": "x"}, "timeout_s": 10**9}, 422, "timeout_s"),
    ({"kind": "txt2img", "params": {"prompt": "x"}, "max_attempts": 0}, 422, "max_attempts"),
    ({"kind": "txt2img", "params": {"prompt": "x"}, "owner": "me"}, 422, "owner"),
    ({"kind": "img2img", "params": {"prompt": "x", "image": "not base64!"}}, 422, "params.image"),
    ({"kind": "img2img", "params": {"prompt": "x", "image": base64.b64encode(b"hello").decode()}}, 422, "params.image"),
    ({"kind": "img2img", "params": {"prompt": "x"}}, 422, "params.image"),
    ({"kind": "live_session", "params": {"session_id": "nope", "session_token": "x"}}, 422, "params.session_id"),
    (["txt2img"], 422, None),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_REQUESTS, ids=[f"bad-{index}" for index in range(len(BAD_REQUESTS))])
def test_invalid_requests_are_refused_before_anything_is_queued(deployment: Deployment, body: object, status: int, field: str | None) -> None:
    jobs = deployment.jobs
    before = jobs.http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
    response = jobs.http.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == "invalid_job" and error["message"]
    assert error["field"] == field
    assert jobs.http.get("/v1/jobs", params={"limit": 500}).json()["jobs"] == before


def test_broken_and_oversized_bodies(deployment: Deployment) -> None:
    jobs = deployment.jobs
    broken = jobs.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["message"]
    large_and_broken = jobs.http.post("/v1/jobs", content=b'{"kind": "' + b"x" * 400_000)  # parsed off the loop
    assert large_and_broken.status_code == 422 and "not valid JSON" in large_and_broken.json()["message"]
    # NaN and Infinity, which Python's JSON reads, are refused as not finite (not as "above 30").
    for value in ("NaN", "Infinity"):
        not_finite = jobs.http.post("/v1/jobs", content=b'{"kind": "txt2img", "params": {"prompt": "x", "guidance_scale": %s}}' % value.encode())
        assert not_finite.status_code == 422 and not_finite.json()["field"] == "params.guidance_scale", not_finite.text
        assert "finite number" in not_finite.json()["message"], not_finite.text
    huge = jobs.http.post("/v1/jobs", content=b"x" * (33 * 1024 * 1024))
    assert huge.status_code == 413 and huge.json()["error"] == "payload_too_large"
    assert jobs.http.get("/v1/jobs/0123").status_code == 404
    assert jobs.http.get("/v1/jobs", params={"status": "lost"}).status_code == 422
    assert jobs.http.post("/v1/jobs/0123/cancel").json()["error"] == "job_not_found"


def test_an_idempotency_key_creates_one_job(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    key = f"order-{deployment.mode}-42"
    first = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": QUICK}, headers={"Idempotency-Key": key})
    again = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": QUICK}, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": {**QUICK, "prompt": "else"}}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    listed = [job for job in jobs.http.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if job["id"] == first.json()["id"]]
    assert len(listed) == 1
    assert jobs.wait(first.json()["id"])["status"] == "finished"


# --- queue order, cancellation, timeouts ----------------------------------------------------------------


def test_priorities_and_cancelling_queued_and_running_jobs(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    blocker = jobs.create("txt2img", LONG)
    jobs.wait(blocker["id"], {"running"}, step=1)
    low = jobs.create("txt2img", QUICK, priority="low")
    normal = jobs.create("txt2img", QUICK)
    high = jobs.create("txt2img", QUICK, priority="high")
    assert [jobs.get(job["id"])["queue_position"] for job in (high, normal, low)] == [1, 2, 3]
    listed = jobs.http.get("/v1/jobs", params={"status": "queued"}).json()["jobs"]  # the list says the same
    assert {job["id"]: job["queue_position"] for job in listed} == {high["id"]: 1, normal["id"]: 2, low["id"]: 3}

    cancelled = jobs.cancel(normal["id"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert jobs.get(low["id"])["queue_position"] == 2

    stopping = jobs.cancel(blocker["id"])
    assert stopping.status_code == 202 and stopping.json()["cancel_requested"]
    ended = jobs.wait(blocker["id"])
    assert ended["status"] == "cancelled" and "cancelled at step" in ended["error"]
    assert ended["progress"]["step"] < LONG["steps"] and ended["results"] == []

    done_high, done_low = jobs.wait(high["id"]), jobs.wait(low["id"])
    assert done_high["status"] == done_low["status"] == "finished"
    assert done_high["started_at"] < done_low["started_at"]  # the high tier went first
    assert jobs.cancel(done_low["id"]).status_code == 409
    assert jobs.get(normal["id"])["started_at"] is None  # a cancelled queued job never ran


def test_a_job_over_its_timeout_fails_with_the_reason(deployment: Deployment) -> None:
    drain(deployment)
    job = deployment.jobs.wait(deployment.jobs.create("txt2img", LONG, timeout_s=1.0)["id"])
    assert job["status"] == "failed" and "timed out" in job["error"] and job["attempts"] == 1


def test_list_pages_and_filters(deployment: Deployment) -> None:
    jobs = deployment.jobs
    first = jobs.http.get("/v1/jobs", params={"limit": 2}).json()
    assert len(first["jobs"]) == 2 and first["next_before"] is not None
    second = jobs.http.get("/v1/jobs", params={"limit": 2, "before": first["next_before"]}).json()
    assert not {job["id"] for job in first["jobs"]} & {job["id"] for job in second["jobs"]}
    finished = jobs.http.get("/v1/jobs", params={"status": "finished", "limit": 500}).json()["jobs"]
    assert finished and all(job["status"] == "finished" for job in finished)


def test_openapi_describes_every_route(deployment: Deployment) -> None:
    schema = deployment.jobs.http.get("/v1/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events"):
        assert path in schema["paths"]
    assert {"JobCreate", "JobView", "GenerationRequest", "Img2ImgRequest", "LiveSessionRequest", "WorkflowRequest"} <= set(schema["components"]["schemas"])
    kinds = deployment.jobs.http.get("/v1/job-kinds").json()
    assert set(kinds) == {"txt2img", "img2img", "inpaint", "outpaint", "upscale", "video", "live_session", "workflow"}


# --- the live session, rendered at full quality -------------------------------------------------------


async def test_render_a_live_session_now(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    canvas = make_canvas(SIZE, 9)
    async with Client.connect(deployment.server.ws_url) as client:
        ready = await client.hello(params={"prompt": "a blue lake", "seed": 31, "strength": 0.6})
        await client.frame_for(await client.send_canvas(canvas))
        forbidden = jobs.http.post(
            "/v1/jobs", json={"kind": "live_session", "params": {"session_id": ready["session_id"], "session_token": ready["viewer_token"]}}
        )
        assert forbidden.status_code == 403 and forbidden.json()["field"] == "params.session_token"
        live_params = {"session_id": ready["session_id"], "session_token": ready["token"], "steps": 10, "scheduler": "euler"}
        created = jobs.create("live_session", live_params, idempotency_key=f"hd-{ready['session_id']}")
    # The session is gone now; sending the same request again still answers with the job it made.
    replay = jobs.create("live_session", live_params, expect=200, idempotency_key=f"hd-{ready['session_id']}")
    assert replay["id"] == created["id"]
    assert created["params"]["prompt"] == "a blue lake" and created["params"]["seed"] == 31
    assert created["params"]["strength"] == 0.6 and created["params"]["width"] == SIZE
    live = jobs.wait(created["id"])
    assert live["status"] == "finished"
    # The same canvas, prompt and seed sent as an ordinary img2img job renders the very same image.
    same = jobs.wait(
        jobs.create(
            "img2img",
            {"prompt": "a blue lake", "seed": 31, "strength": 0.6, "steps": 10, "scheduler": "euler", "image": png_base64(canvas)},
        )["id"]
    )
    live_image, same_image = (jobs.image(job["results"][0]["url"]) for job in (live, same))
    threads = [json.loads(image.text["streamcanvas"])["torch_threads"] for image in (live_image, same_image)]
    live_pixels, same_pixels = (np.asarray(image, dtype=np.int16) for image in (live_image, same_image))
    if threads[0] == threads[1] and len(threads[0]) == 1:
        assert np.array_equal(live_pixels, same_pixels)
    else:  # the live job began while the session still counted as rendering: fewer torch threads, other float sums
        difference = np.abs(live_pixels - same_pixels)
        assert difference.mean() < 0.01 and difference.max() <= 2, (threads, difference.mean(), difference.max())


async def test_the_batch_side_knows_when_live_sessions_render(deployment: Deployment) -> None:
    """The server counts live sessions with recent inputs and tells the batch side (on Redis, through a
    key the workers on this host read): that is what batch jobs yield to."""

    def counted() -> tuple[int, int | None]:
        here = deployment.server.info()["batch"]["live_sessions_rendering"]
        if deployment.redis is None:
            return here, None
        queue = RedisQueue(deployment.redis.url)  # what a worker on this host reads
        try:
            return here, queue.live_sessions()
        finally:
            queue.broker.close()

    async def until(expected: int) -> tuple[int, int | None]:
        deadline = time.monotonic() + 10
        while (seen := await asyncio.to_thread(counted)) != (expected, None if deployment.redis is None else expected):
            assert time.monotonic() < deadline, f"live sessions counted {seen}, expected {expected}"
            await client.frame_for(await client.send_canvas(make_canvas(SIZE, int(time.monotonic() * 10))))
        return seen

    async with Client.connect(deployment.server.ws_url) as client:
        await client.hello()
        await until(1)
        # An open tab that stops drawing stops counting after a couple of seconds.
        deadline = time.monotonic() + 10
        while (seen := await asyncio.to_thread(counted))[0] != 0:
            assert time.monotonic() < deadline, f"an idle session still counted: {seen}"
            await asyncio.sleep(0.25)


# --- nothing is lost ------------------------------------------------------------------------------------


def test_a_killed_worker_or_server_loses_no_job(deployment: Deployment) -> None:
    """SIGKILL whatever runs the job mid-job (the server in embedded mode, the worker process on
    Redis); once it is back, the interrupted job runs again and every queued job finishes."""
    drain(deployment)
    jobs = deployment.jobs
    long = jobs.create("txt2img", {**LONG, "width": 256, "height": 256, "steps": 60})
    queued = [jobs.create("txt2img", {**QUICK, "seed": seed}) for seed in range(3)]
    jobs.wait(long["id"], {"running"}, step=2)
    if deployment.mode == "embedded":
        deployment.kill_server_and_restart()
    else:
        deployment.workers[-1].kill()
        deployment.start_worker()
    ended = jobs.wait(long["id"], timeout=180)
    assert ended["status"] == "finished" and ended["attempts"] == 2 and len(ended["results"]) == 1
    for job in queued:
        assert jobs.wait(job["id"])["status"] == "finished"
    # At-least-once with idempotent results: the second attempt wrote exactly what one run writes.
    twin = jobs.wait(jobs.create("txt2img", {**long["params"], "seed": ended["params"]["seed"]})["id"])
    assert np.array_equal(np.asarray(jobs.image(ended["results"][0]["url"])), np.asarray(jobs.image(twin["results"][0]["url"])))


def test_a_server_restarted_with_jobs_queued_finishes_them(deployment: Deployment) -> None:
    drain(deployment)
    jobs = deployment.jobs
    if deployment.mode == "embedded":
        blocker = jobs.create("txt2img", LONG)
        jobs.wait(blocker["id"], {"running"}, step=1)
        queued = [jobs.create("txt2img", {**QUICK, "seed": seed}, priority="high") for seed in range(4)]
        deployment.kill_server_and_restart()
        jobs.cancel(blocker["id"])
    else:
        for worker in deployment.workers:
            worker.stop()
        queued = [jobs.create("txt2img", {**QUICK, "seed": seed}) for seed in range(4)]

        def lose_the_messages() -> None:
            # Even with every message gone from Redis, the database still has the jobs.
            import redis

            redis.Redis.from_url(deployment.redis.url).flushall()

        deployment.kill_server_and_restart(lose_the_messages)
        deployment.start_worker()
    for job in queued:
        assert jobs.wait(job["id"], timeout=180)["status"] == "finished"


def test_a_worker_shutting_down_puts_its_job_back_without_using_an_attempt(deployment: Deployment) -> None:
    """SIGTERM (a deploy, a scale-down): the job in hand goes back to the queue at its next step and
    the worker exits cleanly; the next worker runs it as its first attempt."""
    drain(deployment)
    jobs = deployment.jobs
    job = jobs.create("txt2img", {**LONG, "width": 256, "height": 256, "steps": 60}, max_attempts=1)
    jobs.wait(job["id"], {"running"}, step=2)
    process = deployment.server.process if deployment.mode == "embedded" else deployment.workers[-1].process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    store = JobStore(deployment.database_url)  # the record as it was left, read while nothing runs it
    try:
        back = store.get(job["id"])
    finally:
        store.close()
    assert back.status is JobStatus.QUEUED and back.attempts == 0 and "worker shutdown" in (back.error or "")
    if deployment.mode == "embedded":
        deployment.server.start()
    else:
        deployment.start_worker()
    ended = jobs.wait(job["id"], timeout=180)
    assert ended["status"] == "finished" and ended["attempts"] == 1


def test_a_comfyui_workflow_runs_on_every_deployment(deployment: Deployment) -> None:
    """The ComfyUI API queues an ordinary job: on Redis a separate worker process runs the graph, and
    the server answers /history and /view from the job store and the shared results."""
    from test_comfyui import txt2img_graph

    http = deployment.jobs.http
    model = http.get("/v1/models").json()["models"][0]["id"]
    graph = txt2img_graph(model, steps=3, batch=2)
    answer = http.post("/prompt", json={"prompt": graph})
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    job = deployment.jobs.wait(prompt_id)
    assert job["status"] == "finished" and job["kind"] == "workflow" and len(job["results"]) == 2, job
    images = http.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]["9"]["images"]
    assert [image["filename"] for image in images] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    first, second = (http.get("/view", params=image) for image in images)
    assert first.status_code == second.status_code == 200
    # A batch of two from one seed: two different pictures (image i is sampled with seed + i).
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(first.content))), np.asarray(Image.open(io.BytesIO(second.content))))


def test_a_video_job_killed_mid_clip_restarts_and_leaves_no_half_file(deployment: Deployment) -> None:
    """The MP4 becomes a result file only once complete: a worker killed mid-clip leaves nothing at
    the result's path, and the retried attempt writes the whole clip."""
    from test_batch_kinds import make_clip, read_clip

    drain(deployment)
    jobs = deployment.jobs
    clip = make_clip(frames=90, size=256, fps=15)
    job = jobs.create("video", {"video": base64.b64encode(clip).decode(), "prompt": "a red house", "seed": 2})
    jobs.wait(job["id"], {"running"}, step=5)
    if deployment.mode == "embedded":
        deployment.kill_server_and_restart()
    else:
        deployment.workers[-1].kill()
    assert not (deployment.results_dir / job["id"]).exists() or not list((deployment.results_dir / job["id"]).iterdir())
    if deployment.mode != "embedded":
        deployment.start_worker()
    ended = jobs.wait(job["id"], timeout=240)
    assert ended["status"] == "finished" and ended["attempts"] == 2, ended
    assert [path.name for path in (deployment.results_dir / job["id"]).iterdir()] == ["0.mp4"]
    frames, _, _, _, _ = read_clip(jobs.http.get(ended["results"][0]["url"]).content)
    assert len(frames) == 90
