"""TensorRT engines of the tiny model: built from its exported ONNX graphs, checked against the torch
modules they replace, and served end to end by a real server process.

Every test needs a CUDA GPU and the `tensorrt` extra (`pip install -e '.[tensorrt]'`); elsewhere they
skip. Engines are float16 and built once per module for image sides 64 to 256 and UNet batches 1 to 4.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, decode_frame, make_canvas

CUDA = torch.device("cuda")
UNET_TOLERANCE = 2e-2
"""Largest |TensorRT - torch| allowed in the UNet's noise prediction (both float16)."""
DECODER_TOLERANCE = 5e-2
"""Largest |TensorRT - torch| allowed in decoded images (values in [-1, 1], both float16)."""
BUILD_TIMEOUT_S = 1200
SERVER_START_TIMEOUT_S = 900.0
"""`serve --build-engines` builds every engine before it is ready: longer than start_server's usual wait."""


def _shapes():  # type: ignore[no-untyped-def]
    from streamcanvas.trt_engines.components import ShapeRange

    return ShapeRange(min_side=64, max_side=256, opt_side=128, max_batch=4)


def _profile(pipe, component):  # type: ignore[no-untyped-def]
    return _shapes().profile(
        component, text_length=pipe.tokenizer.model_max_length, text_width=pipe.unet.config.cross_attention_dim
    )


@dataclass
class Engines:
    directory: Path
    unet: Path
    decoder: Path
    timing_cache: Path
    cache_bytes_after_decoder: int
    cache_bytes_after_unet: int
    progress: list[str]


@pytest.fixture(scope="module")
def cuda_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    return load_model(ModelSpec(model=str(tiny_model_dir), device="cuda", dtype="float16"))


@pytest.fixture(scope="module")
def engines(cuda_model, tmp_path_factory: pytest.TempPathFactory) -> Engines:  # type: ignore[no-untyped-def]
    """The VAE decoder's engine, then the UNet's, both built with one timing cache."""
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.components import Component
    from streamcanvas.trt_engines.export import export_component
    from streamcanvas.trt_engines.tensorrt_backend import build_engine

    pipe = cuda_model.pipe
    directory = tmp_path_factory.mktemp("tensorrt")
    timing_cache = directory / "timing.cache"
    export_component(pipe, Component.VAE_DECODER, directory / "vae_decoder.onnx")
    build_engine(
        directory / "vae_decoder.onnx",
        directory / "vae_decoder.plan",
        _profile(pipe, Component.VAE_DECODER),
        fp16=True,
        timing_cache=timing_cache,
    )
    after_decoder = timing_cache.stat().st_size
    progress: list[str] = []
    export_component(pipe, Component.UNET, directory / "unet.onnx")
    build_engine(
        directory / "unet.onnx",
        directory / "unet.plan",
        _profile(pipe, Component.UNET),
        fp16=True,
        timing_cache=timing_cache,
        progress=progress.append,
    )
    return Engines(
        directory=directory,
        unet=directory / "unet.plan",
        decoder=directory / "vae_decoder.plan",
        timing_cache=timing_cache,
        cache_bytes_after_decoder=after_decoder,
        cache_bytes_after_unet=timing_cache.stat().st_size,
        progress=progress,
    )


def _prompt_states(pipe, batch: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    prompts = ["a red house", "a cat in a forest", "a boat on a lake", "the moon at night"][:batch]
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(CUDA)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _unet_feeds(pipe, batch: int, side: int, seed: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    generator = torch.Generator(device=CUDA).manual_seed(seed)
    latent = side // 8
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=generator, device=CUDA, dtype=torch.float16),
        "timestep": torch.linspace(999, 100, batch, device=CUDA).to(torch.int64),
        "encoder_hidden_states": _prompt_states(pipe, batch),
    }


def _max_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all()
    return (got.float() - expected.float()).abs().max().item()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_unet_engine_matches_the_torch_unet(cuda_model, engines: Engines) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import TensorRTRunner

    pipe = cuda_model.pipe
    runner = TensorRTRunner(engines.unet, CUDA)
    # The profile's corners and its optimum: every one is a different shape for the same engine.
    for batch, side in [(1, 64), (2, 128), (4, 256), (3, 96)]:
        feeds = _unet_feeds(pipe, batch, side, seed=batch)
        with torch.no_grad():
            expected = pipe.unet(
                feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"], return_dict=False
            )[0]
        got = runner(feeds, expected.shape, torch.float16)
        assert _max_difference(got, expected) <= UNET_TOLERANCE, f"batch {batch}, side {side}"


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_decoder_engine_matches_the_torch_vae(cuda_model, engines: Engines) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import TensorRTRunner

    pipe = cuda_model.pipe
    runner = TensorRTRunner(engines.decoder, CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(7)
    for side in (64, 128, 256):
        latents = torch.randn(1, 4, side // 8, side // 8, generator=generator, device=CUDA, dtype=torch.float16)
        with torch.no_grad():
            expected = pipe.vae.decode(latents, return_dict=False)[0]
        got = runner({"latents": latents}, expected.shape, torch.float16)
        assert _max_difference(got, expected) <= DECODER_TOLERANCE, f"side {side}"
        # A caller asking for float32 gets float32 (the engine itself computes in float16).
        assert runner({"latents": latents}, expected.shape, torch.float32).dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_shapes_outside_the_profile_are_refused(cuda_model, engines: Engines) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import TensorRTRunner

    pipe = cuda_model.pipe
    unet = TensorRTRunner(engines.unet, CUDA)
    too_many = _unet_feeds(pipe, 4, 128, seed=0)
    too_many = {name: torch.cat([tensor, tensor[:1]]) for name, tensor in too_many.items()}  # batch 5 > 4
    with pytest.raises(ValueError, match=r"has shape \(5,.*outside the range"):
        unet(too_many, (5, 4, 16, 16), torch.float16)

    decoder = TensorRTRunner(engines.decoder, CUDA)
    too_large = torch.zeros(1, 4, 34, 34, device=CUDA, dtype=torch.float16)  # 272 pixels > 256
    with pytest.raises(ValueError, match=r"'latents' has shape \(1, 4, 34, 34\), outside the range"):
        decoder({"latents": too_large}, (1, 3, 272, 272), torch.float16)
    too_small = torch.zeros(1, 4, 4, 4, device=CUDA, dtype=torch.float16)  # 32 pixels < 64
    with pytest.raises(ValueError, match="outside the range"):
        decoder({"latents": too_small}, (1, 3, 32, 32), torch.float16)
    with pytest.raises(ValueError, match="needs input 'latents'"):
        decoder({}, (1, 3, 64, 64), torch.float16)
    # Refused calls leave the runner usable.
    assert decoder({"latents": too_large[:, :, :8, :8]}, (1, 3, 64, 64), torch.float16).shape == (1, 3, 64, 64)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cuda_graphs_replay_with_each_call_s_inputs(cuda_model, engines: Engines) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import TensorRTRunner

    pipe = cuda_model.pipe
    plain = TensorRTRunner(engines.unet, CUDA)
    graphed = TensorRTRunner(engines.unet, CUDA, cuda_graphs=True)
    outputs = []
    for seed in range(3):  # the first call of each shape captures, the others replay
        for batch, side in [(2, 128), (1, 64)]:
            feeds = _unet_feeds(pipe, batch, side, seed=seed)
            shape = feeds["sample"].shape
            expected = plain(feeds, shape, torch.float16)
            got = graphed(feeds, shape, torch.float16)
            torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
            outputs.append(got)
    assert not torch.equal(outputs[0], outputs[2]), "a replay must use the new call's inputs"
    assert outputs[2].data_ptr() != outputs[0].data_ptr(), "callers get their own output tensors"


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_one_runner_serves_several_threads(cuda_model, engines: Engines, cuda_graphs: bool) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import TensorRTRunner

    pipe = cuda_model.pipe
    runner = TensorRTRunner(engines.unet, CUDA, cuda_graphs=cuda_graphs)
    cases = [_unet_feeds(pipe, 1 + index % 2, 64 if index % 2 else 128, seed=index) for index in range(8)]
    alone = [runner(feeds, feeds["sample"].shape, torch.float16) for feeds in cases]

    def on_its_own_stream(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream(CUDA)
        stream.wait_stream(torch.cuda.current_stream(CUDA))
        with torch.cuda.stream(stream):
            result = runner(feeds, feeds["sample"].shape, torch.float16)
        stream.synchronize()
        return result

    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(on_its_own_stream, cases * 3))
    for index, result in enumerate(together):
        torch.testing.assert_close(result, alone[index % len(cases)], atol=1e-3, rtol=0)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_builds_keep_and_reuse_the_timing_cache(cuda_model, engines: Engines, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.components import Component
    from streamcanvas.trt_engines.tensorrt_backend import build_engine

    assert engines.timing_cache.is_file() and engines.cache_bytes_after_decoder > 0
    assert not list(engines.directory.glob(".timing.cache.*")), "no temporary file is left beside the cache"
    # The UNet build started from the decoder's timings and wrote them back with its own: its cache
    # holds more than the same build starting from nothing.
    fresh = tmp_path / "fresh.cache"
    build_engine(engines.directory / "unet.onnx", tmp_path / "unet.plan", _profile(cuda_model.pipe, Component.UNET), fp16=True, timing_cache=fresh)
    assert fresh.is_file()
    assert engines.cache_bytes_after_unet > fresh.stat().st_size

    # A cache TensorRT cannot use is replaced by a new one rather than failing the build.
    unusable = tmp_path / "unusable.cache"
    unusable.write_bytes(b"not a timing cache")
    build_engine(
        engines.directory / "vae_decoder.onnx",
        tmp_path / "vae_decoder.plan",
        _profile(cuda_model.pipe, Component.VAE_DECODER),
        fp16=True,
        timing_cache=unusable,
    )
    assert unusable.read_bytes() != b"not a timing cache" and unusable.stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_builds_report_progress(engines: Engines) -> None:
    pytest.importorskip("tensorrt")
    assert engines.progress, "TensorRT reported no build phase"
    assert all(re.fullmatch(r".+ \d+/(\d+|\?)", line) for line in engines.progress), engines.progress[:10]


@pytest.mark.cuda
def test_unusable_files_are_typed_errors(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import EngineBuildError, TensorRTRunner, build_engine

    plan = tmp_path / "garbage.plan"
    plan.write_bytes(b"this is not a TensorRT plan")
    with pytest.raises(EngineBuildError, match="cannot be deserialized"):
        TensorRTRunner(plan, CUDA)
    graph = tmp_path / "garbage.onnx"
    graph.write_bytes(b"this is not an ONNX graph")
    with pytest.raises(EngineBuildError, match="cannot parse"):
        build_engine(graph, tmp_path / "never.plan", {}, fp16=True, timing_cache=None)
    assert not (tmp_path / "never.plan").exists()


@pytest.mark.cuda
def test_environment_names_the_gpu_and_versions() -> None:
    trt = pytest.importorskip("tensorrt")
    from streamcanvas.trt_engines.tensorrt_backend import tensorrt_environment, tensorrt_unavailable_reason

    assert tensorrt_unavailable_reason(CUDA) is None
    assert tensorrt_unavailable_reason(torch.device("cpu")) == "device cpu is not a CUDA device"
    environment = tensorrt_environment(CUDA)
    assert environment["tensorrt"] == trt.__version__
    assert environment["gpu"] == torch.cuda.get_device_name(CUDA)
    assert re.fullmatch(r"\d+\.\d+", environment["compute_capability"])
    assert environment["cuda"] == torch.version.cuda


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + SERVER_START_TIMEOUT_S)
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["launches", "cuda-graphs"])
async def test_a_server_streams_frames_with_tensorrt(
    cache_dir: Path, artifacts_dir: Path, cuda_graphs: bool
) -> None:
    pytest.importorskip("tensorrt")
    options = ["--backend", "tensorrt", "--build-engines", "--device", "cuda", *(["--cuda-graphs"] if cuda_graphs else [])]
    # The second server finds the first one's engines in the shared cache and builds nothing.
    name = "tensorrt-graphs" if cuda_graphs else "tensorrt"
    server = start_server(cache_dir, artifacts_dir, name, *options, timeout=SERVER_START_TIMEOUT_S)
    try:
        info = server.info()
        assert info["backend"]["name"] == "tensorrt", info["backend"]
        async with Client.connect(server.ws_url) as client:
            await client.hello(params={"prompt": "a red house"})
            first = decode_frame(await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, 1))))
            assert first.shape == (TEST_RESOLUTION, TEST_RESOLUTION, 3)
            second = decode_frame(await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, 2))))
            assert second.shape == first.shape
            assert (first != second).any(), "frames must follow the canvas"
    finally:
        server.stop()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_an_sdxl_model_streams_on_tensorrt_engines(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """The SDXL UNet's engine takes the added conditioning (pooled text embedding, size ids) as inputs of
    its profile: a stream renders on the engines what it renders on torch, up to float16 rounding."""
    pytest.importorskip("tensorrt")
    import numpy as np

    from streamcanvas.pipelines.backends import BackendConfig, prepare_backend
    from streamcanvas.pipelines.loading import ModelSpec, load_model
    from streamcanvas.pipelines.stream import StreamParams, StreamPipeline

    spec = ModelSpec(model=str(tiny_sdxl_dir), device="cuda", dtype="float16")
    eager, compiled = load_model(spec), load_model(spec)
    compiled.backend = prepare_backend(compiled, BackendConfig(name="tensorrt", engine_dir=tmp_path, build_engines=True, shapes=_shapes()))
    canvas = make_canvas(128, 3)
    images = []
    for model in (compiled, eager):
        stream = StreamPipeline(model, 128, 128)
        stream.configure(StreamParams(prompt="a red house", steps=2), img2img=True)
        images.append(stream.render(canvas, tag=1).image.astype(int))
        assert stream.backend == model.backend.name
    assert np.abs(images[0] - images[1]).mean() <= 2.0


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_controlnets_and_loras_run_on_tensorrt_engines(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With a ControlNet and a named LoRA loaded, `--build-engines` also builds the controlled UNet, the
    ControlNet (several outputs: its residuals) and the UNet with the LoRA-touched weights as inputs:
    streams with controls, a LoRA or both run wholly on the engines and render what torch renders, up to
    float16 rounding."""
    pytest.importorskip("tensorrt")
    import numpy as np

    from streamcanvas.pipelines.backends import BackendConfig, prepare_backend
    from streamcanvas.pipelines.loading import ModelSpec, load_model
    from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
    from streamcanvas.pipelines.tiny import make_tiny_controlnet, make_tiny_lora

    lora = make_tiny_lora(tmp_path / "lora", tiny_model_dir, seed=1)
    net = make_tiny_controlnet(tmp_path / "controlnet", tiny_model_dir, seed=2)
    spec = ModelSpec(model=str(tiny_model_dir), device="cuda", dtype="float16", adapters=(("ink", str(lora)),), controlnets=(("lines", str(net)),))
    eager, compiled = load_model(spec), load_model(spec)
    compiled.backend = prepare_backend(
        compiled, BackendConfig(name="tensorrt", engine_dir=tmp_path / "engines", build_engines=True, shapes=_shapes())
    )
    assert compiled.backend.takes_loras and compiled.backend.takes_controls
    canvas = make_canvas(128, 3)
    for params in ({"controls": [{"model": "lines", "preprocessor": "canny"}]}, {"loras": {"ink": 1.0}}, {"loras": {"ink": 0.5}, "controls": [{"model": "lines"}]}):
        images = []
        for model in (compiled, eager):
            stream = StreamPipeline(model, 128, 128)
            stream.configure(StreamParams(prompt="a red house", steps=2, **params), img2img=True)
            assert stream.backend == model.backend.name, params
            images.append(stream.render(canvas, tag=1).image.astype(int))
        assert np.abs(images[0] - images[1]).mean() <= 2.0, params
