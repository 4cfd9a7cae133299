"""SDXL-shaped models (as SDXL-turbo is laid out) in the live stream and the batch renderer, on a tiny
untrained one built offline: two text encoders, pooled embeddings and size ids in every UNet call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import make_canvas
from streamcanvas.batch_fallback.rendering import QualityRenderer, RenderControl, RenderRequest
from streamcanvas.pipelines.backends import BackendConfig, prepare_backend
from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.stream import CFG_TYPES, StreamParams, StreamPipeline, render_together
from streamcanvas.pipelines.tiny import make_tiny_controlnet, make_tiny_lora

SIZE = 64


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    extras = tmp_path_factory.mktemp("sdxl-extras")
    lora = make_tiny_lora(extras / "lora", tiny_sdxl_dir, seed=1)
    controlnet = make_tiny_controlnet(extras / "controlnet", tiny_sdxl_dir, seed=2)
    return load_model(ModelSpec(model=str(tiny_sdxl_dir), adapters=(("ink", str(lora)),), controlnets=(("lines", str(controlnet)),)))


def frame(model, canvas: np.ndarray | None = None, tag: int = 1, **params) -> np.ndarray:  # type: ignore[no-untyped-def]
    stream = StreamPipeline(model, SIZE, SIZE)
    stream.configure(StreamParams(**{"prompt": "a red house", **params}), img2img=True)
    return stream.render(make_canvas(SIZE, 1) if canvas is None else canvas, tag=tag).image


def test_an_sdxl_model_loads_as_sdxl_and_streams(sdxl) -> None:  # type: ignore[no-untyped-def]
    assert sdxl.architecture == "sdxl" and sdxl.describe()["architecture"] == "sdxl"
    assert sdxl.pipe.text_encoder_2 is not None and sdxl.vae_kind.startswith("AutoencoderTiny")
    base = frame(sdxl)
    assert base.shape == (SIZE, SIZE, 3) and np.array_equal(base, frame(sdxl))
    assert not np.array_equal(base, frame(sdxl, prompt="a blue sea"))
    assert not np.array_equal(base, frame(sdxl, canvas=make_canvas(SIZE, 2)))
    assert np.array_equal(frame(sdxl, prompt=[["a red house", 3]]), base)  # the pooled embedding mixes too
    for cfg_type in CFG_TYPES:
        assert frame(sdxl, cfg_type=cfg_type, guidance_scale=2.0).shape == (SIZE, SIZE, 3)


def test_sdxl_streams_batch_together_as_they_render_alone(sdxl) -> None:  # type: ignore[no-untyped-def]
    settings = [{"prompt": "x"}, {"prompt": "y", "cfg_type": "full", "guidance_scale": 2.0}, {"prompt": "z", "cfg_type": "initialize", "guidance_scale": 1.5}]

    def streams() -> list[StreamPipeline]:
        made = [StreamPipeline(sdxl, SIZE, SIZE) for _ in settings]
        for stream, params in zip(made, settings):
            stream.configure(StreamParams(**params), img2img=True)
        return made

    together, alone = streams(), streams()
    for tag in range(3):
        canvases = [make_canvas(SIZE, tag + index) for index in range(len(settings))]
        results = render_together([(stream, canvases[index], tag) for index, stream in enumerate(together)])
        for index, result in enumerate(results):
            assert np.abs(result.image.astype(int) - alone[index].render(canvases[index], tag=tag).image).max() <= 1


def test_sdxl_takes_loras_controls_and_transitions(sdxl) -> None:  # type: ignore[no-untyped-def]
    base = frame(sdxl)
    assert not np.array_equal(frame(sdxl, loras={"ink": 1.0}), base)
    assert not np.array_equal(frame(sdxl, controls=[{"model": "lines", "preprocessor": "canny"}]), base)
    assert np.array_equal(frame(sdxl, controls=[{"model": "lines", "scale": 0.0}]), base)
    stream = StreamPipeline(sdxl, SIZE, SIZE)
    stream.configure(StreamParams(prompt="a red house", transition_frames=3), img2img=True)
    canvas = make_canvas(SIZE, 1)
    stream.render(canvas, tag=1)
    stream.configure(stream.params.replace(prompt="a blue sea"), img2img=True)
    frames = 0
    while not stream.settled and frames < 10:
        stream.render(canvas, tag=1)
        frames += 1
    assert frames == 4 and np.array_equal(stream.render(canvas, tag=1).image, frame(sdxl, canvas, prompt="a blue sea"))


def test_sdxl_batch_renders(sdxl) -> None:  # type: ignore[no-untyped-def]
    renderer = QualityRenderer(sdxl)
    base = {"prompt": "a red house", "negative_prompt": "", "width": SIZE, "height": SIZE, "steps": 3, "scheduler": "euler", "guidance_scale": 3.0, "seed": 1, "batch_size": 1}

    def render(**changes: object) -> np.ndarray:
        return np.asarray(renderer.render(RenderRequest(**{**base, **changes}), lambda *_: None)[0])  # type: ignore[arg-type]

    plain = render()
    assert plain.shape == (SIZE, SIZE, 3) and np.array_equal(plain, render())
    assert np.array_equal(render(prompt=(("a red house", 1.0),)), plain)
    assert render(init_image=make_canvas(SIZE, 3), strength=0.5).shape == (SIZE, SIZE, 3)
    assert not np.array_equal(render(loras=(("ink", 1.0),)), plain)
    control = RenderControl("lines", 1.0, 0.0, 1.0, make_canvas(SIZE, 4))
    assert not np.array_equal(render(controls=(control,)), plain)


def test_sdxl_runs_compiled_on_onnxruntime(tiny_sdxl_dir: Path, sdxl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The exported SDXL UNet, ControlNet and LoRA graphs take the added conditioning (pooled text
    embedding and size ids) as inputs: streams with nothing, full CFG, a LoRA, a ControlNet, and four
    streams rendered together run wholly on ONNX Runtime and render what torch renders."""
    adapters = tuple((name, str(path)) for name, path in sdxl.adapters.paths.items())
    controlnets = tuple((name, str(path)) for name, path in sdxl.controlnets.paths.items())
    compiled = load_model(ModelSpec(model=str(tiny_sdxl_dir), adapters=adapters, controlnets=controlnets))
    compiled.backend = prepare_backend(compiled, BackendConfig(name="onnxruntime", engine_dir=tmp_path, threads=2))
    assert compiled.backend.name == "onnxruntime" and compiled.backend.takes_loras and compiled.backend.takes_controls
    torch_calls = [0]
    for module in (compiled.pipe.unet, compiled.controlnets.get("lines")):
        module.register_forward_hook(lambda *_: torch_calls.__setitem__(0, torch_calls[0] + 1))
    canvas = make_canvas(SIZE, 2)
    for params in (
        {},
        {"cfg_type": "full", "guidance_scale": 2.0, "steps": 2},
        {"loras": {"ink": 1.0}},
        {"controls": [{"model": "lines", "preprocessor": "canny"}]},
        {"prompt": "a blue sea", "loras": {"ink": 0.5}, "controls": [{"model": "lines", "scale": 0.6}]},
    ):
        stream = StreamPipeline(compiled, SIZE, SIZE)
        stream.configure(StreamParams(**{"prompt": "a red house", **params}), img2img=True)
        assert stream.backend == "onnxruntime", params
        rendered = stream.render(canvas, tag=1).image
        expected = frame(sdxl, canvas, **params)
        assert np.abs(rendered.astype(int) - expected).max() <= 3, params
    prompts = ["a red house", "a blue sea", "a green hill", "a red house"]
    streams = []
    for prompt in prompts:
        stream = StreamPipeline(compiled, SIZE, SIZE)
        stream.configure(StreamParams(prompt=prompt, steps=1, cfg_type="none"), img2img=True)
        streams.append(stream)
    together = render_together([(stream, canvas, 1) for stream in streams])
    for result, prompt in zip(together, prompts):
        expected = frame(sdxl, canvas, prompt=prompt, steps=1, cfg_type="none")
        assert np.abs(result.image.astype(int) - expected).max() <= 3, prompt
    assert torch_calls[0] == 0
    # auto measures SDXL like any model (its measurement feeds the added conditioning too).
    chosen = prepare_backend(compiled, BackendConfig(name="auto", engine_dir=tmp_path, threads=2, measure_side=SIZE))
    assert chosen.name in ("onnxruntime", "torch") and chosen.measurement is not None
