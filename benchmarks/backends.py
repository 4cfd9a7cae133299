"""Backends side by side: eager torch, torch.compile, ONNX Runtime (and TensorRT on a GPU), same model,
same run.

    python -m streamcanvas.benchmarks.backends --resolution 256 --resolution 512
    python -m streamcanvas.benchmarks.backends --device cuda --model /models/sd-turbo-random --resolution 512

For each resolution:
1. `bare`: one StreamPipeline per backend over the same loaded weights, rendering a cycle of distinct
   canvases back to back with no server (fps, per-frame p50/p95/p99). Backends alternate in --rounds
   rounds, so all of them see the same drift in this machine's speed.
2. `server`: a real `streamcanvas serve --backend X` per backend on a loopback port, one WebSocket
   client each, measured one server at a time and alternating between them:
   - `throughput`: the client sends JPEG canvases faster than any backend renders (the server drops
     the surplus, latest-wins); server fps is the frames it delivers;
   - `lockstep`: the client sends the next canvas when the previous one is answered; latency is from
     sending a canvas to receiving the first frame that fully shows it.
Prints one JSON document (and writes it with --output); `speedup` compares each backend with torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from streamcanvas.pipelines.backends import BackendConfig, eager_backend, prepare_backend
from streamcanvas.pipelines.loading import ModelSpec, inference_threads, load_model
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import PROMPT, describe_machine, emit_report, make_canvases, merge_rounds, run_scenario, running_server

THROUGHPUT_RATE_HZ = 200.0


def bare_runs(
    spec: ModelSpec, backends: list[str], size: int, steps: int, engine_dir: Path | None, rounds: int, seconds: float,
    warmup_frames: int, threads: int | None = None,
) -> dict[str, Any]:
    threads = inference_threads(threads)
    model = load_model(spec)
    canvases = make_canvases(size)
    streams: dict[str, StreamPipeline] = {}
    prepared: dict[str, Any] = {}
    for name in backends:
        model.backend = eager_backend() if name == "torch" else prepare_backend(
            model, BackendConfig(name=name, engine_dir=engine_dir, threads=threads, measure_side=size)  # type: ignore[arg-type]
        )
        prepared[name] = model.backend
        stream = StreamPipeline(model, size, size)
        stream.configure(StreamParams(prompt=PROMPT, steps=steps), img2img=True)
        if stream.backend != name:
            raise click.ClickException(f"{name} does not cover {size}x{size}; the stream runs on {stream.backend}")
        started = time.perf_counter()
        for index in range(warmup_frames):  # torch.compile compiles here
            stream.render(canvases[index % len(canvases)], tag=index)
        prepared[name] = (model.backend, round(time.perf_counter() - started, 2))
        streams[name] = stream
    frame_ms: dict[str, list[float]] = {name: [] for name in backends}
    fps_rounds: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, stream in streams.items():
            frames, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / rounds:
                frame_started = time.perf_counter()
                stream.render(canvases[frames % len(canvases)], tag=len(frame_ms[name]) + 10)
                frame_ms[name].append((time.perf_counter() - frame_started) * 1000)
                frames += 1
            fps_rounds[name].append(frames / (time.perf_counter() - started))
    return {
        name: {
            "fps": round(statistics.fmean(fps_rounds[name]), 2),
            "fps_per_round": [round(fps, 2) for fps in fps_rounds[name]],
            "frame_ms": percentiles(frame_ms[name]),
            "warmup_s": prepared[name][1],
            "backend": prepared[name][0].describe(),
        }
        for name in backends
    }


def server_name(backend: str, overlap: str, overlaps: tuple[str, ...]) -> str:
    """A server configuration's name in the report: the backend, and whether its slot overlaps decoding
    with denoising when both ways run."""
    return backend if len(overlaps) == 1 else f"{backend}, overlap {overlap}"


def server_runs(
    arguments: list[str], backends: list[str], size: int, steps: int, rounds: int, seconds: float, warmup_s: float,
    overlaps: tuple[str, ...] = ("on",),
) -> dict[str, Any]:
    configurations = {
        server_name(name, overlap, overlaps): ("--backend", name, "--overlap-decode", overlap) for name in backends for overlap in overlaps
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"throughput": [], "lockstep": []} for name in configurations}
    with contextlib.ExitStack() as servers:
        urls = {
            name: servers.enter_context(running_server(size, 1, *options, *arguments)) for name, options in configurations.items()
        }
        for _ in range(rounds):
            for name, url in urls.items():
                for scenario, rate in (("throughput", THROUGHPUT_RATE_HZ), ("lockstep", None)):
                    results[name][scenario].append(
                        asyncio.run(run_scenario(url, size, 1, rate, warmup_s, seconds / rounds, params={"steps": steps}))
                    )
    report = {}
    for name in configurations:
        throughput, lockstep = merge_rounds(results[name]["throughput"]), merge_rounds(results[name]["lockstep"])
        for merged in (throughput, lockstep):
            merged.pop("latency_samples_ms")
        report[name] = {
            "server_fps": throughput["server_fps"],
            "server_fps_per_round": throughput["server_fps_per_round"],
            "throughput_latency_ms": throughput["latency_ms"],
            "latency_ms": lockstep["latency_ms"],
            "lockstep_fps": lockstep["server_fps"],
            "server_timings_ms": throughput["server_timings_ms"],
        }
    return report


@click.command()
@click.option("--model", help="A diffusers directory or cached repo id. Default: the trained toy model.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resolution", "resolutions", type=int, multiple=True, help="Square frame size (repeat). Default 256 and 512.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "compile", "onnxruntime", "tensorrt"]),
              help="Backends to compare (repeat). Default: torch, compile, onnxruntime; and tensorrt on CUDA.")
@click.option("--steps", default=2, show_default=True, help="Denoising steps (the stream batch depth).")
@click.option("--seconds", default=12.0, show_default=True, help="Measured seconds per backend, per part.")
@click.option("--rounds", default=3, show_default=True, help="Alternations between backends.")
@click.option("--warmup-frames", default=4, show_default=True, help="Unmeasured frames per backend before the bare runs.")
@click.option("--warmup", "warmup_s", default=3.0, show_default=True, help="Unmeasured seconds at the start of each server run.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="Engine cache. Default <cache>/engines.")
@click.option("--no-server", is_flag=True, help="Only the bare loop.")
@click.option("--threads", type=int, help="Threads of the bare loop's networks (torch's and ONNX Runtime's). Default: all cores. "
              "With 1, 1000 / fps is a frame's work in core-milliseconds: the most any scheduling can get from N cores is N × that fps.")
@click.option("--overlap-decode", "overlaps", multiple=True, type=click.Choice(["on", "off"]),
              help="The servers' --overlap-decode (repeat both to compare them, each backend either way). Default: on for CPU, off for CUDA (what auto picks).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
def main(
    model: str | None, device: str, resolutions: tuple[int, ...], backends: tuple[str, ...], steps: int, seconds: float,
    rounds: int, warmup_frames: int, warmup_s: float, engine_dir: Path | None, no_server: bool, threads: int | None,
    overlaps: tuple[str, ...], output: Path | None,
) -> None:
    """Compare inference backends on one model: bare loop and real server; prints JSON."""
    started = time.time()
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    chosen = list(backends) or ["torch", "compile", "onnxruntime", *(["tensorrt"] if on_cuda else [])]
    spec = ModelSpec(model=model, device=device)
    arguments = [*(["--model", model] if model else []), "--device", device]
    if engine_dir is not None:
        arguments += ["--engine-dir", str(engine_dir)]
    if "tensorrt" in chosen:
        arguments += ["--build-engines"]
    overlaps = tuple(dict.fromkeys(overlaps)) or (("off",) if on_cuda else ("on",))
    results = {}
    for size in resolutions or (256, 512):
        entry: dict[str, Any] = {"bare": bare_runs(spec, chosen, size, steps, engine_dir, rounds, seconds, warmup_frames, threads)}
        if not no_server:
            entry["server"] = server_runs(arguments, chosen, size, steps, rounds, seconds, warmup_s, overlaps)
        entry["speedup"] = {}
        if "torch" in chosen:
            entry["speedup"] = {name: {"bare": round(entry["bare"][name]["fps"] / entry["bare"]["torch"]["fps"], 2)} for name in chosen}
            if "server" in entry:
                # Each server against eager torch served the same way, and against eager torch's first way.
                for name in chosen:
                    for overlap in overlaps:
                        key, torch_key = server_name(name, overlap, overlaps), server_name("torch", overlap, overlaps)
                        server = entry["server"]
                        entry["speedup"].setdefault(key, {})["server"] = round(server[key]["server_fps"] / server[torch_key]["server_fps"], 2)
                        entry["speedup"][key]["server_vs_torch_" + overlaps[0]] = round(
                            server[key]["server_fps"] / server[server_name("torch", overlaps[0], overlaps)]["server_fps"], 2
                        )
        results[f"{size}x{size}"] = entry
    report = {
        "benchmark": "backends",
        "machine": describe_machine(),
        "config": {"model": model or "streamcanvas trained toy model", "device": device, "steps": steps, "seconds": seconds,
                   "rounds": rounds, "prompt": PROMPT, "backends": chosen, "overlap_decode": list(overlaps),
                   "bare_threads": threads or torch.get_num_threads()},
        "results": results,
        "wall_s": round(time.time() - started, 1),
    }
    emit_report(report, output)


if __name__ == "__main__":
    main()
