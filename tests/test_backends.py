"""Compiled inference on the CPU: ONNX export parity, the engine cache, backend selection, and whole
frames through real servers on ONNX Runtime against eager torch."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from filelock import FileLock

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, decode_frame, make_canvas, server_env

from streamcanvas.pipelines.backends import BACKENDS, BackendConfig, prepare_backend
from streamcanvas.pipelines.errors import BackendUnavailable
from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.stream import CFG_TYPES
from streamcanvas.pipelines.tiny import make_tiny_lora
from streamcanvas.trt_engines.builder import ONNX_FILE, ArtifactBuilder
from streamcanvas.trt_engines.cache import MANIFEST, EngineCache, EngineKey, fingerprint_module
from streamcanvas.trt_engines.components import (
    STREAM_COMPONENTS,
    CompiledControlNet,
    CompiledUNet,
    Component,
    ShapeRange,
    residual_shapes,
)
from streamcanvas.trt_engines.onnxruntime_backend import OnnxRuntimeRunner

SIZE = TEST_RESOLUTION


def cli(*args: str, cache_dir: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamcanvas.realtime_server.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=server_env(cache_dir),
    )


# ---- ONNX export parity -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_vae_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(ModelSpec(model=str(tiny_model_dir), tiny_vae="none"))


@pytest.mark.parametrize("attention", ["standard", "fused"])
@pytest.mark.parametrize("vae", ["taesd", "full"])
def test_every_exported_component_matches_torch_at_other_shapes(
    vae: str, attention: str, tiny_model, full_vae_model, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """Both ways of writing attention: standard operators (what TensorRT builds from) and ONNX Runtime's
    fused MultiHeadAttention (what ONNX Runtime runs), in the UNet and in the full VAE's middle block."""
    model = tiny_model if vae == "taesd" else full_vae_model
    assert type(model.pipe.vae).__name__ == ("AutoencoderTiny" if vae == "taesd" else "AutoencoderKL")
    builder = ArtifactBuilder(EngineCache(tmp_path), model.pipe, model_name="tiny")
    graphs = {component: builder.onnx(component, attention=attention).file(ONNX_FILE) for component in STREAM_COMPONENTS}  # type: ignore[arg-type]
    fused = {component: sum(node.op_type == "MultiHeadAttention" for node in onnx.load(str(path)).graph.node) for component, path in graphs.items()}
    # The tiny UNet has 6 transformer blocks (self- and cross-attention each); the full VAE one attention, TAESD none.
    assert fused == ({Component.UNET: 12, Component.VAE_ENCODER: int(vae == "full"), Component.VAE_DECODER: int(vae == "full")} if attention == "fused" else dict.fromkeys(graphs, 0))
    runners = {component: OnnxRuntimeRunner(path, torch.device("cpu"), threads=2) for component, path in graphs.items()}
    generator = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    # The graphs were traced at 128² with batch 2: other sides, non-square sizes and batches must work.
    for height, width, batch in [(64, 64, 1), (128, 192, 3), (256, 256, 4)]:
        latents = torch.randn(batch, 4, height // 8, width // 8, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        text = torch.randn(batch, 77, model.pipe.unet.config.cross_attention_dim, generator=generator)
        images = torch.rand(1, 3, height, width, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = {
                "unet": model.pipe.unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0],
                "vae_decoder": model.pipe.vae.decode(latents[:1], return_dict=False)[0],
            }
            encoded = model.pipe.vae.encode(images)
            expected["vae_encoder"] = encoded.latents if vae == "taesd" else encoded.latent_dist.mode()
        got = {
            "unet": runners[Component.UNET]({"sample": latents, "timestep": timesteps, "encoder_hidden_states": text}, latents.shape, torch.float32),
            "vae_decoder": runners[Component.VAE_DECODER]({"latents": latents[:1]}, expected["vae_decoder"].shape, torch.float32),
            "vae_encoder": runners[Component.VAE_ENCODER]({"images": images}, expected["vae_encoder"].shape, torch.float32),
        }
        for name in expected:
            difference = (expected[name] - got[name]).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), difference)
    assert all(difference <= 1e-3 for difference in worst.values()), worst


def test_the_controlnet_graphs_match_torch_at_other_shapes(tiny_model, tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A ControlNet's graph gives its residuals, and the controlled UNet graph takes them, as the torch
    modules do (≤ 1e-3), at sizes and batches other than the traced 128², batch 2; `residual_shapes`
    is what the ControlNet really gives."""
    from diffusers import ControlNetModel

    from streamcanvas.pipelines.tiny import make_tiny_controlnet

    net = ControlNetModel.from_pretrained(make_tiny_controlnet(tmp_path / "controlnet", tiny_model_dir, seed=5), local_files_only=True).eval()
    pipe = tiny_model.pipe
    builder = ArtifactBuilder(EngineCache(tmp_path / "cache"), pipe, model_name="tiny")

    def load(entry):  # type: ignore[no-untyped-def]
        return OnnxRuntimeRunner(entry.file(ONNX_FILE), torch.device("cpu"), threads=2)

    # The graphs ONNX Runtime runs (fused attention; TensorRT builds no engines for these).
    compiled_net = CompiledControlNet(load(builder.onnx(Component.CONTROLNET, module=net, attention="fused")), torch.float32, pipe.unet.config)
    compiled_unet = CompiledUNet(
        load(builder.onnx(Component.UNET, attention="fused")), torch.float32, controlled=load(builder.onnx(Component.UNET_CONTROLLED, attention="fused"))
    )
    assert builder.onnx_key(Component.CONTROLNET, module=net) != builder.onnx_key(Component.UNET_CONTROLLED)
    generator = torch.Generator().manual_seed(1)
    worst = {"controlnet": 0.0, "unet_controlled": 0.0}
    for height, width, batch in [(64, 64, 1), (128, 192, 3), (256, 256, 4)]:
        latents = torch.randn(batch, 4, height // 8, width // 8, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=generator)
        cond = torch.rand(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            down, middle = net(latents, timesteps, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=0.5, return_dict=False)
            expected = pipe.unet(
                latents, timesteps, encoder_hidden_states=text,
                down_block_additional_residuals=down, mid_block_additional_residual=middle, return_dict=False,
            )[0]
        assert [tuple(r.shape) for r in [*down, middle]] == residual_shapes(pipe.unet.config, batch, height // 8, width // 8)
        got_down, got_middle = compiled_net(latents, timesteps, text, cond, conditioning_scale=0.5)
        residual_error = max((a - b).abs().max().item() for a, b in zip([*down, middle], [*got_down, got_middle]))
        got = compiled_unet(latents, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=middle)[0]
        worst["controlnet"] = max(worst["controlnet"], residual_error)
        worst["unet_controlled"] = max(worst["unet_controlled"], (expected - got).abs().max().item())
    assert all(error <= 1e-3 for error in worst.values()), worst
    with pytest.raises(ValueError, match="no ControlNet residuals"):
        CompiledUNet(compiled_unet.runner, torch.float32)(latents, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=middle)


def test_large_weights_go_to_an_external_data_file(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What a real SD UNet (1.7 GB in float16, 3.4 GB in float32) takes; forced here on the tiny one."""
    from streamcanvas.trt_engines.export import export_component

    path = tmp_path / "unet.onnx"
    export_component(tiny_model.pipe, Component.UNET, path, external_above=0)
    weights = path.with_name("unet.onnx.data")
    assert weights.stat().st_size > 4 * path.stat().st_size
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    text = torch.randn(2, 77, tiny_model.pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = tiny_model.pipe.unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
    runner = OnnxRuntimeRunner(path, torch.device("cpu"), threads=1)
    got = runner({"sample": latents, "timestep": timesteps, "encoder_hidden_states": text}, latents.shape, torch.float32)
    assert (expected - got).abs().max().item() <= 1e-3


# ---- the cache key ------------------------------------------------------------------------------------

BASE_KEY = EngineKey(
    kind="tensorrt", component="unet", weights="a" * 64, export_version=1, opset=17, dtype="float16",
    min_side=256, opt_side=512, max_side=1024, min_batch=1, opt_batch=2, max_batch=8,
    tensorrt="10.5.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", cuda="12.6",
)
KEY_CHANGES = [
    ("kind", "onnx"), ("component", "vae_decoder"), ("weights", "b" * 64), ("export_version", 2), ("opset", 18),
    ("dtype", "float32"), ("attention", "fused"), ("lifted", "c" * 24), ("min_side", 320), ("opt_side", 768), ("max_side", 768), ("min_batch", 2),
    ("opt_batch", 4), ("max_batch", 4), ("tensorrt", "10.6.0"), ("gpu", "NVIDIA GeForce RTX 4090"),
    ("compute_capability", "8.9"), ("cuda", "12.8"),
]


@pytest.mark.parametrize("field,value", KEY_CHANGES, ids=[field for field, _ in KEY_CHANGES])
def test_changing_any_key_field_changes_the_key(field: str, value: object) -> None:
    changed = dataclasses.replace(BASE_KEY, **{field: value})
    assert changed.digest != BASE_KEY.digest and changed.name != BASE_KEY.name


def test_the_table_covers_every_key_field_and_nothing_else_changes_the_key(tmp_path: Path) -> None:
    assert {field for field, _ in KEY_CHANGES} == {field.name for field in dataclasses.fields(EngineKey)}
    # The same fields, however the key is made, in any cache directory, name the same entry.
    rebuilt = EngineKey(**json.loads(json.dumps(dict(reversed(list(BASE_KEY.fields().items()))))))
    assert rebuilt.digest == BASE_KEY.digest
    assert EngineCache(tmp_path / "a").entry_path(BASE_KEY).name == EngineCache(tmp_path / "b").entry_path(rebuilt).name


def test_the_weights_fingerprint_follows_the_weights_not_their_path(tiny_model_dir: Path, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    moved = load_model(ModelSpec(model=str(copy)))
    assert fingerprint_module(moved.pipe.unet) == fingerprint_module(tiny_model.pipe.unet)
    lora = make_tiny_lora(tmp_path / "lora", tiny_model_dir)
    fused = load_model(ModelSpec(model=str(tiny_model_dir), lora=str(lora)))
    assert fingerprint_module(fused.pipe.unet) != fingerprint_module(tiny_model.pipe.unet)
    assert fingerprint_module(fused.pipe.vae) == fingerprint_module(tiny_model.pipe.vae)


# ---- the cache on disk: corrupt entries, two builders, crashes, list and prune ----------------------------


def test_a_corrupt_entry_is_detected_and_rebuilt(tiny_model, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cache = EngineCache(tmp_path)
    builder = ArtifactBuilder(cache, tiny_model.pipe, model_name="tiny")
    entry = builder.onnx(Component.VAE_DECODER)
    graph = entry.file(ONNX_FILE)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    graph.write_bytes(bytes(data))
    good, bad = cache.entries()
    assert [(path.name, problem) for path, problem in bad] == [(entry.path.name, f"{ONNX_FILE} does not match its checksum")]
    rebuilt = builder.onnx(Component.VAE_DECODER)
    assert "unusable" in caplog.text and rebuilt.created > entry.created
    OnnxRuntimeRunner(rebuilt.file(ONNX_FILE), torch.device("cpu"), threads=1)  # loads
    (rebuilt.path / MANIFEST).write_text("{not json")
    assert builder.onnx(Component.VAE_DECODER).created > rebuilt.created


def test_two_builder_processes_build_once_and_both_succeed(tiny_model_dir: Path, tiny_model, cache_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engines = tmp_path / "engines"
    key = ArtifactBuilder(EngineCache(engines), tiny_model.pipe, model_name="tiny").onnx_key(Component.VAE_DECODER, attention="fused")
    engines.mkdir()
    command = [sys.executable, "-m", "streamcanvas.realtime_server.cli", "engines", "build", "--model", str(tiny_model_dir),
               "--engine-dir", str(engines), "--component", "vae_decoder", "--backend", "onnxruntime"]
    # Hold the entry's lock ourselves until both builders are waiting on it, so they truly overlap.
    lock = FileLock(str(engines / f".{key.name}.lock"))
    lock.acquire()
    logs = [tmp_path / f"builder-{index}.log" for index in range(2)]
    builders = [subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=server_env(cache_dir)) for log in logs]
    try:
        deadline = time.monotonic() + 120
        while not all("waiting for it" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(builder.poll() is None for builder in builders), [log.read_text() for log in logs]
            time.sleep(0.2)
        assert not EngineCache(engines).entry_path(key).exists()
    finally:
        lock.release()
    assert [builder.wait(120) for builder in builders] == [0, 0]
    outputs = [log.read_text() for log in logs]
    assert sorted(line.split()[0] for output in outputs for line in output.splitlines() if key.name in line and line.startswith(("built ", "cached"))) == ["built", "cached"]
    assert sum(output.count("exported vae_decoder") for output in outputs) == 1
    assert "using " + key.name + ", built by another process" in "".join(outputs)
    good, bad = EngineCache(engines).entries()
    assert [entry.key for entry in good] == [key] and bad == []


def test_a_builder_killed_mid_build_leaves_no_entry_and_the_next_build_recovers(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    command = [sys.executable, "-m", "streamcanvas.realtime_server.cli", "engines", "build", "--model", str(tiny_model_dir),
               "--engine-dir", str(engines), "--component", "unet"]
    builder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env(cache_dir))
    deadline = time.monotonic() + 120
    while not list(engines.glob(".unet-onnx-*.partial-*")):
        assert builder.poll() is None and time.monotonic() < deadline, "the build ended before it could be interrupted"
        time.sleep(0.02)
    builder.send_signal(signal.SIGKILL)
    builder.wait(10)
    good, bad = EngineCache(engines).entries()
    assert good == [] and [problem for _, problem in bad] == ["left over from a build that did not finish"]
    listed = cli("engines", "list", "--engine-dir", str(engines), cache_dir=cache_dir)
    assert "unusable" in listed.stdout and "did not finish" in listed.stdout
    rebuilt = cli(*command[3:], cache_dir=cache_dir)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.startswith("built") and "export unet to ONNX" in rebuilt.stderr  # the progress bar's stages
    good, bad = EngineCache(engines).entries()
    assert [entry.key.component for entry in good] == ["unet"] and bad == []


def test_engines_list_and_prune_on_a_real_cache(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    built = cli("engines", "build", "--model", str(tiny_model_dir), "--engine-dir", str(engines), cache_dir=cache_dir)
    assert built.returncode == 0, built.stderr
    assert [line.split()[0] for line in built.stdout.splitlines()] == ["built"] * 3
    again = cli("engines", "build", "--model", str(tiny_model_dir), "--engine-dir", str(engines), cache_dir=cache_dir)
    assert [line.split()[0] for line in again.stdout.splitlines()] == ["cached"] * 3

    listed = cli("engines", "list", "--engine-dir", str(engines), cache_dir=cache_dir)
    assert listed.returncode == 0 and "3 entries" in listed.stdout
    for component in ("unet", "vae_encoder", "vae_decoder"):
        assert any(line.startswith(component) and " onnx " in line and "float32" in line for line in listed.stdout.splitlines())
    records = [json.loads(line) for line in cli("engines", "list", "--json", "--engine-dir", str(engines), cache_dir=cache_dir).stdout.splitlines()]
    assert {record["key"]["component"] for record in records} == {"unet", "vae_encoder", "vae_decoder"}
    assert all(record["key"]["opset"] == 17 and record["size"] > 0 and record["info"]["model"] for record in records)

    # One entry last used ten days ago, one broken, one half-built.
    old, broken, fine = sorted(Path(record["path"]) for record in records)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old / MANIFEST, (ten_days_ago, ten_days_ago))
    (broken / ONNX_FILE).unlink()
    (engines / ".unet-onnx-0123.partial-99999-0").mkdir()
    dry = cli("engines", "prune", "--unused-for", "7", "--dry-run", "--engine-dir", str(engines), cache_dir=cache_dir)
    assert dry.returncode == 0 and "3 to remove, 1 kept" in dry.stdout and old.exists() and broken.exists()
    pruned = cli("engines", "prune", "--unused-for", "7", "--engine-dir", str(engines), cache_dir=cache_dir)
    assert pruned.returncode == 0 and "3 removed, 1 kept" in pruned.stdout, pruned.stdout
    assert sorted(path.name for path in engines.iterdir() if path.is_dir()) == [fine.name]
    everything = cli("engines", "prune", "--all", "--engine-dir", str(engines), cache_dir=cache_dir)
    assert "1 removed, 0 kept" in everything.stdout and not fine.exists()


def test_engines_build_also_builds_what_controlnets_and_loras_add(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """With `--controlnet NAME=PATH` and `--lora NAME=PATH`, `engines build` builds the controlled UNet,
    the ControlNet and the two LoRA graphs too, and a backend prepared for the same model takes every
    one of its graphs from the cache, building nothing."""
    from streamcanvas.pipelines.tiny import make_tiny_controlnet

    lora = make_tiny_lora(tmp_path / "lora", tiny_model_dir)
    net = make_tiny_controlnet(tmp_path / "controlnet", tiny_model_dir)
    engines = tmp_path / "engines"
    built = cli(
        "engines", "build", "--model", str(tiny_model_dir), "--engine-dir", str(engines),
        "--lora", f"ink={lora}", "--controlnet", f"lines={net}", cache_dir=cache_dir,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert [line.split()[0] for line in built.stdout.splitlines()] == ["built"] * 7
    keys = [entry.key for entry in EngineCache(engines).entries()[0]]
    assert sorted((key.component, key.lifted is not None) for key in keys) == [
        ("controlnet", False), ("unet", False), ("unet", True), ("unet_controlled", False), ("unet_controlled", True),
        ("vae_decoder", False), ("vae_encoder", False),
    ]  # fmt: skip
    model = load_model(ModelSpec(model=str(tiny_model_dir), adapters=(("ink", str(lora)),), controlnets=(("lines", str(net)),)))
    backend = prepare_backend(model, BackendConfig(name="onnxruntime", engine_dir=engines))
    assert sorted(backend.engines) == sorted(key.name for key in keys)
    assert len(EngineCache(engines).entries()[0]) == 7
    listed = cli("engines", "list", "--engine-dir", str(engines), cache_dir=cache_dir).stdout.splitlines()
    assert sum(line.startswith(("unet+lora-inputs ", "unet_controlled+lora-inputs ")) for line in listed) == 2


# ---- choosing the backend ------------------------------------------------------------------------------


def test_the_cli_offers_exactly_the_backends_there_are() -> None:
    from streamcanvas.realtime_server.cli import BACKEND_CHOICES

    assert tuple(BACKEND_CHOICES) == BACKENDS


def test_auto_measures_and_reports_its_choice(server: ServerProcess) -> None:
    backend = server.info()["backend"]
    assert backend["requested"] == "auto"
    assert backend["fallbacks"][0].startswith("tensorrt: ")  # no CUDA here
    measured = backend["measurement"] if backend["name"] == "onnxruntime" else None
    log = server.log()
    if backend["name"] == "onnxruntime":
        assert measured["onnxruntime_ms"] < measured["torch_ms"]
        assert len(backend["engines"]) == 3 and backend["reason"].startswith("measured faster")
        assert "backend auto: onnxruntime, measured faster" in log
    else:
        assert backend["name"] == "torch" and "onnxruntime: measured slower" in backend["fallbacks"][-1]
        assert "backend auto: not onnxruntime: measured slower" in log


def test_an_unavailable_backend_fails_at_start_up(cache_dir: Path) -> None:
    tensorrt = cli("serve", "--port", "0", "--backend", "tensorrt", "--resolution", "128x128", cache_dir=cache_dir)
    assert tensorrt.returncode == 2
    assert "cannot start: tensorrt cannot run here:" in tensorrt.stderr
    assert "tensorrt package is not installed" in tensorrt.stderr or "not a CUDA device" in tensorrt.stderr
    bfloat16 = cli("serve", "--port", "0", "--backend", "onnxruntime", "--dtype", "bfloat16", "--resolution", "128x128", cache_dir=cache_dir)
    assert bfloat16.returncode == 2 and "onnxruntime cannot run here: bfloat16 is not supported" in bfloat16.stderr


def test_an_unknown_backend_is_a_usage_error(cache_dir: Path) -> None:
    result = cli("serve", "--backend", "tensorflow", cache_dir=cache_dir)
    assert result.returncode == 2 and "tensorflow" in result.stderr
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        BackendConfig(name="tensorflow")  # type: ignore[arg-type]


def test_tensorrt_shapes_refuse_inconsistent_ranges() -> None:
    with pytest.raises(ValueError, match="min_side <= opt_side <= max_side"):
        ShapeRange(min_side=512, opt_side=256, max_side=1024)
    shapes = ShapeRange(min_side=256, opt_side=512, max_side=768, max_batch=4)
    assert shapes.covers(256, 768, 4) and not shapes.covers(128, 512) and not shapes.covers(512, 512, 5)
    assert shapes.profile(Component.UNET, text_width=1024)["encoder_hidden_states"] == ((1, 77, 1024), (2, 77, 1024), (4, 77, 1024))
    assert set(shapes.profile(Component.UNET)) == {"sample", "timestep", "encoder_hidden_states"}
    # An SDXL UNet's engine takes the pooled text embedding and the six size ids too.
    sdxl = shapes.profile(Component.UNET, text_width=2048, pooled_width=1280)
    assert sdxl["text_embeds"] == ((1, 1280), (2, 1280), (4, 1280)) and sdxl["time_ids"] == ((1, 6), (2, 6), (4, 6))


def test_tensorrt_profiles_cover_every_input_of_the_control_and_lora_graphs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TensorRT builds the controlled UNet, ControlNet and LoRA engines from their standard-attention
    ONNX graphs: each profile names exactly the graph's inputs, with the graph's ranks, residual shapes
    that follow the UNet's down blocks at every corner, and one fixed shape per lifted weight."""
    from streamcanvas.pipelines.tiny import make_tiny_controlnet

    lora = make_tiny_lora(tmp_path / "lora", tiny_model_dir)
    net_dir = make_tiny_controlnet(tmp_path / "controlnet", tiny_model_dir)
    model = load_model(ModelSpec(model=str(tiny_model_dir), adapters=(("ink", str(lora)),), controlnets=(("lines", str(net_dir)),)))
    builder = ArtifactBuilder(EngineCache(tmp_path / "engines"), model.pipe, model_name="tiny")
    shapes = ShapeRange(min_side=64, opt_side=128, max_side=256, max_batch=4)
    net = model.controlnets.get("lines")
    lifted = model.adapters.lifted()
    for component, module, weights in (
        (Component.UNET_CONTROLLED, None, ()),
        (Component.CONTROLNET, net, ()),
        (Component.UNET, None, lifted),
        (Component.UNET_CONTROLLED, None, lifted),
    ):
        profile = builder.tensorrt_profile(component, shapes, module, weights)
        graph = onnx.load(str(builder.onnx(component, module=module, lifted=weights).file(ONNX_FILE)), load_external_data=False)
        ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in graph.graph.input}
        assert set(profile) == set(ranks), (component, set(profile) ^ set(ranks))
        assert all(len(shape) == ranks[name] for name, corners in profile.items() for shape in corners), component
        for name, corners in profile.items():
            assert corners[0] <= corners[1] <= corners[2] if name.startswith("lifted_") else all(low <= high for low, high in zip(corners[0], corners[2])), name
    controlled = builder.tensorrt_profile(Component.UNET_CONTROLLED, shapes)
    assert controlled["down_residual_0"] == ((1, 32, 8, 8), (2, 32, 16, 16), (4, 32, 32, 32))
    assert controlled["mid_residual"][2][2:] == (32 // 2 ** (len(model.pipe.unet.config.block_out_channels) - 1),) * 2
    assert builder.tensorrt_profile(Component.CONTROLNET, shapes, net)["controlnet_cond"] == ((1, 3, 64, 64), (2, 3, 128, 128), (4, 3, 256, 256))
    weights = builder.tensorrt_profile(Component.UNET, shapes, lifted=lifted)
    parameters = dict(model.pipe.unet.named_parameters())
    assert [weights[f"lifted_weight_{index}"][0] for index in range(len(lifted))] == [tuple(parameters[name].shape) for name in lifted]


# ---- whole frames: ONNX Runtime against torch through real servers ------------------------------------


@pytest.fixture(scope="module")
def torch_and_onnx_servers(cache_dir: Path, artifacts_dir: Path):  # type: ignore[no-untyped-def]
    servers = [
        start_server(cache_dir, artifacts_dir, f"backend-{name}", "--backend", name, "--slots", "1")
        for name in ("torch", "onnxruntime")
    ]
    yield servers
    for server in servers:
        server.stop()


def psnr(expected: np.ndarray, got: np.ndarray) -> float:
    error = np.mean((expected.astype(np.float64) - got.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


async def _frames(server: ServerProcess, mode: str, cfg_type: str) -> list[np.ndarray]:
    params = {"prompt": "a lighthouse at night", "seed": 5, "cfg_type": cfg_type, "guidance_scale": 1.8, "steps": 2}
    async with Client.connect(server.ws_url) as client:
        await client.hello(mode=mode, params=params)
        if mode == "txt2img":
            frames = [decode_frame(await client.expect("frame"))]
            frames.append(decode_frame(await client.frame_for(await client.send_params(prompt="a lighthouse by day"))))
            return frames
        return [decode_frame(await client.frame_for(await client.send_canvas(make_canvas(SIZE, seed)))) for seed in (1, 2, 3)]


@pytest.mark.parametrize("mode", ["img2img", "txt2img"])
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
async def test_onnxruntime_frames_match_torch_frames(torch_and_onnx_servers, mode: str, cfg_type: str) -> None:  # type: ignore[no-untyped-def]
    eager, onnx = torch_and_onnx_servers
    assert (eager.info()["backend"]["name"], onnx.info()["backend"]["name"]) == ("torch", "onnxruntime")
    expected, got = await asyncio.gather(_frames(eager, mode, cfg_type), _frames(onnx, mode, cfg_type))
    assert len(expected) == len(got)
    for reference, frame in zip(expected, got):
        assert frame.std() > 5, "a blank frame would match trivially"
        assert psnr(reference, frame) >= 40.0


async def test_a_session_size_the_graphs_do_not_take_runs_on_torch(torch_and_onnx_servers) -> None:  # type: ignore[no-untyped-def]
    _, onnx = torch_and_onnx_servers
    side = onnx.info()["backend"]["side_multiple"]
    odd = SIZE + 8  # a multiple of 8 but not of the UNet's side multiple
    assert odd % side
    async with Client.connect(onnx.ws_url) as client:
        await client.hello(width=odd, height=odd, params={"prompt": "a boat"})
        frame = decode_frame(await client.frame_for(await client.send_canvas(make_canvas(odd, 4))))
    assert frame.shape == (odd, odd, 3)
    assert f"does not cover {odd}x{odd}" in onnx.log()


def test_prepare_backend_reuses_cached_graphs(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = BackendConfig(name="onnxruntime", engine_dir=tmp_path, threads=1, measure_side=64)
    first = prepare_backend(tiny_model, config)
    created = {entry.key.name: entry.created for entry in EngineCache(tmp_path).entries()[0]}
    second = prepare_backend(tiny_model, config)
    assert first.engines == second.engines and set(created) == set(first.engines)
    assert {entry.key.name: entry.created for entry in EngineCache(tmp_path).entries()[0]} == created
    assert second.name == "onnxruntime" and second.reason == "requested" and second.measurement is None


def test_torch_glue_runs_on_one_thread_only_while_onnxruntime_runs_every_network(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Between ONNX Runtime's calls torch only moves small tensors, on one thread (a stream with a LoRA
    too: its UNet is compiled); a stream at a size the graphs do not take runs on torch and keeps the
    thread's own count, and every frame puts the count back."""
    from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
    from streamcanvas.pipelines.tiny import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora", tiny_model_dir)
    model = load_model(ModelSpec(model=str(tiny_model_dir), adapters=(("ink", str(lora)),)))
    model.backend = prepare_backend(model, BackendConfig(name="onnxruntime", engine_dir=tmp_path / "engines", threads=2))
    stream = StreamPipeline(model, 64, 64)
    stream.configure(StreamParams(prompt="a cat", loras={"ink": 1.0}), img2img=True)
    seen: list[int] = []
    decode = model.backend.compiled_for(64, 64, 2)[1].decoder  # type: ignore[index]
    model.backend.compiled_for(64, 64, 2)[1].decoder = lambda *args: (seen.append(torch.get_num_threads()), decode(*args))[1]  # type: ignore[index]
    threads = torch.get_num_threads()
    assert threads > 1, "needs a machine with two cores or more"
    stream.render(make_canvas(64, 1), tag=1)
    assert stream.backend == "onnxruntime" and stream.glue_threads == 1 and seen == [1] and torch.get_num_threads() == threads
    odd = StreamPipeline(model, 72, 72)  # not a multiple of the graphs' side multiple (16)
    odd.configure(StreamParams(prompt="a cat"), img2img=True)
    thread_counts: list[int] = []
    model.pipe.unet.register_forward_hook(lambda *_: thread_counts.append(torch.get_num_threads()))
    odd.render(make_canvas(72, 2), tag=2)
    assert odd.backend == "torch" and odd.glue_threads is None and set(thread_counts) == {threads}
    assert torch.get_num_threads() == threads


def test_the_lora_graphs_take_merged_weights_and_match_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With named LoRAs, the UNet is exported again with the weights the LoRAs change as inputs (its own
    cache entry); fed the weights merged for a LoRA set, it gives what torch's UNet gives with those
    adapters active, at shapes other than the traced one and for sets it has not seen before."""
    loras = [("ink", str(make_tiny_lora(tmp_path / "ink", tiny_model_dir, seed=1))), ("glow", str(make_tiny_lora(tmp_path / "glow", tiny_model_dir, seed=2)))]
    model = load_model(ModelSpec(model=str(tiny_model_dir), adapters=tuple(loras)))
    model.backend = prepare_backend(model, BackendConfig(name="onnxruntime", engine_dir=tmp_path / "engines", threads=2))
    lifted = model.adapters.lifted()
    # The tiny LoRAs change every attention projection: q, k, v and out of 12 attention layers.
    assert len(lifted) == 48 and all(name.endswith(("to_q.base_layer.weight", "to_out.0.base_layer.weight", "to_k.base_layer.weight", "to_v.base_layer.weight")) for name in lifted)
    entries = {entry.key.name: entry.key for entry in EngineCache(tmp_path / "engines").entries()[0]}
    unets = [key for key in entries.values() if key.component == "unet"]
    assert len(unets) == 2 and {key.lifted is None for key in unets} == {True, False}
    generator = torch.Generator().manual_seed(3)
    unet = model.backend.unet
    for batch, side, wanted in ((1, 48, (("ink", 1.0),)), (3, 80, (("glow", 0.5), ("ink", -1.5))), (2, 64, ())):
        sample = torch.randn(batch, 4, side // 8, side // 8, generator=generator)
        timestep = torch.tensor([900, 500, 100][:batch])
        text = torch.randn(batch, 77, model.pipe.unet.config.cross_attention_dim, generator=generator)
        with model.adapters.wanted(wanted):
            compiled = unet(sample, timestep, encoder_hidden_states=text)[0]
            expected = model.pipe.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]
        base = model.pipe.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]
        assert (compiled - expected).abs().max().item() <= 1e-3, wanted
        if wanted:
            assert (expected - base).abs().max().item() > 0.02, "the LoRA made no difference: the test proves nothing"


@pytest.mark.slow
def test_torch_compile_frames_match_eager_frames(tiny_model_dir: Path) -> None:
    """The `compile` backend (inductor on the CPU; about a minute to compile the first frame's shapes)."""
    from streamcanvas.pipelines.stream import StreamParams, StreamPipeline

    model = load_model(ModelSpec(model=str(tiny_model_dir)))
    canvases = [make_canvas(64, seed) for seed in (1, 2, 3)]
    frames = {}
    for name in ("torch", "compile"):
        model.backend = prepare_backend(model, BackendConfig(name=name))  # type: ignore[arg-type]
        stream = StreamPipeline(model, 64, 64)
        stream.configure(StreamParams(prompt="a cat"), img2img=True)
        assert stream.backend == name
        frames[name] = np.stack([stream.render(canvas, tag=index).image for index, canvas in enumerate(canvases)])
    assert frames["torch"].std() > 5
    assert psnr(frames["torch"], frames["compile"]) >= 40.0


def test_a_graph_the_runtime_refuses_is_rebuilt(tiny_model, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A file that passes its checksum but that ONNX Runtime cannot load (as one written by another
    version would be) is removed, rebuilt and loaded."""
    import hashlib

    cache = EngineCache(tmp_path)
    entry = ArtifactBuilder(cache, tiny_model.pipe, model_name="tiny").onnx(Component.VAE_DECODER, attention="fused")  # what ONNX Runtime runs
    garbage = b"not an onnx graph" * 100
    entry.file(ONNX_FILE).write_bytes(garbage)
    manifest = json.loads((entry.path / MANIFEST).read_text())
    manifest["files"][ONNX_FILE] = {"size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    (entry.path / MANIFEST).write_text(json.dumps(manifest))
    assert cache.lookup(entry.key) is not None  # the checksum alone cannot tell

    backend = prepare_backend(tiny_model, BackendConfig(name="onnxruntime", engine_dir=tmp_path, threads=1))
    assert backend.name == "onnxruntime" and entry.key.name in backend.engines
    assert f"{entry.key.name} could not be loaded" in caplog.text
    assert entry.file(ONNX_FILE).read_bytes() != garbage
