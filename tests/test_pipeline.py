"""The per-session StreamDiffusion pipeline on the tiny real model (saved, then loaded back)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streamcanvas.pipelines.backends import Backend
from streamcanvas.pipelines.errors import InvalidParameter
from streamcanvas.pipelines.stream import CFG_TYPES, RenderResult, StreamParams, StreamPipeline, render_together

from streamcanvas.trt_engines.components import Component, ShapeRange

from helpers import make_canvas

SIZE = 128


def stream(model, **params) -> StreamPipeline:  # type: ignore[no-untyped-def]
    pipeline = StreamPipeline(model, SIZE, SIZE)
    pipeline.configure(StreamParams(**params), img2img=True)
    return pipeline


def test_frames_are_images_of_the_session_size(tiny_model) -> None:  # type: ignore[no-untyped-def]
    result = stream(tiny_model, prompt="a cat").render(make_canvas(SIZE, 1), tag=1)
    assert result.image.shape == (SIZE, SIZE, 3) and result.image.dtype == np.uint8
    assert result.answers == 1 and result.inference_ms > 0
    assert result.image.std() > 0, "a flat frame means nothing was decoded"


def test_same_inputs_same_frames_and_each_input_matters(tiny_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 1)
    base = stream(tiny_model, prompt="a cat", seed=3).render(canvas).image
    assert np.array_equal(base, stream(tiny_model, prompt="a cat", seed=3).render(canvas).image)
    assert not np.array_equal(base, stream(tiny_model, prompt="a dog", seed=3).render(canvas).image)
    assert not np.array_equal(base, stream(tiny_model, prompt="a cat", seed=4).render(canvas).image)
    assert not np.array_equal(base, stream(tiny_model, prompt="a cat", seed=3).render(make_canvas(SIZE, 2)).image)


def test_sessions_do_not_share_stream_state(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Interleaving two sessions' frames gives each exactly what it gets alone (cf. upstream #171)."""
    canvases_a = [make_canvas(SIZE, seed) for seed in (1, 2, 3)]
    canvases_b = [make_canvas(SIZE, seed) for seed in (7, 8, 9)]
    alone_a = [frame.image for frame in map(stream(tiny_model, prompt="a").render, canvases_a)]
    alone_b = [frame.image for frame in map(stream(tiny_model, prompt="b").render, canvases_b)]
    a, b = stream(tiny_model, prompt="a"), stream(tiny_model, prompt="b")
    for index in range(3):
        assert np.array_equal(a.render(canvases_a[index]).image, alone_a[index])
        assert np.array_equal(b.render(canvases_b[index]).image, alone_b[index])


def test_first_frame_is_not_decoded_from_an_empty_stream_batch(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The first frame equals the steady state of the same input, not a frame from zero latents."""
    canvas = make_canvas(SIZE, 5)
    pipeline = stream(tiny_model, prompt="a house", steps=3)
    assert pipeline.depth == 3
    first = pipeline.render(canvas, tag=1).image
    steady = [pipeline.render(canvas, tag=1).image for _ in range(4)]
    assert all(np.array_equal(first, frame) for frame in steady)
    # What upstream StreamDiffusion returns for that first call: the stream batch still holds zeros.
    raw = stream(tiny_model, prompt="a house", steps=3)._stream
    pixels = torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
    with torch.no_grad():
        unprimed = raw.decode_image(raw.predict_x0_batch(raw.encode_image(pixels)))
    unprimed = ((unprimed[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert not np.array_equal(first, unprimed)


def test_stream_batch_answers_inputs_in_order(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipeline = stream(tiny_model, prompt="x", steps=2)
    canvases = [make_canvas(SIZE, seed) for seed in range(4)]
    answers = [pipeline.render(canvases[0], tag=10).answers]
    answers += [pipeline.render(canvas, tag=11 + index).answers for index, canvas in enumerate(canvases[1:])]
    assert answers == [10, 10, 11, 12]  # continuous input: each frame finishes the previous input
    assert not pipeline.settled
    assert pipeline.render(canvases[-1], tag=13).answers == 13 and pipeline.settled


def test_after_an_idle_spell_one_frame_shows_a_new_input(tiny_model) -> None:  # type: ignore[no-untyped-def]
    canvas_a, canvas_b = make_canvas(SIZE, 1), make_canvas(SIZE, 2)
    pipeline = stream(tiny_model, prompt="x", steps=3)
    pipeline.render(canvas_a, tag=1)
    refilled = pipeline.render(canvas_b, tag=2, refill=True)
    assert refilled.answers == 2 and pipeline.settled
    # The same frame the stream reaches by flushing input 2 through the batch frame by frame.
    flushing = stream(tiny_model, prompt="x", steps=3)
    flushing.render(canvas_a, tag=1)
    flushed = [flushing.render(canvas_b, tag=2) for _ in range(3)]
    assert [frame.answers for frame in flushed] == [1, 1, 2]
    assert np.array_equal(flushed[-1].image, refilled.image)


def test_prompt_is_encoded_only_when_it_changes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipeline = stream(tiny_model, prompt="a boat")
    model_objects = (id(tiny_model.pipe.unet), id(tiny_model.pipe.vae))
    for changes in ({"strength": 0.8}, {"steps": 3}, {"seed": 9}, {"guidance_scale": 2.0}, {"cfg_type": "full"}):
        pipeline.configure(pipeline.params.replace(**changes), img2img=True)
        pipeline.render(make_canvas(SIZE, 1))
    assert pipeline.prompt_encodings == 1
    pipeline.configure(pipeline.params.replace(prompt="a ship"), img2img=True)
    assert pipeline.prompt_encodings == 2
    assert (id(tiny_model.pipe.unet), id(tiny_model.pipe.vae)) == model_objects


def test_strength_maps_to_denoising_steps() -> None:
    assert StreamParams(strength=0.36, steps=2).t_index_list(img2img=True) == [32, 41]
    assert StreamParams(strength=1.0, steps=4).t_index_list(img2img=True) == [0, 12, 25, 37]
    assert StreamParams(strength=0.5, steps=1).t_index_list(img2img=True) == [25]
    assert StreamParams(strength=0.2, steps=4).t_index_list(img2img=False)[0] == 0  # txt2img starts from noise


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
@pytest.mark.parametrize("denoising_batch", [True, False])
def test_every_cfg_mode_renders(tiny_model, cfg_type: str, denoising_batch: bool) -> None:  # type: ignore[no-untyped-def]
    if cfg_type == "full" and not denoising_batch:
        with pytest.raises(InvalidParameter, match="denoising_batch"):
            StreamParams(cfg_type=cfg_type, denoising_batch=denoising_batch)
        return
    pipeline = stream(tiny_model, prompt="x", cfg_type=cfg_type, guidance_scale=1.5, denoising_batch=denoising_batch)
    assert pipeline.render(make_canvas(SIZE, 2)).image.shape == (SIZE, SIZE, 3)


def test_guidance_changes_the_frame(tiny_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 2)
    low = stream(tiny_model, prompt="x", cfg_type="full", guidance_scale=1.0).render(canvas).image
    high = stream(tiny_model, prompt="x", cfg_type="full", guidance_scale=3.0).render(canvas).image
    assert not np.array_equal(low, high)


def test_txt2img(tiny_model) -> None:  # type: ignore[no-untyped-def]
    def render(prompt: str) -> np.ndarray:
        pipeline = StreamPipeline(tiny_model, SIZE, SIZE)
        pipeline.configure(StreamParams(prompt=prompt), img2img=False)
        return pipeline.render(None).image

    assert np.array_equal(render("a sun"), render("a sun"))
    assert not np.array_equal(render("a sun"), render("a moon"))


def test_similar_image_filter_skips_repeated_input(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipeline = stream(tiny_model, prompt="x", similar_filter=True, similar_threshold=0.5)
    canvas = make_canvas(SIZE, 3)
    results = [pipeline.render(canvas, tag=index) for index in range(6)]
    assert results[0].image is not None
    assert any(result.image is None for result in results[1:])


def test_new_parameters_pass_the_similar_image_filter(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """A still canvas shows a new prompt or seed at once: the filter compares inputs, and the same input
    under new parameters is a new frame (it used to be skipped, so the change never showed)."""
    canvas = make_canvas(SIZE, 3)
    params = StreamParams(prompt="x", similar_filter=True, similar_threshold=0.5)
    pipeline = StreamPipeline(tiny_model, SIZE, SIZE)
    pipeline.configure(params, img2img=True)
    first = pipeline.render(canvas, tag=1).image
    assert first is not None and pipeline.render(canvas, tag=2).image is None  # identical: always skipped
    for tag, changes in enumerate([{"prompt": "y"}, {"seed": 9}, {"guidance_scale": 1.5, "cfg_type": "self"}], start=3):
        params = params.replace(**changes)
        pipeline.configure(params, img2img=True)
        frame = pipeline.render(canvas, tag=tag).image
        assert frame is not None, changes
        assert not np.array_equal(frame, first), changes
        first = frame
    pipeline.configure(params.replace(similar_threshold=0.6), img2img=True)  # the filter's own setting: no new frame
    assert pipeline.render(canvas, tag=10).image is None


def test_the_similar_image_filter_lets_an_input_it_took_be_fully_shown(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """With two steps an input takes two frames; the second renders the same input again and must not
    be skipped as "similar", or the input would never be fully shown (nor answered)."""
    pipeline = stream(tiny_model, prompt="x", steps=2, similar_filter=True, similar_threshold=0.7)  # these canvases: 0.59
    assert pipeline.depth == 2
    pipeline.render(make_canvas(SIZE, 1), tag=1)
    assert pipeline.settled
    pipelined = pipeline.render(make_canvas(SIZE, 2), tag=2)
    assert pipelined.image is not None and pipelined.answers == 1 and not pipeline.settled
    flushed = pipeline.render(make_canvas(SIZE, 2), tag=2)
    assert flushed.image is not None and flushed.answers == 2 and pipeline.settled


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"steps": 0}, "steps"),
        ({"steps": 5}, "steps"),
        ({"seed": 2**32}, "seed"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"cfg_type": "half"}, "cfg_type"),
        ({"similar_threshold": 2.0}, "similar_threshold"),
        ({"prompt": "x" * 3000}, "prompt"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_parameters(changes: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as raised:
        StreamParams().replace(**changes)
    assert raised.value.field == field


def test_render_checks_its_input(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipeline = stream(tiny_model)
    with pytest.raises(InvalidParameter):
        pipeline.render(np.zeros((SIZE, SIZE + 8, 3), np.uint8))
    with pytest.raises(InvalidParameter):
        pipeline.render(None)
    with pytest.raises(InvalidParameter):
        StreamPipeline(tiny_model, 100, 100)


# --- several sessions' frames in one UNet call ---------------------------------------------------------

TOGETHER = [  # four sessions that differ in everything a session may set
    {"prompt": "a red house", "seed": 1, "strength": 0.5, "steps": 2, "cfg_type": "self", "guidance_scale": 1.4},
    {"prompt": "a blue boat", "seed": 2, "strength": 0.6, "steps": 3, "cfg_type": "full", "guidance_scale": 1.8},
    {"prompt": "a green tree", "seed": 3, "strength": 0.4, "steps": 1, "cfg_type": "none"},
    {"prompt": "a dark sky", "seed": 4, "strength": 0.5, "steps": 2, "cfg_type": "initialize", "guidance_scale": 1.5},
]


def test_streams_rendered_together_match_each_rendered_alone(toy_model) -> None:  # type: ignore[no-untyped-def]
    """Stacked into one UNet call and one VAE decode, every stream still renders its own frames: those
    it renders alone, up to float rounding (the batch changes the order of the sums), for frame after
    frame, while each keeps its own stream batch, noise, prompt and CFG mode."""
    canvases = [[make_canvas(SIZE, 10 * session + frame) for frame in range(4)] for session in range(len(TOGETHER))]
    alone = []
    for params, inputs in zip(TOGETHER, canvases):
        pipeline = stream(toy_model, **params)
        alone.append([pipeline.render(canvas, tag=tag).image for tag, canvas in enumerate(inputs)])
    batched = [stream(toy_model, **params) for params in TOGETHER]
    assert all(pipeline.batchable for pipeline in batched)
    for frame in range(4):
        results = render_together([(pipeline, canvases[index][frame], frame, False) for index, pipeline in enumerate(batched)])
        for index, result in enumerate(results):
            assert isinstance(result, RenderResult), result
            assert result.answers == max(0, frame - batched[index].depth + 1)
            difference = np.abs(result.image.astype(int) - alone[index][frame].astype(int))
            assert difference.max() <= 1 and difference.mean() < 0.01, (index, frame, difference.max(), difference.mean())
    # ...and the frames are each session's own: a mix-up of prompts or canvases would be far off.
    for index in range(1, len(TOGETHER)):
        assert np.abs(alone[index][-1].astype(int) - alone[0][-1].astype(int)).mean() > 5


def test_one_streams_bad_input_fails_only_its_frame(toy_model) -> None:  # type: ignore[no-untyped-def]
    good, bad = stream(toy_model, prompt="a red house"), stream(toy_model, prompt="a blue boat")
    results = render_together([(good, make_canvas(SIZE, 1), 1, False), (bad, make_canvas(SIZE // 2, 1), 1, False)])
    assert isinstance(results[0], RenderResult) and results[0].image.shape == (SIZE, SIZE, 3)
    assert isinstance(results[1], InvalidParameter) and results[1].field == "image"
    alone = stream(toy_model, prompt="a red house").render(make_canvas(SIZE, 1)).image
    assert np.abs(results[0].image.astype(int) - alone.astype(int)).max() <= 2


def test_only_compatible_streams_render_together(toy_model) -> None:  # type: ignore[no-untyped-def]
    small = StreamPipeline(toy_model, 64, 64)
    small.configure(StreamParams(prompt="x"), img2img=True)
    with pytest.raises(ValueError, match="share a model, a size"):
        render_together([(stream(toy_model, prompt="x"), make_canvas(SIZE, 1), 1, False), (small, make_canvas(64, 1), 1, False)])
    same = stream(toy_model, prompt="x")
    with pytest.raises(ValueError, match="only once"):
        render_together([(same, make_canvas(SIZE, 1), 1, False), (same, make_canvas(SIZE, 2), 2, False)])
    sequential = stream(toy_model, prompt="x", denoising_batch=False)
    assert not sequential.batchable
    with pytest.raises(RuntimeError, match="denoising batch"):
        sequential.begin(make_canvas(SIZE, 1))


def test_a_backend_with_a_batch_range_gets_calls_that_fit_it(toy_model) -> None:  # type: ignore[no-untyped-def]
    """TensorRT engines accept UNet batches up to their profile's max: a larger group is cut into calls
    that fit. The model's own torch modules stand in for the engines here (same call signature), with
    a range of 3: four two-row streams become four calls, their frames still each stream's own."""
    calls: list[int] = []

    class CountingUNet:
        def __init__(self, unet) -> None:  # type: ignore[no-untyped-def]
            self.unet = unet

        def __call__(self, sample, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(sample.shape[0])
            return self.unet(sample, *args, **kwargs)

    backend = Backend(
        name="ranged", requested="test", reason="test", unet=CountingUNet(toy_model.pipe.unet), vae=toy_model.pipe.vae,
        shapes=ShapeRange(min_side=64, opt_side=SIZE, max_side=SIZE, max_batch=3),
    )  # fmt: skip
    ranged = dataclasses.replace(toy_model, backend=backend)
    params = [{"prompt": f"a red house {index}", "seed": index, "steps": 2} for index in range(4)]
    alone = [stream(toy_model, **p).render(make_canvas(SIZE, 1)).image for p in params]
    streams = [stream(ranged, **p) for p in params]
    calls.clear()
    results = render_together([(pipeline, make_canvas(SIZE, 1), 1, False) for pipeline in streams])
    assert calls == [2, 2, 2, 2] * 2  # the priming step, then the frame's step: never more than 3 rows
    for result, expected in zip(results, alone):
        assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
    assert ShapeRange(max_batch=4).profile(Component.VAE_DECODER)["latents"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
