"""Live sessions beside a busy batch queue: how well `--batch-live-share` protects the live stream.

    python -m streamcanvas.benchmarks.live_with_batch --seconds 20 --rate 8

Each scenario gets a fresh `streamcanvas serve` child process on a free loopback port (256x256, 2 torch
threads, the embedded queue on a SQLite file in a temp dir), warmed up with a few live frames and one
batch job, then:
- `live_alone`: one live WebSocket client (`realtime_ws.run_scenario`) sends JPEG canvases at a fixed
  rate for --seconds: the fps it gets back and its latency (canvas sent → first frame that shows it)
  p50/p95/p99. The default, 8 inputs/s, leaves the server some headroom: the tiny model's live frame
  takes ~80–130 ms at 256² here (8–12 fps as this machine's speed drifts), and at its full speed
  latency is mostly queueing, which would hide what the batch job adds;
- `batch_share_F` for F in --shares (default 1.0, 0.25, 0.0; the server runs with
  `--batch-live-share F`): the batch queue is kept busy the whole time with txt2img jobs (256², 20
  euler steps; one running and two queued: a new job is posted whenever one finishes). Batch alone
  runs for --before seconds (the full-speed reference), then the same live client runs as above, then
  the live client leaves and batch alone runs again for --after seconds (after a 2 s grace: the
  server publishes the live-session count once a second). Batch throughput in each window is the
  number of denoising steps done, from the job records' progress (`GET /v1/jobs`, polled every
  0.25 s and interpolated at the window's edges).
The live window starts `--warmup` seconds after the client connects (so the server has seen the
session stream and the batch job has started to yield) and lasts --seconds.

Before measuring, the machine must be quiet: other processes must use under 10 % of the cores over a
3 s sample, waited for up to --idle-wait seconds (two torch processes on two cores slow each other
many times over). Each scenario records the CPU the rest of the machine took meanwhile (`other_load`).
Every wait has a deadline; all traffic stays on 127.0.0.1; every child process is stopped in finally.
Prints one JSON document and writes it to benchmarks/results/live_with_batch.json (or --output;
`--output -` prints only).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import httpx

from streamcanvas.sessions.stats import percentiles

from .batch_queue import OtherLoad, emit_report, environment, iso_seconds, machine_busy_s, own_cpu_s, wait_job
from .realtime_ws import PROMPT, describe_machine, run_scenario, running_server
from .viewers import cpu_seconds

RESOLUTION = 256
THREADS = 2
JOB_PARAMS = {"prompt": "a red house", "width": RESOLUTION, "height": RESOLUTION, "steps": 20, "scheduler": "euler"}
KEEP_UNFINISHED = 3  # one running, two queued
POLL_S = 0.25
LIVE_WARMUP_S = 2.0  # live frames of the server warm-up (before the batch warm-up job)
GRACE_AFTER_LIVE_S = 2.0  # the server publishes the live count once a second
JOB_DEADLINE_S = 120.0
IDLE_SAMPLE_S = 3.0
IDLE_SHARE = 0.10
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "live_with_batch.json"


# --- the quiet machine -------------------------------------------------------------------------------


def process_cpu() -> dict[int, tuple[str, float]]:
    """(name, CPU seconds) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                found[int(entry.name)] = ((entry / "comm").read_text().strip(), cpu_seconds(int(entry.name)))
    return found


def sample_other_load(seconds: float) -> dict[str, Any]:
    """The share of the cores other processes used over `seconds`, and the busiest of them."""
    before_procs = process_cpu()
    start = (time.monotonic(), machine_busy_s(), own_cpu_s())
    time.sleep(seconds)
    wall, busy, own = (end - begin for end, begin in zip((time.monotonic(), machine_busy_s(), own_cpu_s()), start))
    after_procs = process_cpu()
    me = os.getpid()
    busiest = sorted(
        (
            (after[1] - before_procs[pid][1], pid, after[0])
            for pid, after in after_procs.items()
            if pid in before_procs and pid != me
        ),
        reverse=True,
    )[:3]
    return {
        "other_share": round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3),
        "loadavg": loadavg(),
        "busiest": [{"pid": pid, "name": name, "cpu_share": round(used / wall, 3)} for used, pid, name in busiest if used > 0.05 * wall],
    }


def loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def wait_until_idle(max_wait_s: float) -> dict[str, Any]:
    """Sample until other processes use under IDLE_SHARE of the cores, for at most max_wait_s."""
    started = time.monotonic()
    samples = []
    while True:
        sample = sample_other_load(IDLE_SAMPLE_S)
        samples.append(sample)
        if sample["other_share"] < IDLE_SHARE:
            return {"idle": True, "waited_s": round(time.monotonic() - started, 1), "last": sample, "samples": len(samples)}
        if time.monotonic() - started > max_wait_s:
            return {"idle": False, "waited_s": round(time.monotonic() - started, 1), "last": sample, "samples": len(samples)}
        click.echo(f"machine busy (others use {sample['other_share']:.0%} of the cores: {sample['busiest']}); waiting", err=True)
        time.sleep(10)


# --- the batch side ----------------------------------------------------------------------------------


class BatchFeeder(threading.Thread):
    """Keeps KEEP_UNFINISHED txt2img jobs unfinished on the server and samples their progress.

    Samples are (wall time, denoising steps done by all of this feeder's jobs so far)."""

    def __init__(self, base_url: str, deadline: float) -> None:
        super().__init__(name="batch-feeder", daemon=True)
        self.base_url = base_url
        self.deadline = deadline
        self.jobs: dict[str, dict[str, Any]] = {}
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=30) as http:
                while not self._stop_event.is_set():
                    if time.monotonic() > self.deadline:
                        raise TimeoutError("the batch feeder ran past its deadline")
                    self._poll(http)
                    self._stop_event.wait(POLL_S)
        except Exception as error:  # noqa: BLE001 - reported by the benchmark's thread
            self.error = f"{type(error).__name__}: {error}"

    def _poll(self, http: httpx.Client) -> None:
        response = http.get("/v1/jobs", params={"limit": 10})
        response.raise_for_status()
        now = time.time()
        seen = {view["id"]: view for view in response.json()["jobs"]}
        with self._lock:
            for job_id, job in self.jobs.items():
                view = seen.get(job_id)
                if view is None and job["status"] in ("queued", "running"):
                    view = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if view is not None:
                    if view["status"] in ("failed", "cancelled"):
                        raise RuntimeError(f"job {job_id} ended {view['status']}: {view.get('error')}")
                    job.update(status=view["status"], step=view["progress"]["step"] or 0, steps=view["progress"]["steps"])
                    job.update(started_at=view["started_at"], finished_at=view["finished_at"])
            self.samples.append((now, sum(job["step"] for job in self.jobs.values())))
            unfinished = sum(1 for job in self.jobs.values() if job["status"] in ("queued", "running"))
        for _ in range(KEEP_UNFINISHED - unfinished):
            response = http.post("/v1/jobs", json={"kind": "txt2img", "params": JOB_PARAMS})
            if response.status_code != 201:
                raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
            view = response.json()
            with self._lock:
                self.jobs[view["id"]] = {"status": view["status"], "step": 0, "steps": None, "started_at": None, "finished_at": None}

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"batch feeder: {self.error}")

    def wait_running(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            with self._lock:
                if any(job["status"] == "running" and job["step"] > 0 for job in self.jobs.values()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch job made progress within {timeout_s:g} s")
            time.sleep(0.1)

    def steps_at(self, when: float) -> float:
        """Steps done by `when` (wall time), interpolated between the samples around it."""
        with self._lock:
            samples = list(self.samples)
        times = [sample[0] for sample in samples]
        index = bisect.bisect_left(times, when)
        if index == 0:
            return float(samples[0][1])
        if index >= len(samples):
            return float(samples[-1][1])
        (t0, s0), (t1, s1) = samples[index - 1], samples[index]
        return s0 + (s1 - s0) * (when - t0) / (t1 - t0) if t1 > t0 else float(s1)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Batch figures between two wall times."""
        steps = self.steps_at(end) - self.steps_at(start)
        with self._lock:
            jobs = [dict(job) for job in self.jobs.values()]
        finished = [job for job in jobs if job["finished_at"] and start <= iso_seconds(job["finished_at"]) < end]
        inside = [
            iso_seconds(job["finished_at"]) - iso_seconds(job["started_at"])
            for job in finished
            if job["started_at"] and iso_seconds(job["started_at"]) >= start
        ]
        return {
            "seconds": round(end - start, 2),
            "steps": round(steps, 1),
            "steps_per_s": round(steps / (end - start), 2),
            "jobs_finished": len(finished),
            "job_run_s": {key: round(value / 1000, 2) for key, value in percentiles([s * 1000 for s in inside]).items()} if inside else None,
        }

    def timeline(self, origin: float, start: float, end: float) -> list[float]:
        """Steps per second in one-second bins from `start` to `end` (wall times; bins relative to origin)."""
        first, last = int((start - origin) // 1), int((end - origin) // 1)
        return [round(self.steps_at(origin + second + 1) - self.steps_at(origin + second), 1) for second in range(first, last)]

    def unfinished(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, job in self.jobs.items() if job["status"] in ("queued", "running")]


# --- one scenario ------------------------------------------------------------------------------------


def live_run(url: str, rate_hz: float, warmup_s: float, seconds: float) -> dict[str, Any]:
    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(run_scenario(url, RESOLUTION, 1, rate_hz, warmup_s, seconds), warmup_s + seconds + 90)

    result = asyncio.run(bounded())
    result.pop("latency_samples_ms")
    result["answered_per_s"] = round(result["inputs_answered"] / seconds, 2)
    return result


def run_one(name: str, share: float, with_batch: bool, directory: Path, options: dict[str, Any]) -> dict[str, Any]:
    directory.mkdir()
    extra = [
        "--threads", str(THREADS), "--batch-live-share", f"{share:g}",
        "--database-url", f"sqlite:///{directory / 'jobs.db'}", "--results-dir", str(directory / "results"),
    ]  # fmt: skip
    rate, seconds, warmup_s = options["rate"], options["seconds"], options["warmup_s"]
    result: dict[str, Any] = {"batch_live_share": share, "batch": with_batch}
    started = time.monotonic()
    with running_server(RESOLUTION, 1, *extra) as url, httpx.Client(base_url=url.replace("ws://", "http://").rsplit("/v1/", 1)[0], timeout=30) as http:
        result["server_ready_s"] = round(time.monotonic() - started, 1)
        info = http.get("/v1/info").json()
        result["model"] = info.get("model")
        # warm-up: a few live frames, then one batch job (the first renders of this process)
        warm = live_run(url, rate, 0.0, LIVE_WARMUP_S)
        warm_job = wait_job(http, http.post("/v1/jobs", json={"kind": "txt2img", "params": JOB_PARAMS}).raise_for_status().json()["id"], time.monotonic() + JOB_DEADLINE_S)
        result["warmup"] = {
            "live_frames": round(warm["server_fps"] * LIVE_WARMUP_S),
            "batch_job_run_s": round(iso_seconds(warm_job["finished_at"]) - iso_seconds(warm_job["started_at"]), 2),
        }
        feeder = None
        try:
            if with_batch:
                total = options["before_s"] + warmup_s + seconds + GRACE_AFTER_LIVE_S + options["after_s"] + 120
                feeder = BatchFeeder(str(http.base_url), time.monotonic() + total)
                feeder.start()
                feeder.wait_running(JOB_DEADLINE_S)
                before_start = time.time()
                time.sleep(options["before_s"])
                feeder.check()
            live_started = time.time()
            result["live"] = live_run(url, rate, warmup_s, seconds)
            live_left = time.time()
            # the client connects within milliseconds of live_started; its window is warmup_s later
            window = (live_started + warmup_s, live_started + warmup_s + seconds)
            if feeder is not None:
                feeder.check()
                time.sleep(GRACE_AFTER_LIVE_S)
                after_start = time.time()
                time.sleep(options["after_s"])
                after_end = time.time()
                time.sleep(POLL_S * 2)  # one more sample past the window's end
                feeder.check()
                result["batch_before_live"] = feeder.window(before_start, live_started)
                result["batch_during_live"] = feeder.window(*window)
                result["batch_after_live"] = feeder.window(after_start, after_end)
                alone = result["batch_before_live"]["steps_per_s"]
                result["batch_share_of_alone"] = round(result["batch_during_live"]["steps_per_s"] / alone, 3) if alone else None
                result["batch_steps_per_s_timeline"] = {
                    "note": "1 s bins; 0 = the live client connects; live window from warmup_s; the client leaves at left_s",
                    "left_s": round(live_left - live_started, 1),
                    "from_s": -int(options["before_s"]),
                    "steps_per_s": feeder.timeline(live_started, before_start, after_end),
                }
                result["batch_jobs_posted"] = len(feeder.jobs)
        finally:
            if feeder is not None:
                feeder.stop()
                for job_id in feeder.unfinished():  # so the server stops without finishing the queue
                    with contextlib.suppress(httpx.HTTPError):
                        http.post(f"/v1/jobs/{job_id}/cancel")
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    live = result["live"]
    row = {"live_fps": live["server_fps"], "live_latency_ms": live["latency_ms"], "live_answered_per_s": live["answered_per_s"]}
    if result["batch"]:
        row.update(
            batch_steps_per_s_during_live=result["batch_during_live"]["steps_per_s"],
            batch_steps_per_s_alone_before=result["batch_before_live"]["steps_per_s"],
            batch_steps_per_s_alone_after=result["batch_after_live"]["steps_per_s"],
            batch_share_of_alone=result["batch_share_of_alone"],
        )
    return row


def parse_shares(value: str) -> list[float]:
    try:
        shares = [float(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma-separated list of shares in [0, 1]") from None
    if not shares or any(not 0.0 <= share <= 1.0 for share in shares):
        raise click.BadParameter(f"{value!r}: a comma-separated list of shares in [0, 1]")
    return shares


@click.command()
@click.option("--seconds", default=20.0, show_default=True, help="Measured live seconds per scenario.")
@click.option("--rate", default=8.0, show_default=True, help="Canvases the live client sends per second.")
@click.option("--warmup", "warmup_s", default=3.0, show_default=True, help="Unmeasured seconds at the start of each live run.")
@click.option("--shares", "shares_text", default="1.0,0.25,0.0", show_default=True, help="--batch-live-share values to run with a busy batch queue.")
@click.option("--before", "before_s", default=5.0, show_default=True, help="Seconds of batch alone before the live client (the reference).")
@click.option("--after", "after_s", default=5.0, show_default=True, help="Seconds of batch alone after the live client leaves.")
@click.option("--idle-wait", "idle_wait_s", default=240.0, show_default=True, help="How long to wait for a quiet machine before measuring anyway.")
@click.option("--output", default=str(DEFAULT_OUTPUT), show_default=True, help="Where to write the JSON as well; '-' for stdout only.")
def main(seconds: float, rate: float, warmup_s: float, shares_text: str, before_s: float, after_s: float, idle_wait_s: float, output: str) -> None:
    """Benchmark one live session beside a busy batch queue under several --batch-live-share values; prints JSON."""
    shares = parse_shares(shares_text)
    if seconds <= 0 or rate <= 0 or warmup_s < 1.5 or before_s < 1 or after_s < 1:
        raise click.BadParameter("--seconds and --rate must be positive, --warmup at least 1.5, --before and --after at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    started = time.time()
    idle = wait_until_idle(idle_wait_s)
    if not idle["idle"]:
        click.echo(f"warning: the machine stayed busy for {idle_wait_s:g} s; measuring anyway", err=True)
    options = {"seconds": seconds, "rate": rate, "warmup_s": warmup_s, "before_s": before_s, "after_s": after_s}
    plan = [("live_alone", 0.25, False)] + [(f"batch_share_{share:g}", share, True) for share in shares]
    root = Path(tempfile.mkdtemp(prefix="streamcanvas-live-batch-bench-"))
    scenarios: dict[str, Any] = {}
    try:
        with environment(STREAMCANVAS_CACHE_DIR=str(root / "cache"), HF_HUB_OFFLINE="1"):
            for name, share, with_batch in plan:
                with OtherLoad() as load:
                    scenarios[name] = run_one(name, share, with_batch, root / name, options)
                scenarios[name]["other_load"] = {**load.figures, "loadavg_after": loadavg()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    busy = {name: result["other_load"]["other_share"] for name, result in scenarios.items() if (result["other_load"]["other_share"] or 0) > IDLE_SHARE}
    warning = None
    if busy or not idle["idle"]:
        warning = f"other processes used a share of the cores (before: {idle['last']['other_share']:.0%}; {busy}): these figures are not from a quiet machine"
    report = {
        "benchmark": "live_with_batch",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**describe_machine(), "loadavg_at_start": idle["last"]["loadavg"]},
        "config": {
            "resolution": f"{RESOLUTION}x{RESOLUTION}",
            "server_threads": THREADS,
            "live": {"clients": 1, "rate_hz": rate, "warmup_s": warmup_s, "seconds": seconds, "prompt": PROMPT, "codec": "jpeg q80"},
            "batch": {"job_params": JOB_PARAMS, "unfinished_kept": KEEP_UNFINISHED, "poll_s": POLL_S, "before_s": before_s, "after_s": after_s, "grace_after_live_s": GRACE_AFTER_LIVE_S},
            "shares": shares,
        },
        "other_load": {"before": idle, "phase_shares": {name: result["other_load"]["other_share"] for name, result in scenarios.items()}, "warning": warning},
        "summary": {name: summary_row(result) for name, result in scenarios.items()},
        "scenarios": scenarios,
        "wall_s": round(time.time() - started, 1),
    }
    emit_report(report, output, warning)


if __name__ == "__main__":
    main()
