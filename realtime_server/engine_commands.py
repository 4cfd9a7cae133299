"""`streamcanvas engines build|list|prune`: the engine cache from the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

ENGINE_KINDS = ["onnxruntime", "tensorrt"]
COMPONENTS = ["unet", "vae_encoder", "vae_decoder"]


@click.group()
def engines() -> None:
    """Build, list and prune the engine cache: exported ONNX graphs and TensorRT engines.

    Entries are keyed by the weights actually loaded (after LoRA fusion), the component, the export
    code, opset, dtype, and for TensorRT the shape ranges, TensorRT version, GPU and CUDA version: a
    change to any of them makes a new entry instead of reusing a wrong one.
    """


@engines.command("build")
@click.option("--model", help="As for serve: a diffusers directory or a cached repo id. Default: the trained toy model.")
@click.option("--tiny-vae", help="As for serve: the live VAE whose encoder/decoder are built.")
@click.option("--lora", multiple=True, help="As for serve (repeatable): a bare PATH is fused into the UNet before export (the engine is keyed by the fused weights); with NAME=PATH, the UNet is also built with the weights LoRAs touch as inputs.")
@click.option("--controlnet", multiple=True, help="As for serve (repeatable), NAME=PATH: also builds the UNet that takes ControlNet residuals and each ControlNet.")
@click.option("--device", help="auto, cpu, cuda or cuda:N. Default auto.")
@click.option("--dtype", help="auto (float16 on CUDA, float32 on CPU), float32 or float16.")
@click.option("--backend", type=click.Choice(ENGINE_KINDS), help="What to build for. Default: tensorrt on CUDA, onnxruntime on the CPU.")
@click.option("--resolution", help="As for serve: the session size engines are tuned for, WIDTHxHEIGHT. Default 512x512.")
@click.option("--max-resolution", help="As for serve: the largest size engines accept. Default 1024x1024.")
@click.option("--engine-min-resolution", type=int, help="As for serve: the smallest side engines accept. Default 256.")
@click.option("--engine-max-batch", type=int, help="As for serve: the largest UNet batch. Default 8.")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="The engine cache. Default <cache>/engines.")
@click.option("--component", "components", multiple=True, type=click.Choice(COMPONENTS), help="Build only this component (repeat). Default: all, and what ControlNets and named LoRAs add.")
def build(backend: str | None, components: tuple[str, ...], **options: object) -> None:
    """Build the engines `serve` would use with the same options (a progress bar shows each stage)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from streamcanvas.pipelines.backends import ExtraArtifact, extra_artifacts
    from streamcanvas.pipelines.errors import PipelineError
    from streamcanvas.pipelines.loading import load_model
    from streamcanvas.trt_engines.builder import ArtifactBuilder
    from streamcanvas.trt_engines.cache import CacheError
    from streamcanvas.trt_engines.components import Component
    from streamcanvas.trt_engines.tensorrt_backend import EngineBuildError, tensorrt_unavailable_reason
    from .options import configure_logging, settings_from

    settings = settings_from(options)
    configure_logging("info")
    try:
        model = load_model(settings.model_spec())
    except PipelineError as error:
        raise click.ClickException(f"cannot load the model: {error}") from None
    config = settings.backend_config(threads=1)
    kind = backend or ("tensorrt" if model.placement.device.type == "cuda" else "onnxruntime")
    if kind == "tensorrt":
        unavailable = tensorrt_unavailable_reason(model.placement.device)
        if unavailable is not None:
            raise click.ClickException(f"cannot build TensorRT engines here: {unavailable}")
    chosen = [ExtraArtifact(Component(name)) for name in (components or COMPONENTS)]
    if not components:
        chosen += extra_artifacts(model)
    results = []
    bar_format = "{n_fmt}/{total_fmt} components [{elapsed}] {desc}"
    with logging_redirect_tqdm(), tqdm(total=len(chosen), unit="component", bar_format=bar_format) as bar:
        builder = ArtifactBuilder(config.cache, model.pipe, model_name=model.name, progress=bar.set_description_str)
        for artifact in chosen:
            component, module, lifted = artifact.component, artifact.module, artifact.lifted
            try:
                if kind == "tensorrt":
                    entry = builder.tensorrt(component, config.shapes, allow_build=True, module=module, lifted=lifted)
                else:  # the graphs ONNX Runtime runs
                    entry = builder.onnx(component, attention="fused", module=module, lifted=lifted)
            except (CacheError, EngineBuildError, OSError) as error:
                raise click.ClickException(f"building {component.value} failed: {error}") from None
            results.append((entry, "built" if entry.key.name in builder.built else "cached"))
            bar.set_description_str(f"{component.value} done")
            bar.update(1)
    for entry, how in results:
        click.echo(f"{how:6}  {entry.key.name}  {_size(entry.size):>9}  {entry.path}")


@engines.command("list")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="The engine cache. Default <cache>/engines.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry, with every key field.")
def list_entries(engine_dir: Path | None, as_json: bool) -> None:
    """Show each cache entry: its key fields, size and age; and anything unusable in the cache."""
    cache = _cache(engine_dir)
    good, bad = cache.entries()
    now = time.time()
    if as_json:
        for entry in good:
            record = {"name": entry.key.name, "path": str(entry.path), "size": entry.size, "created": entry.created,
                      "used": entry.used, "build_s": entry.build_s, "key": entry.key.fields(), "info": entry.info}
            click.echo(json.dumps(record, sort_keys=True))
        for path, problem in bad:
            click.echo(json.dumps({"path": str(path), "problem": problem}))
        return
    click.echo(f"{cache.root}: {len(good)} entries, {_size(sum(entry.size for entry in good))}")
    if good:
        header = ("COMPONENT", "KIND", "MODEL", "DTYPE", "SIDES", "BATCH", "TENSORRT", "GPU", "SIZE", "AGE", "USED", "KEY")
        rows = [header]
        for entry in good:
            key = entry.key
            sides = "any" if key.min_side is None else f"{key.min_side}-{key.max_side}"
            batch = "any" if key.min_batch is None else f"{key.min_batch}-{key.max_batch}"
            rows.append((
                key.component + ("+lora-inputs" if key.lifted else ""), key.kind, str(entry.info.get("model", "?")), key.dtype, sides, batch,
                key.tensorrt or "-", key.gpu or "-", _size(entry.size), _age(now - entry.created), _age(now - entry.used), key.digest,
            ))
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for path, problem in bad:
        click.echo(f"unusable: {path.name}: {problem} (`streamcanvas engines prune` removes it)")


@engines.command("prune")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="The engine cache. Default <cache>/engines.")
@click.option("--unused-for", "unused_days", type=float, help="Also remove entries no server or build has used for this many days.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def prune(engine_dir: Path | None, unused_days: float | None, remove_all: bool, dry_run: bool) -> None:
    """Remove unusable entries (corrupt, half-built) and, if asked, old or all entries."""
    cache = _cache(engine_dir)
    good, bad = cache.entries()
    now = time.time()
    old = [
        (entry.path, "--all" if remove_all else f"unused for {_age(now - entry.used)}")
        for entry in good
        if remove_all or (unused_days is not None and now - entry.used > unused_days * 86400)
    ]
    for path, why in bad + old:
        if not dry_run:
            cache.remove(path)
        click.echo(f"{'would remove' if dry_run else 'removed'} {path.name}: {why}")
    click.echo(f"{len(bad) + len(old)} {'to remove' if dry_run else 'removed'}, {len(good) - len(old)} kept")



def _cache(engine_dir: Path | None):  # type: ignore[no-untyped-def]
    from streamcanvas.pipelines.paths import default_engine_dir
    from streamcanvas.trt_engines.cache import EngineCache

    return EngineCache(engine_dir or default_engine_dir())


def _size(size: int) -> str:
    scaled, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, larger
    return f"{size} B" if unit == "B" else f"{scaled:.1f} {unit}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"

