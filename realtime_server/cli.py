"""The `streamcanvas` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .engine_commands import engines

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
BACKEND_CHOICES = ["auto", "torch", "compile", "onnxruntime", "tensorrt"]
"""As pipelines.backends.BACKENDS (a test checks they agree); repeated so `--help` needs no torch import."""
SHUTDOWN_GRACE_S = 10


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """streamcanvas: a real-time AI canvas server (StreamDiffusion over WebSocket + MsgPack)."""


@main.command()
@click.option("--host", help="Address to listen on. Default 127.0.0.1 (loopback only).")
@click.option("--port", type=int, help="TCP port to listen on (0 picks a free one). Default 8000.")
@click.option(
    "--model",
    multiple=True,
    help="A local diffusers directory, or a Hugging Face repo id already in the local cache "
    "(e.g. stabilityai/sd-turbo); looked up offline. Repeat for several, as NAME=PATH to give them short names: "
    "a session picks one in hello (\"model\"), the first is the default. Default: the project's trained toy model (its weights ship with the package).",
)
@click.option("--memory-budget", "memory_budget_gb", type=float, help="GiB the models may take on the device; a set of models over it is refused at start-up, with their sizes. Default: 90% of the GPU's memory, or of the memory available.")
@click.option(
    "--tiny-vae",
    help="AutoencoderTiny (TAESD) directory or cached repo id (e.g. madebyollin/taesd) to decode with; "
    "'none' keeps the model's full VAE; 'auto' (default) uses MODEL/taesd when it exists.",
)
@click.option("--lora", multiple=True, help="A LoRA directory or cached repo id (repeat for several). NAME=PATH loads it as an adapter that each session turns on and weighs live (\"loras\": {NAME: weight}); a bare PATH (one at most, e.g. an LCM-LoRA) is fused into the UNet for every frame.")
@click.option("--controlnet", multiple=True, help="A ControlNet, NAME=PATH (a diffusers directory or cached repo id; repeat for several), shared by every session that names it in \"controls\".")
@click.option("--upscaler", multiple=True, help="A super-resolution network, NAME=PATH (a transformers image-super-resolution directory or cached repo id, e.g. a Swin2SR x2/x4; repeat for several), that upscale jobs name as their \"upscaler\".")
@click.option("--depth-model", help="A depth-estimation network (a transformers directory or cached repo id, e.g. a DPT or Depth Anything) for controls with the 'depth' preprocessor.")
@click.option("--styles", type=click.Path(dir_okay=False, path_type=Path), help="A TOML file of style presets (see pipelines/styles.toml, the default set).")
@click.option("--resolution", help="Default session resolution WIDTHxHEIGHT, multiples of 8. Default 512x512.")
@click.option("--max-resolution", help="Largest resolution a client may ask for. Default 1024x1024.")
@click.option("--slots", type=int, help="Sessions rendered at once on this device, each with its own worker. Default 1.")
@click.option("--sessions-per-slot", help="Sessions one slot serves at once; their frames share UNet calls (cross-session batching). 'auto': measured at start-up, the most whose shared round takes at most 1.5x one session's frame. Default 1.")
@click.option("--batching/--no-batching", default=None, help="With several sessions per slot: stack their frames into one UNet call (default), or render them one by one, round-robin.")
@click.option("--overlap-decode", type=click.Choice(["auto", "on", "off"]), help="Decode, encode and send each frame on a second thread per slot while the slot's worker denoises the next: more frames when inputs come faster than frames (a camera), about the same for a client that waits for each frame. auto: for streams whose networks run on ONNX Runtime on the CPU, where it pays; never on CUDA. Default auto.")
@click.option("--frame-target", "frame_target_ms", type=float, help="With several sessions per slot: the round time, ms, that the batch size adapts to stay under. Default: off (every session with input, each round).")
@click.option("--max-waiting", type=int, help="Clients that may wait in line for a slot. Default 8.")
@click.option("--device", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N. Default auto.")
@click.option("--dtype", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.")
@click.option("--threads", type=int, help="Torch CPU threads for inference. Default: all cores.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), help="What runs the UNet and VAE: auto (TensorRT on CUDA when its engines are built, else ONNX Runtime where measured faster than torch, else torch), torch, compile (torch.compile), onnxruntime or tensorrt. Default auto.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="The engine cache (ONNX graphs, TensorRT engines). Default <cache>/engines.")
@click.option("--build-engines", is_flag=True, default=None, help="Build missing TensorRT engines at start-up (minutes each on a real model). Default: say what is missing and which command builds it.")
@click.option("--engine-min-resolution", type=int, help="Smallest image side TensorRT engines accept. Default 256 (or the session size, if smaller).")
@click.option("--engine-max-batch", type=int, help="Largest UNet batch TensorRT engines accept (steps x CFG factor). Default 8.")
@click.option("--cuda-graphs", is_flag=True, default=None, help="Replay TensorRT calls as CUDA graphs (less launch overhead per frame).")
@click.option("--idle-timeout", "idle_timeout_s", type=float, help="Seconds without a client message before its slot is freed. Default 120.")
@click.option("--api-key", "api_keys", multiple=True, help="Require this key in hello (repeat for several). Default: no keys.")
@click.option("--allowed-origin", "allowed_origins", multiple=True, help="Browser Origin allowed besides the server's own (repeat; '*' for any).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Host name the server answers to besides loopback (repeat; '*' for any). Default: loopback names on a loopback address, any name beyond it.")
@click.option("--ice-server", "ice_servers", multiple=True, help="STUN/TURN server for WebRTC (repeat): stun:HOST:PORT, or turn:USER:CREDENTIAL@HOST:PORT for TURN with credentials. Default: none.")
@click.option("--ice-host-address", "ice_host_addresses", multiple=True, help="Only offer WebRTC host candidates on this address (repeat). Default: every interface but loopback.")
@click.option("--webrtc-connect-timeout", "webrtc_connect_timeout_s", type=float, help="Seconds a WebRTC peer has to connect after its offer is answered, before its session (and slot) is closed. Default 15.")
@click.option("--http-read-timeout", "http_read_timeout_s", type=float, help="Seconds an HTTP request may take to send its head, or pause while sending its body (then 408). Default 10.")
@click.option("--max-pending-requests", type=int, help="HTTP requests that may be half-received at once; one more ends the oldest (408). Default 128.")
@click.option("--slow-consumer-timeout", "slow_consumer_timeout_s", type=float, help="Seconds a WebSocket client (or an HTTP response, e.g. MJPEG) may go unread before it is ended: slow_consumer, then a reset. Default 15.")
@click.option("--batch-queue", type=click.Choice(["embedded", "redis"]), help="Batch jobs: 'embedded' (SQLite + a worker in this process, default) or 'redis' (run `streamcanvas worker` processes).")
@click.option("--redis-url", help="Redis for --batch-queue redis, e.g. redis://127.0.0.1:6379/0.")
@click.option("--database-url", help="SQLAlchemy URL of the job database. Default sqlite:///<cache>/jobs.db.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), help="Where result images go. Default <cache>/results.")
@click.option("--batch-workers", type=int, help="Embedded queue: jobs run at once in this process (0: none). Default 1.")
@click.option("--batch-live-share", type=float, help="Share of the device a batch job may use while live sessions stream (0 … 1). Default 0.25.")
@click.option("--job-timeout", "job_timeout_s", type=float, help="Default running time allowed per job, seconds. Default 600.")
@click.option("--job-retention", "job_retention_s", type=float, help="Seconds ended jobs and their files are kept. Default 604800 (7 days).")
@click.option("--webhook-allow", "webhook_allow", multiple=True, help="URL prefix job callbacks may go to (repeat). Default: none (jobs may not name a webhook_url).")
@click.option("--webhook-secret", help="Secret that signs job callbacks (HMAC-SHA256). Needed with --webhook-allow.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Logging verbosity. Default info.")
def serve(**options: object) -> None:
    """Load the model, then serve the real-time canvas API.

    Every option can also be set as an environment variable STREAMCANVAS_<OPTION> (e.g.
    STREAMCANVAS_MODEL, STREAMCANVAS_API_KEYS=key1,key2); options given here win.
    """
    import uvicorn

    from streamcanvas.batch_fallback.errors import QueueUnavailable
    from streamcanvas.codecs.messages import serialize
    from streamcanvas.pipelines.errors import PipelineError
    from streamcanvas.sessions.session import SLOW_CONSUMER

    from .app import create_app
    from .connections import http_protocol, websocket_protocol
    from .options import configure_logging, settings_from
    from .runtime import Runtime

    settings = settings_from(options)
    configure_logging(settings.log_level)
    log = logging.getLogger("streamcanvas")
    if settings.binds_beyond_loopback and not settings.api_keys:
        log.warning(
            "listening on %s with NO api keys: anyone who can reach this address can use the GPU. "
            "Set --api-key (or STREAMCANVAS_API_KEYS) or bind to 127.0.0.1.",
            settings.host,
        )
    try:
        runtime = Runtime.load(settings)
    except (PipelineError, QueueUnavailable) as error:
        click.echo(f"streamcanvas: cannot start: {error}", err=True)
        sys.exit(2)
    if runtime.model.toy_model is not None:
        log.warning(
            "%s: frames come from streamcanvas's tiny %s TOY model (%s), not from real weights. %s "
            "Point --model at a diffusers directory or a cached Hugging Face repo id (e.g. --model "
            "stabilityai/sd-turbo) for real images.",
            "no --model given" if not runtime.settings.model else f"--model {runtime.settings.model[0]}",
            runtime.model.toy_model,
            runtime.model.path,
            TOY_MODEL_NOTES[runtime.model.toy_model],
        )
    uvicorn.run(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=http_protocol(settings.http_read_timeout_s, settings.slow_consumer_timeout_s, settings.max_pending_requests),
        ws=websocket_protocol(serialize(SLOW_CONSUMER), close_timeout_s=5.0),
        ws_max_size=settings.max_message_bytes * 2,
        ws_per_message_deflate=False,
        ws_max_queue=4,
        # A pong answers only after the client has read all that came before the ping: a client that has
        # not read for slow_consumer_timeout_s is found within that time (half to ping, half to answer).
        ws_ping_interval=settings.slow_consumer_timeout_s / 2,
        ws_ping_timeout=settings.slow_consumer_timeout_s / 2,
        lifespan="on",
        # Connections still open this long after SIGTERM are cut, so a client cannot hold up a shutdown.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


@main.command()
@click.option("--redis-url", help="The Redis the server queues jobs on (--batch-queue redis). Required.")
@click.option("--database-url", help="The server's job database (SQLAlchemy URL). Default sqlite:///<cache>/jobs.db.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), help="Where result images go (shared with the server). Default <cache>/results.")
@click.option("--model", multiple=True, help="As for serve (repeatable, NAME=PATH): the models jobs may name. Default: the trained toy model.")
@click.option("--tiny-vae", help="As for serve (used for previews).")
@click.option("--lora", multiple=True, help="As for serve (give the worker the LoRAs the server names, so jobs that use them run here).")
@click.option("--controlnet", multiple=True, help="As for serve.")
@click.option("--upscaler", multiple=True, help="As for serve.")
@click.option("--depth-model", help="As for serve.")
@click.option("--device", help="auto, cpu, cuda or cuda:N. Default auto.")
@click.option("--dtype", help="auto, float32, float16 or bfloat16.")
@click.option("--threads", type=int, help="Torch CPU threads. Default: all cores.")
@click.option("--batch-live-share", type=float, help="Share of the device to use while live sessions stream on this host (0 … 1). Default 0.25.")
@click.option("--job-heartbeat-timeout", "job_heartbeat_timeout_s", type=float, help="Seconds without a heartbeat before a job is taken over. Must match the server's. Default 30.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Logging verbosity. Default info.")
def worker(**options: object) -> None:
    """Run batch jobs from Redis (the server runs with --batch-queue redis), one at a time.

    Start as many as the devices allow, on this machine or others: each needs the Redis, the job
    database and the results directory the server uses.
    """
    from streamcanvas.batch_fallback.errors import QueueUnavailable
    from streamcanvas.batch_fallback.process import run_worker
    from streamcanvas.pipelines.errors import PipelineError

    from .options import configure_logging, settings_from

    settings = settings_from(options, batch_queue="redis")
    configure_logging(settings.log_level)
    try:
        run_worker(settings.batch_config(), settings.model_specs(), settings.threads, settings.memory_budget_bytes)
    except (PipelineError, QueueUnavailable) as error:
        click.echo(f"streamcanvas worker: cannot start: {error}", err=True)
        sys.exit(2)


TOY_MODEL_NOTES = {
    "trained": "It was trained by this project, offline, on generated drawings: it follows your canvas and knows a few "
    "words (the colours red, orange, yellow, green, blue, purple, pink, brown, and dark), but it paints no pictures of things.",
    "untrained": "Its weights are random: frames follow your canvas and prompt only faintly and look like dark noise.",
}


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--full-size",
    type=click.Choice(["sd15", "sd-turbo"]),
    help="Instead of the tiny model, one with the real architecture and size of Stable Diffusion 1.5 or "
    "sd-turbo (SD 2.1) and random weights (float16, about 2 GB): real-cost frames for benchmarks on a "
    "machine that cannot download weights.",
)
@click.option(
    "--train",
    is_flag=True,
    help="Train the tiny model on generated drawings (minutes on 2 cores): the toy model the server uses by "
    "default, whose frames follow the canvas and a few prompt words. A model in DIRECTORY that was trained "
    "by the same plan is kept (see --retrain).",
)
@click.option("--retrain", is_flag=True, help="With --train: train even if DIRECTORY holds a model trained by the same plan.")
@click.option("--sdxl", is_flag=True, help="An untrained tiny model shaped as SDXL(-turbo) is: two text encoders, added conditioning.")
def make_tiny_model_command(directory: Path, seed: int, full_size: str | None, train: bool, retrain: bool, sdxl: bool) -> None:
    """Build a test model into DIRECTORY (diffusers layout, TAESD in taesd/): the tiny SD-1.x-shaped one,
    untrained by default or trained with --train, or a full-size one with random weights with --full-size."""
    if full_size is not None and train:
        raise click.UsageError("--train and --full-size exclude each other: only the tiny model can be trained here")
    if retrain and not train:
        raise click.UsageError("--retrain goes with --train")
    if sdxl and (train or full_size is not None):
        raise click.UsageError("--sdxl builds the untrained tiny SDXL-shaped model: it goes with neither --train nor --full-size")
    if sdxl:
        from streamcanvas.pipelines.tiny import make_tiny_sdxl_model

        click.echo(f"wrote the untrained tiny SDXL-shaped model to {make_tiny_sdxl_model(directory, seed=seed)}")
        return
    if train:
        from streamcanvas.pipelines.toy_model import TrainingPlan, train_toy_model, trained_by

        plan = TrainingPlan(seed=seed)
        if trained_by(directory, plan) and not retrain:
            click.echo(f"{directory} already holds the toy model trained by this plan; kept it (--retrain to train again)")
            return
        path = train_toy_model(directory, plan)
        click.echo(f"wrote the trained toy model to {path}")
        return
    if full_size is not None:
        from streamcanvas.pipelines.full_size import make_full_size_model

        path = make_full_size_model(directory, architecture=full_size, seed=seed)  # type: ignore[arg-type]
        click.echo(f"wrote a full-size {full_size} model with random weights to {path}")
        return
    from streamcanvas.pipelines.tiny import make_tiny_model

    path = make_tiny_model(directory, seed=seed)
    click.echo(f"wrote the untrained tiny test model to {path}")


main.add_command(engines)


if __name__ == "__main__":
    main()
