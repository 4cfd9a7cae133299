"""Live controls: what a ControlNet and two LoRAs cost a live session, and what switching LoRAs costs.

    python -m streamcanvas.benchmarks.live_controls --resolution 256 --seconds 8

One real `streamcanvas serve` on a loopback port, with the toy model (or --model), two LoRAs and one
ControlNet built offline for it (random weights: the cost of the networks is what is measured, not
their pictures). In the same run, one client in lockstep (it sends its next canvas once the previous
one is answered) streams with: nothing; one ControlNet (scribble preprocessor on the canvas); two LoRAs
(weights 0.8 and 0.5); both. Then two clients on two slots at once, first with the same LoRA (no
switches), then one with each LoRA (the shared UNet's adapters switch on every call), against the
frame time; and the server's own count and mean time of LoRA switches (and, with `--backend
onnxruntime`, of LoRA weight merges: the compiled UNet binds weights merged per LoRA set).

In this process, with no server: UNet and ControlNet forward calls counted over frames of 1 and of 4
streams rendered together, to show that a ControlNet costs one extra network call per UNet call; and
flicker (frame-to-frame change) on a still scene from a noisy camera, for `feedback` 0, 0.3 and 0.6.

Prints one JSON document (and writes it with --output). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
import simplejpeg

from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.sharing import sample_canvases
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline, render_together
from streamcanvas.pipelines.tiny import make_tiny_controlnet, make_tiny_lora
from streamcanvas.pipelines.toy_model import ensure_toy_model
from streamcanvas.sessions.stats import percentiles

from .realtime_ws import describe_machine, emit_report, make_canvases, run_client, running_server

CONTROL = {"model": "lines", "scale": 1.0, "preprocessor": "scribble", "source": "canvas"}
LORAS = {"first": 0.8, "second": 0.5}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "controlnet": {"controls": [CONTROL]},
    "two_loras": {"loras": LORAS},
    "controlnet_and_two_loras": {"controls": [CONTROL], "loras": LORAS},
}


def build_extras(model_dir: Path, root: Path) -> dict[str, Path]:
    return {
        "first": make_tiny_lora(root / "lora-first", model_dir, seed=1),
        "second": make_tiny_lora(root / "lora-second", model_dir, seed=2),
        "lines": make_tiny_controlnet(root / "controlnet-lines", model_dir, seed=3),
    }


async def clients(url: str, size: int, params: list[dict[str, Any]], warmup_s: float, seconds: float) -> dict[str, Any]:
    payloads = [simplejpeg.encode_jpeg(canvas, quality=90) for canvas in make_canvases(size)]
    results = await asyncio.gather(*(run_client(url, size, payloads, None, warmup_s, seconds, extra) for extra in params))
    latency = [value for result in results for value in result.latency_ms]
    return {
        "clients": len(params),
        "fps_per_client": [round(result.frames / seconds, 2) for result in results],
        "latency_ms": percentiles(latency),
        "server_inference_ms": [result.server_stats.get("timings_ms", {}).get("inference_ms") for result in results],
    }


def lora_switches(url: str) -> dict[str, Any]:
    return httpx.get(f"{url.replace('ws://', 'http://').rsplit('/v1/', 1)[0]}/v1/info", timeout=10).json()["model"]["loras"]


def flicker(model_dir: Path, size: int, frames: int = 16, noise: float = 12.0) -> list[dict[str, Any]]:
    """Frame-to-frame change (mean absolute difference, grey levels) of a still scene seen by a noisy
    camera (Gaussian sensor noise of `noise` levels on every input), for `feedback` 0, 0.3 and 0.6."""
    model = load_model(ModelSpec(model=str(model_dir)))
    rng = np.random.default_rng(0)
    scene = make_canvases(size, 1)[0].astype(np.int16)
    inputs = [np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8) for _ in range(frames)]
    rows = []
    for feedback in (0.0, 0.3, 0.6):
        stream = StreamPipeline(model, size, size)
        stream.configure(StreamParams(prompt="a red house", feedback=feedback, **model.stream_defaults), img2img=True)
        outputs = [stream.render(image, tag=index).image.astype(np.int16) for index, image in enumerate(inputs)]
        changes = [float(np.abs(a - b).mean()) for a, b in zip(outputs[4:], outputs[5:])]
        rows.append({"feedback": feedback, "frame_to_frame_change": round(float(np.mean(changes)), 3)})
    return rows


def count_calls(model_dir: Path, extras: dict[str, Path], size: int, frames: int = 6) -> list[dict[str, Any]]:
    """Forward calls of the UNet and the ControlNet while 1 and 4 controlled streams render `frames`
    frames together."""
    model = load_model(ModelSpec(model=str(model_dir), controlnets=(("lines", str(extras["lines"])),)))
    calls = {"unet": 0, "controlnet": 0}
    model.pipe.unet.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    model.controlnets.get("lines").register_forward_hook(lambda *_: calls.__setitem__("controlnet", calls["controlnet"] + 1))
    canvases = sample_canvases(size, size)
    rows = []
    for count in (1, 4):
        streams = [StreamPipeline(model, size, size) for _ in range(count)]
        for index, stream in enumerate(streams):
            stream.configure(StreamParams(prompt="a red house", seed=index, controls=[CONTROL]), img2img=True)
        calls.update(unet=0, controlnet=0)
        started = time.perf_counter()
        for tag in range(frames):
            for result in render_together([(stream, canvases[tag % 2], tag) for stream in streams]):
                if isinstance(result, Exception):
                    raise result
        rows.append(
            {
                "streams": count,
                "frames_each": frames,
                "unet_calls": calls["unet"],
                "controlnet_calls": calls["controlnet"],
                "ms_a_round": round((time.perf_counter() - started) * 1000 / frames, 1),
            }
        )
    return rows


@click.command()
@click.option("--resolution", type=int, default=256, show_default=True)
@click.option("--seconds", type=float, default=8.0, show_default=True, help="Measured seconds per run.")
@click.option("--warmup", "warmup_s", type=float, default=3.0, show_default=True)
@click.option("--model", help="A diffusers directory (default: the trained toy model); LoRAs and the ControlNet are built for it.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True, help="What runs the UNet, the ControlNet and the VAE.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
def main(resolution: int, seconds: float, warmup_s: float, model: str | None, backend: str, output: Path | None) -> None:
    """Benchmark live controls (ControlNet, LoRAs, LoRA switching); prints JSON."""
    started = time.time()
    model_dir = Path(model) if model else ensure_toy_model()
    with tempfile.TemporaryDirectory(prefix="streamcanvas-live-controls-") as temporary:
        extras = build_extras(model_dir, Path(temporary))
        extra = ["--slots", "2", "--batch-workers", "0", "--model", str(model_dir), "--backend", backend]
        for name in ("first", "second"):
            extra += ["--lora", f"{name}={extras[name]}"]
        extra += ["--controlnet", f"lines={extras['lines']}"]
        with running_server(resolution, 2, *extra) as url:
            single = {
                name: asyncio.run(clients(url, resolution, [params], warmup_s, seconds)) for name, params in CONFIGURATIONS.items()
            }
            before = lora_switches(url)["switches"]
            same = asyncio.run(clients(url, resolution, [{"loras": {"first": 1.0}}] * 2, warmup_s, seconds))
            between = lora_switches(url)["switches"]
            switching = asyncio.run(clients(url, resolution, [{"loras": {"first": 1.0}}, {"loras": {"second": 1.0}}], warmup_s, seconds))
            after = lora_switches(url)
        calls = count_calls(model_dir, extras, resolution)
        steadiness = flicker(model_dir, resolution)
    none_p50 = single["none"]["latency_ms"]["p50"]
    report = {
        "benchmark": "live_controls",
        "machine": describe_machine(),
        "config": {"resolution": resolution, "seconds": seconds, "warmup_s": warmup_s, "model": model or "toy", "backend": backend, "codec": "jpeg q80"},
        "one_client": single,
        "one_client_p50_over_none": {name: round(run["latency_ms"]["p50"] / none_p50, 2) for name, run in single.items()},
        "lora_switching": {
            "same_lora_on_both_sessions": same,
            "a_lora_each": switching,
            "switches_with_same_lora": between - before,
            "switches_with_a_lora_each": after["switches"] - between,
            "switch_ms_mean": after["switch_ms_mean"],
            # Compiled UNets bind weights merged per LoRA set instead (adapters.merged): how often, how long.
            "merges": after.get("merges"),
            "merge_ms_mean": after.get("merge_ms_mean"),
            "p99_a_lora_each_over_same": round(switching["latency_ms"]["p99"] / same["latency_ms"]["p99"], 2),
        },
        "calls_per_round": calls,
        "flicker_noisy_still_camera": steadiness,
        "wall_s": round(time.time() - started, 1),
    }
    emit_report(report, output)


if __name__ == "__main__":
    main()
