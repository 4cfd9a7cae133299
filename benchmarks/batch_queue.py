"""Batch queue benchmark: the embedded queue (SQLite + a worker thread) against Redis (Dramatiq).

    python -m streamcanvas.benchmarks.batch_queue --null-jobs 300 --model-jobs 20 --modes embedded,redis

For each queue mode, one after the other so they never compete for the CPU:
1. `null`: what the queue itself costs. The real `JobStore` (a SQLite file in a temp dir) and the real
   queue in this process — `EmbeddedQueue`, or `RedisQueue.consume` (a Dramatiq worker in this process)
   — with a worker body that claims the job and records it finished at once, rendering nothing.
2. `model`: tiny-model txt2img jobs (128², 4 euler steps) through the real server: a
   `streamcanvas serve` child process, and for Redis one `streamcanvas worker` child process, with jobs
   posted to `POST /v1/jobs` and followed with `GET /v1/jobs/{id}`. In the same server, one at a time:
   `workflow` jobs (ComfyUI's default text-to-image graph with the same size and steps, through
   `POST /prompt`) and `video` jobs (a 2 s 256² 15 fps clip made here with PyAV, restyled by the stream
   pipeline; frames/s = frames / run time).
Each phase runs two patterns after a short warm-up:
- `sequential`: one job at a time, the next submitted once the previous one finished — per-job latency
  and overhead with an empty queue;
- `burst`: every job submitted back to back — jobs/s from the first submit to the last finish, and the
  idle gap between one job's finish and the next one's start while jobs are waiting.
All times come from the job records (`created_at`, `started_at`, `finished_at`; the HTTP API gives them
to the millisecond). Redis mode starts its own `redis-server` on 127.0.0.1 (no persistence) and stops
it at the end. Every wait has a deadline; all traffic stays on 127.0.0.1. Prints one JSON document and
writes it to benchmarks/results/batch_queue.json (or --output; `--output -` prints only).
The JSON also says how much CPU other processes took during each phase (`other_load`), with a warning
over 10 % of the cores: two torch processes on two cores slow each other down many times over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import httpx
import redis

from streamcanvas.batch_fallback.queues import EmbeddedQueue, RedisQueue
from streamcanvas.batch_fallback.store import ClaimedJob, JobStore, NewJob, Priority
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import describe_machine, free_port, running_server
from .viewers import cpu_seconds

MODES = ("embedded", "redis")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
RESOLUTION = 128
VIDEO_SECONDS, VIDEO_SIDE, VIDEO_FPS = 2.0, 256, 15
THREADS = 2
JOB_PARAMS = {"prompt": "a red house", "width": RESOLUTION, "height": RESOLUTION, "steps": 4, "scheduler": "euler"}
NULL_WARMUP_JOBS = 10
MODEL_WARMUP_JOBS = 2
STALE_AFTER_S = 30.0  # the worker's default heartbeat timeout (`streamcanvas worker` claims with it)
POLL_S = 0.05  # GET /v1/jobs/{id} while waiting; the figures come from the records, not from polling
COUNTS_POLL_S = 0.01  # store.counts() while a null burst drains
JOB_DEADLINE_S = 120.0
NULL_JOB_DEADLINE_S = 30.0
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "batch_queue.json"

Times = list[tuple[float, float, float]]
"""(created_at, started_at, finished_at) of each job, in seconds since the epoch."""


# --- processes ---------------------------------------------------------------------------------------


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def log_tail(path: Path, characters: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-characters:].decode(errors="replace")
    return ""


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    port = free_port()
    log = directory / "redis.log"
    command = [
        REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
        "--protected-mode", "yes", "--daemonize", "no", "--dir", str(directory), "--logfile", str(log),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: {log_tail(log)}")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 15 s")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process, 10)


@contextlib.contextmanager
def running_worker(redis_url: str, database_url: str, results_dir: Path, log: Path) -> Iterator[None]:
    """One `streamcanvas worker` child process, ready to consume (it prints "... ready")."""
    command = [
        sys.executable, "-m", "streamcanvas.realtime_server.cli", "worker", "--redis-url", redis_url,
        "--database-url", database_url, "--results-dir", str(results_dir), "--threads", str(THREADS),
        "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not re.search(rb"streamcanvas worker \S+ ready", log.read_bytes()):
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}: {log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready within 120 s: {log_tail(log)}")
            time.sleep(0.1)
        yield
    finally:
        stop_process(process, 45)  # it finishes the job in hand first (up to 30 s)


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for this block (child processes inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class OtherLoad:
    """CPU time the rest of the machine spent during a block, beside this benchmark and its children.

    Two processes that run torch on these two cores slow each other far more than 2x (their OpenMP
    threads spin-wait for one another), so a figure is only worth what the machine's quiet was worth.
    """

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> OtherLoad:
        self._start = (time.monotonic(), machine_busy_s(), own_cpu_s())
        return self

    def __exit__(self, *_: object) -> None:
        wall, busy, own = (end - start for end, start in zip((time.monotonic(), machine_busy_s(), own_cpu_s()), self._start))
        other = max(0.0, busy - own)
        self.figures = {
            "wall_s": round(wall, 1),
            "own_cpu_s": round(own, 1),
            "other_cpu_s": round(other, 1),
            "other_share": round(other / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None,
        }


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (every core, from /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process, its ended children and its running children (servers, redis)."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    total += cpu_seconds(int(entry.name))
    return total


# --- figures -----------------------------------------------------------------------------------------


def timing_figures(times: Times, burst: bool) -> dict[str, Any]:
    """Per-job figures; for a burst also jobs/s (first submit to last finish) and idle gaps."""
    created, started, finished = (list(column) for column in zip(*times, strict=True))
    figures: dict[str, Any] = {
        "jobs": len(times),
        "created_to_finished_ms": percentiles([(f - c) * 1000 for c, f in zip(created, finished)]),
        "created_to_started_ms": percentiles([(s - c) * 1000 for c, s in zip(created, started)]),
        "started_to_finished_ms": percentiles([(f - s) * 1000 for s, f in zip(started, finished)]),
    }
    if burst:
        elapsed = max(finished) - min(created)
        by_start = sorted(times, key=lambda item: item[1])
        gaps = [(later[1] - earlier[2]) * 1000 for earlier, later in zip(by_start, by_start[1:])]
        figures.update(
            elapsed_s=round(elapsed, 3),
            jobs_per_s=round(len(times) / elapsed, 2) if elapsed > 0 else None,
            busy_fraction=round(sum(f - s for s, f in zip(started, finished)) / elapsed, 3) if elapsed > 0 else None,
            gap_ms=percentiles(gaps),
        )
    return figures


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


# --- 1. null jobs: the queue alone, in this process ---------------------------------------------------


class NullWorker:
    """The worker body of a null job: claim it (Redis) and record it finished at once."""

    def __init__(self, store: JobStore, name: str) -> None:
        self.store = store
        self.name = name
        self.finished = 0
        self.not_claimable = 0
        self.failures: list[str] = []
        self._changed = threading.Condition()

    def run(self, claimed: ClaimedJob) -> None:
        """EmbeddedQueue's runner."""
        try:
            owned = self.store.finish(claimed.claim, [])
        except Exception as error:  # noqa: BLE001 - reported by wait_finished in the benchmark's thread
            owned, reason = False, f"{type(error).__name__}: {error}"
        else:
            reason = "finish refused: the claim was lost"
        with self._changed:
            if owned:
                self.finished += 1
            else:
                self.failures.append(f"job {claimed.claim.job_id}: {reason}")
            self._changed.notify_all()

    def handle(self, job_id: str, priority: Priority) -> None:
        """RedisQueue's handler, claiming as `streamcanvas worker` does."""
        claimed = self.store.claim(job_id, self.name, stale_before=time.time() - STALE_AFTER_S)
        if claimed is None:
            with self._changed:
                self.not_claimable += 1
            return
        self.run(claimed)

    def wait_finished(self, count: int, deadline: float) -> None:
        with self._changed:
            while self.finished < count:
                if self.failures:
                    raise RuntimeError(f"null job failed: {self.failures[0]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.finished} of {count} null jobs finished before the deadline")
                self._changed.wait(left)


def null_phase(mode: str, directory: Path, jobs: int, redis_url: str | None) -> dict[str, Any]:
    store = JobStore(f"sqlite:///{directory / 'null-jobs.db'}")
    worker = NullWorker(store, f"benchmark-{mode}-{os.getpid()}")
    queue: EmbeddedQueue | RedisQueue
    if mode == "embedded":
        queue = EmbeddedQueue(store, worker.run)  # the server's defaults: one worker, 0.5 s poll
        queue.start()
    else:
        assert redis_url is not None
        queue = RedisQueue(redis_url)
        queue.consume(worker.handle)

    def submit() -> str:
        record, _ = store.create(NewJob(kind="txt2img", params=JOB_PARAMS, priority=Priority.NORMAL))
        queue.submit(record.id, record.priority)
        return record.id

    def times_of(ids: list[str]) -> Times:
        records = [store.get(job_id) for job_id in ids]
        return [(r.created_at, r.started_at, r.finished_at) for r in records]  # type: ignore[misc]

    try:
        # 1. warm-up: connections, Dramatiq's consumers, SQLite's page cache
        for _ in range(NULL_WARMUP_JOBS):
            target = worker.finished + 1
            submit()
            worker.wait_finished(target, time.monotonic() + NULL_JOB_DEADLINE_S)
        # 2. sequential: one job at a time (the worker's completion wakes the benchmark: no polling)
        ids = []
        for _ in range(jobs):
            target = worker.finished + 1
            ids.append(submit())
            worker.wait_finished(target, time.monotonic() + NULL_JOB_DEADLINE_S)
        sequential = timing_figures(times_of(ids), burst=False)
        # 3. burst: every job at once; the end is found by polling store.counts(), as a client would
        before = store.counts()["finished"]
        submit_started = time.monotonic()
        ids = [submit() for _ in range(jobs)]
        submit_s = time.monotonic() - submit_started
        deadline = time.monotonic() + 30 + jobs * 0.5
        while (counts := store.counts())["finished"] < before + jobs:
            if worker.failures:
                raise RuntimeError(f"null job failed: {worker.failures[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"null burst: {counts['finished'] - before} of {jobs} finished before the deadline")
            time.sleep(COUNTS_POLL_S)
        drained_s = time.monotonic() - submit_started
        burst = timing_figures(times_of(ids), burst=True)
        burst.update(submit_s=round(submit_s, 3), submits_per_s=round(jobs / submit_s, 1), drained_seen_after_s=round(drained_s, 3))
    finally:
        queue.stop()
        store.close()
    return {"sequential": rename_null(sequential), "burst": rename_null(burst), "not_claimable": worker.not_claimable}


def rename_null(figures: dict[str, Any]) -> dict[str, Any]:
    """Null jobs: the whole created → finished time is queue overhead; started marks the claim."""
    renamed = {"overhead_ms": figures.pop("created_to_finished_ms"), "dispatch_ms": figures.pop("created_to_started_ms")}
    renamed["claim_to_finish_ms"] = figures.pop("started_to_finished_ms")
    return {**figures, **renamed}


# --- 2. tiny-model jobs through the real server ------------------------------------------------------


def post_job(http: httpx.Client) -> str:
    response = http.post("/v1/jobs", json={"kind": "txt2img", "params": JOB_PARAMS})
    if response.status_code != 201:
        raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["id"])


def wait_job(http: httpx.Client, job_id: str, deadline: float) -> dict[str, Any]:
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        view = response.json()
        if view["status"] == "finished":
            return dict(view)
        if view["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} ended {view['status']}: {view.get('error')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {view['status']} at the deadline")
        time.sleep(POLL_S)


def view_times(views: list[dict[str, Any]]) -> Times:
    return [(iso_seconds(v["created_at"]), iso_seconds(v["started_at"]), iso_seconds(v["finished_at"])) for v in views]


def rename_model(figures: dict[str, Any]) -> dict[str, Any]:
    """Model jobs: latency = created → finished, run time = started → finished, overhead = the rest."""
    renamed = {
        "latency_ms": figures.pop("created_to_finished_ms"),
        "run_ms": figures.pop("started_to_finished_ms"),
        "overhead_ms": figures.pop("created_to_started_ms"),
    }
    return {**figures, **renamed}


def workflow_graph(model: str) -> dict[str, Any]:
    """ComfyUI's default text-to-image API workflow, at the txt2img jobs' size and steps."""
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": JOB_PARAMS["steps"], "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                    "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": RESOLUTION, "height": RESOLUTION, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": JOB_PARAMS["prompt"], "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def post_workflow(http: httpx.Client, graph: dict[str, Any]) -> str:
    response = http.post("/prompt", json={"prompt": graph})
    if response.status_code != 200:
        raise RuntimeError(f"POST /prompt answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["prompt_id"])


def make_clip(seconds: float = VIDEO_SECONDS, side: int = VIDEO_SIDE, fps: int = VIDEO_FPS) -> bytes:
    """A clip made here: a bar sweeping over a gradient (no file is downloaded)."""
    import io

    import av
    import numpy as np

    output = io.BytesIO()
    frames = round(seconds * fps)
    with av.open(output, "w", format="mp4") as clip:
        stream = clip.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        y, x = np.mgrid[0:side, 0:side]
        for index in range(frames):
            rgb = np.stack([x * 255 // side, y * 255 // side, np.full_like(x, 128)], axis=-1).astype(np.uint8)
            left = index * side // frames
            rgb[:, left : left + side // 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                clip.mux(packet)
        for packet in stream.encode(None):
            clip.mux(packet)
    return output.getvalue()


def post_video(http: httpx.Client, clip: str) -> str:
    response = http.post("/v1/jobs", json={"kind": "video", "params": {"video": clip, "prompt": JOB_PARAMS["prompt"], "seed": 1}})
    if response.status_code != 201:
        raise RuntimeError(f"POST /v1/jobs (video) answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["id"])


def other_kinds(http: httpx.Client, workflow_jobs: int, video_jobs: int) -> dict[str, Any]:
    """Workflow and video jobs, one at a time after one warm-up each."""
    import base64

    result: dict[str, Any] = {}
    if workflow_jobs:
        graph = workflow_graph(http.get("/v1/models").json()["models"][0]["id"])
        wait_job(http, post_workflow(http, graph), time.monotonic() + JOB_DEADLINE_S)
        views = [wait_job(http, post_workflow(http, graph), time.monotonic() + JOB_DEADLINE_S) for _ in range(workflow_jobs)]
        result["workflow"] = rename_model(timing_figures(view_times(views), burst=False))
    if video_jobs:
        clip = base64.b64encode(make_clip()).decode()
        wait_job(http, post_video(http, clip), time.monotonic() + JOB_DEADLINE_S)
        views = [wait_job(http, post_video(http, clip), time.monotonic() + JOB_DEADLINE_S) for _ in range(video_jobs)]
        frames = views[0]["params"]["frames"]
        runs = [iso_seconds(v["finished_at"]) - iso_seconds(v["started_at"]) for v in views]
        result["video"] = {
            "clip": {"seconds": VIDEO_SECONDS, "side": VIDEO_SIDE, "fps": VIDEO_FPS, "frames": frames},
            "stream": {"steps": views[0]["params"]["steps"], "strength": views[0]["params"]["strength"]},
            "jobs": len(views),
            "run_s": [round(run, 3) for run in runs],
            "frames_per_s": round(frames / (sum(runs) / len(runs)), 2),
            **rename_model(timing_figures(view_times(views), burst=False)),
        }
    return result


def model_phase(mode: str, directory: Path, jobs: int, redis_url: str | None, workflow_jobs: int = 0, video_jobs: int = 0) -> dict[str, Any]:
    database_url = f"sqlite:///{directory / 'jobs.db'}"
    results_dir = directory / "results"
    extra = ["--threads", str(THREADS), "--database-url", database_url, "--results-dir", str(results_dir)]
    if mode == "redis":
        assert redis_url is not None
        extra += ["--batch-queue", "redis", "--redis-url", redis_url]
    started = time.monotonic()
    with running_server(RESOLUTION, 1, *extra) as websocket_url, contextlib.ExitStack() as stack:
        server_ready_s = time.monotonic() - started
        if mode == "redis":
            assert redis_url is not None
            stack.enter_context(running_worker(redis_url, database_url, results_dir, directory / "worker.log"))
        base_url = websocket_url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
        http = stack.enter_context(httpx.Client(base_url=base_url, timeout=30))
        info = http.get("/v1/info").json()
        if info["batch"]["queue"] != mode:
            raise RuntimeError(f"the server runs the {info['batch']['queue']!r} queue, not {mode!r}")
        workers_ready_s = time.monotonic() - started
        # 1. warm-up: the first renders of each process
        for _ in range(MODEL_WARMUP_JOBS):
            wait_job(http, post_job(http), time.monotonic() + JOB_DEADLINE_S)
        # 2. sequential: one job at a time
        views = [wait_job(http, post_job(http), time.monotonic() + JOB_DEADLINE_S) for _ in range(jobs)]
        sequential = rename_model(timing_figures(view_times(views), burst=False))
        # 3. burst: post every job, then follow them in the order they were queued
        ids = [post_job(http) for _ in range(jobs)]
        deadline = time.monotonic() + 60 + jobs * 30
        views = [wait_job(http, job_id, deadline) for job_id in ids]
        burst = rename_model(timing_figures(view_times(views), burst=True))
        # 4. the other kinds, one at a time
        others = other_kinds(http, workflow_jobs, video_jobs)
    return {
        "server_ready_s": round(server_ready_s, 1),
        "workers_ready_s": round(workers_ready_s, 1),
        "model": info.get("model"),
        "sequential": sequential,
        "burst": burst,
        **others,
    }


# --- the run -----------------------------------------------------------------------------------------


def run_mode(mode: str, root: Path, null_jobs: int, model_jobs: int, workflow_jobs: int = 0, video_jobs: int = 0) -> dict[str, Any]:
    directory = root / mode
    directory.mkdir()
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(running_redis(directory)) if mode == "redis" else None
        result: dict[str, Any] = {}
        if null_jobs:
            with OtherLoad() as load:
                result["null"] = null_phase(mode, directory, null_jobs, redis_url)
            result["null"]["cpu"] = load.figures
        if redis_url is not None:
            redis.Redis.from_url(redis_url).flushall()  # nothing of the null phase reaches the server's run
        if model_jobs:
            with OtherLoad() as load:
                result["model"] = model_phase(mode, directory, model_jobs, redis_url, workflow_jobs, video_jobs)
            result["model"]["cpu"] = load.figures
    return result


def headline(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures most people want: jobs/s, busy fraction and the idle gap between jobs from the burst;
    per-job overhead, latency and run time from the sequential run (one job at a time)."""
    summary = {}
    for mode, result in modes.items():
        row: dict[str, Any] = {}
        if "null" in result:
            null = result["null"]
            row["null_jobs_per_s"] = null["burst"]["jobs_per_s"]
            row["null_gap_ms"] = null["burst"]["gap_ms"]
            row["null_overhead_ms"] = null["sequential"]["overhead_ms"]
        if "model" in result:
            model = result["model"]
            row["tiny_jobs_per_s"] = model["burst"]["jobs_per_s"]
            row["tiny_busy_fraction"] = model["burst"]["busy_fraction"]
            row["tiny_gap_ms"] = model["burst"]["gap_ms"]
            row["tiny_latency_ms"] = model["sequential"]["latency_ms"]
            row["tiny_run_ms"] = model["sequential"]["run_ms"]
            row["tiny_overhead_ms"] = model["sequential"]["overhead_ms"]
            if "workflow" in model:
                row["workflow_latency_ms"] = model["workflow"]["latency_ms"]
                row["workflow_run_ms"] = model["workflow"]["run_ms"]
            if "video" in model:
                row["video_frames_per_s"] = model["video"]["frames_per_s"]
        summary[mode] = row
    return summary


def other_load_summary(before: dict[str, Any], modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How busy the rest of the machine was, before the run and in each phase; a warning over 10 %."""
    phases = {f"{mode}.{phase}": result[phase]["cpu"]["other_share"] for mode, result in modes.items() for phase in ("null", "model") if phase in result}
    busy = {name: share for name, share in {"before": before["other_share"], **phases}.items() if share and share > 0.1}
    warning = None
    if busy:
        listed = ", ".join(f"{name} {share:.0%}" for name, share in busy.items())
        warning = f"other processes used a share of the cores ({listed}): these figures are not from a quiet machine"
    return {"before_share": before["other_share"], "phase_shares": phases, "warning": warning}


def software() -> dict[str, Any]:
    found: dict[str, Any] = {"sqlite": sqlite3.sqlite_version}
    for name in ("sqlalchemy", "dramatiq", "redis", "httpx", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["redis_server"] = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return found


def filesystem_of(path: Path) -> str | None:
    """The filesystem type holding `path` (SQLite's fsyncs cost what that filesystem makes them cost)."""
    best, kind = "", None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def parse_modes(value: str) -> list[str]:
    modes = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in modes if item not in MODES]
    if unknown or not modes:
        raise click.BadParameter(f"{value!r}: modes are a comma-separated list of {', '.join(MODES)}")
    return modes


@click.command()
@click.option("--null-jobs", default=300, show_default=True, help="Null-cost jobs per pattern (sequential, burst); 0 skips.")
@click.option("--model-jobs", default=20, show_default=True, help="Tiny-model txt2img jobs per pattern; 0 skips.")
@click.option("--workflow-jobs", default=10, show_default=True, help="ComfyUI default-graph workflow jobs (one at a time); 0 skips.")
@click.option("--video-jobs", default=3, show_default=True, help="Video jobs of a 2 s 256² clip (one at a time); 0 skips.")
@click.option("--modes", "modes_text", default="embedded,redis", show_default=True, help="Queue modes to run, comma-separated.")
@click.option("--output", default=str(DEFAULT_OUTPUT), show_default=True, help="Where to write the JSON as well; '-' for stdout only.")
def main(null_jobs: int, model_jobs: int, workflow_jobs: int, video_jobs: int, modes_text: str, output: str) -> None:
    """Benchmark the batch queue (embedded and Redis) with null jobs and tiny-model jobs; prints JSON."""
    modes = parse_modes(modes_text)
    if null_jobs < 0 or model_jobs < 0:
        raise click.BadParameter(f"job counts must be at least 0 (got {null_jobs}, {model_jobs})")
    if "redis" in modes and not Path(REDIS_SERVER).is_file():
        raise click.UsageError(f"the redis mode needs {REDIS_SERVER}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    started = time.time()
    with OtherLoad() as before:
        time.sleep(2)
    root = Path(tempfile.mkdtemp(prefix="streamcanvas-batch-bench-"))
    results: dict[str, Any] = {}
    try:
        with environment(STREAMCANVAS_CACHE_DIR=str(root / "cache"), HF_HUB_OFFLINE="1"):
            for mode in modes:
                results[mode] = run_mode(mode, root, null_jobs, model_jobs, workflow_jobs, video_jobs)
        temp_filesystem = filesystem_of(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "batch_queue",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**describe_machine(), "temp_filesystem": temp_filesystem},
        "software": software(),
        "config": {
            "modes": modes,
            "null_jobs": null_jobs,
            "model_jobs": model_jobs,
            "workflow_jobs": workflow_jobs,
            "video_jobs": video_jobs,
            "warmup_jobs": {"null": NULL_WARMUP_JOBS, "model": MODEL_WARMUP_JOBS},
            "job_params": JOB_PARAMS,
            "server": {"resolution": f"{RESOLUTION}x{RESOLUTION}", "threads": THREADS, "worker_threads": THREADS},
            "poll_s": {"http": POLL_S, "store_counts": COUNTS_POLL_S},
        },
        "other_load": other_load_summary(before.figures, results),
        "summary": headline(results),
        "modes": results,
        "wall_s": round(time.time() - started, 1),
    }
    emit_report(report, output, report["other_load"]["warning"])


def emit_report(report: dict[str, Any], output: str, warning: str | None) -> None:
    """Print the JSON, warn on stderr, and write it to `output` unless that is '-'."""
    text = json.dumps(report, indent=2)
    click.echo(text)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    if output != "-":
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
