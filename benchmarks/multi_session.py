"""Several sessions on one slot: cross-session batching against rendering them one by one.

    python -m streamcanvas.benchmarks.multi_session --resolution 256 --seconds 8

Two real `streamcanvas serve` processes on loopback ports, each with one slot that serves up to
max(--clients) sessions: `batched` stacks the sessions' frames into one UNet call and one VAE decode
(`--sessions-per-slot N`), `round_robin` renders them one at a time, least recently served first
(`--no-batching`). Same model, threads and backend; only the scheduling differs. For 1, 2, 4, 8
clients, alternating between the two servers so both see the same drift in this machine's speed,
every client draws in lockstep (it sends its next canvas once the frame that shows the previous one
has arrived, as the browser canvas paces itself) for --seconds after --warmup seconds.

Then, with no server, the same pipeline in this process: N streams rendered one after another against
together (`render_together`), ms a round.

Reported per run: aggregate fps (frames all clients received a second), per-session latency p50/p95/
p99 (sending a canvas to the first frame that fully shows it, measured by the client), the slowest
and fastest client's fps (fairness), and the server's count of frames rendered in shared calls.
Prints one JSON document (and writes it with --output). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click
import httpx
import simplejpeg

from streamcanvas.pipelines.backends import BACKENDS, BackendConfig, prepare_backend
from streamcanvas.pipelines.loading import ModelSpec, inference_threads, load_model
from streamcanvas.pipelines.sharing import round_ms, streams_for
from streamcanvas.pipelines.stream import StreamParams
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import describe_machine, emit_report, make_canvases, run_client, running_server

MODES = {"batched": (), "round_robin": ("--no-batching",)}


async def run_clients(
    url: str, size: int, clients: int, rate_hz: float | None, warmup_s: float, seconds: float
) -> dict[str, Any]:
    payloads = [simplejpeg.encode_jpeg(canvas, quality=90) for canvas in make_canvases(size)]
    prompts = ["a red house", "a blue boat", "a green tree", "a dark sky"]
    results = await asyncio.gather(
        *(
            run_client(url, size, payloads, rate_hz, warmup_s, seconds, {"prompt": prompts[index % len(prompts)], "seed": index})
            for index in range(clients)
        )
    )
    latency = [value for result in results for value in result.latency_ms]
    per_client_fps = [result.frames / seconds for result in results]
    return {
        "clients": clients,
        "aggregate_fps": round(sum(per_client_fps), 2),
        "answered_per_s": round(sum(result.answered for result in results) / seconds, 2),
        "per_session_fps": {"min": round(min(per_client_fps), 2), "max": round(max(per_client_fps), 2)},
        "latency_ms": percentiles(latency),
        "inputs_answered": sum(result.answered for result in results),
    }


def bare_comparison(size: int, counts: list[int], backend: str, model: str | None, rounds: int = 12) -> list[dict[str, Any]]:
    """No server: N streams in this process, one after another (`render`) against together
    (`render_together`), in alternating rounds; ms a round (every stream one frame)."""
    loaded = load_model(ModelSpec(model=model))
    loaded.backend = prepare_backend(loaded, BackendConfig(name=backend, threads=inference_threads(None), measure_side=size))  # type: ignore[arg-type]
    canvases = make_canvases(size)
    rows = []
    for count in counts:
        streams = streams_for(loaded, size, size, StreamParams(prompt="a red house"), count)
        timings: dict[bool, list[float]] = {False: [], True: []}
        tag = 0
        for index in range(3 + 2 * rounds):
            together = bool(index % 2)
            times = round_ms(streams, canvases, 1, together=together, first_tag=tag)
            tag += 1
            if index >= 3:  # the first rounds warm up
                timings[together] += times
        one_by_one, together_ms = (percentiles(timings[mode])["p50"] for mode in (False, True))
        rows.append({"streams": count, "round_ms_one_by_one_p50": one_by_one, "round_ms_together_p50": together_ms, "speedup": round(one_by_one / together_ms, 2)})
    return rows


def batched_frames(url: str) -> int:
    base = url.replace("ws://", "http://").removesuffix("/v1/stream")
    return int(httpx.get(f"{base}/v1/info", timeout=10).json()["batched_frames"])


PATTERNS = ("camera", "lockstep")


@click.command()
@click.option("--resolution", default=256, show_default=True, help="Square frame size in pixels.")
@click.option("--clients", "client_counts", default="1,2,4,8", show_default=True, help="Client counts to run, comma-separated.")
@click.option("--pattern", "patterns", multiple=True, type=click.Choice(PATTERNS), help="camera: each client sends at --rate (a webcam); lockstep: each sends its next canvas once the last is answered (the drawing page). Default: both.")
@click.option("--rate", "rate_hz", default=30.0, show_default=True, help="Canvases a second each camera client sends.")
@click.option("--seconds", default=8.0, show_default=True, help="Measured seconds per run.")
@click.option("--warmup", "warmup_s", default=2.0, show_default=True, help="Unmeasured seconds at the start of each run.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKENDS), help="The servers' backend.")
@click.option("--model", help="The servers' model (a diffusers directory or cached repo id). Default: the trained toy model.")
@click.option("--overlap-decode", "overlap", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]), help="Both servers' --overlap-decode.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
def main(
    resolution: int, client_counts: str, patterns: tuple[str, ...], rate_hz: float, seconds: float, warmup_s: float,
    backend: str, model: str | None, overlap: str, output: Path | None,
) -> None:
    """Benchmark cross-session batching against one-by-one rendering on one slot; prints JSON."""
    started = time.time()
    counts = [int(count) for count in client_counts.split(",")]
    patterns = patterns or PATTERNS
    extra = [
        "--backend", backend, "--sessions-per-slot", str(max(counts)), "--max-waiting", "0", "--batch-workers", "0",
        "--overlap-decode", overlap,
    ]  # fmt: skip
    if model:
        extra += ["--model", model]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {pattern: {mode: [] for mode in MODES} for pattern in patterns}
    with running_server(resolution, 1, *extra, *MODES["batched"]) as batched_url:
        with running_server(resolution, 1, *extra, *MODES["round_robin"]) as round_robin_url:
            urls = {"batched": batched_url, "round_robin": round_robin_url}
            for pattern in patterns:
                for count in counts:
                    for mode, url in urls.items():
                        before = batched_frames(url)
                        rate = rate_hz if pattern == "camera" else None
                        run = asyncio.run(run_clients(url, resolution, count, rate, warmup_s, seconds))
                        run["frames_in_shared_calls"] = batched_frames(url) - before
                        runs[pattern][mode].append(run)
    comparison = {pattern: compare(by_mode["batched"], by_mode["round_robin"]) for pattern, by_mode in runs.items()}
    bare = bare_comparison(resolution, counts, backend, model)
    report = {
        "benchmark": "multi_session",
        "machine": describe_machine(),
        "config": {
            "resolution": resolution, "seconds": seconds, "warmup_s": warmup_s, "backend": backend,
            "model": model or "toy", "camera_rate_hz": rate_hz, "codec": "jpeg q80", "overlap_decode": overlap,
        },  # fmt: skip
        "runs": runs,
        "comparison": comparison,
        "bare_pipeline": bare,
        "wall_s": round(time.time() - started, 1),
    }
    emit_report(report, output)


def compare(batched_runs: list[dict[str, Any]], round_robin_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: batched over one-by-one (fps, answered inputs, p99), and p99 over one client alone."""
    alone = batched_runs[0] if batched_runs and batched_runs[0]["clients"] == 1 else None
    rows = []
    for batched, one_by_one in zip(batched_runs, round_robin_runs):
        row: dict[str, Any] = {
            "clients": batched["clients"],
            "fps_batched_over_round_robin": _ratio(batched["aggregate_fps"], one_by_one["aggregate_fps"]),
            "answered_batched_over_round_robin": _ratio(batched["answered_per_s"], one_by_one["answered_per_s"]),
            "p99_batched_over_round_robin": _ratio(batched["latency_ms"]["p99"], one_by_one["latency_ms"]["p99"]),
        }
        if alone is not None:
            row["p99_batched_over_alone"] = _ratio(batched["latency_ms"]["p99"], alone["latency_ms"]["p99"])
        rows.append(row)
    return rows


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if denominator else None


if __name__ == "__main__":
    main()
