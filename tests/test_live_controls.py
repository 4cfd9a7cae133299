"""Live controls in the stream itself: ControlNets, LoRA adapters, weighted prompts, transitions, seed
blending, latent feedback, preprocessors and style presets, on the trained toy model with LoRAs and
ControlNets built offline (conftest's `controlled_model`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from helpers import make_canvas
from streamcanvas.pipelines.controls import ControlSpec, preprocess
from streamcanvas.pipelines.errors import InvalidParameter, ModelLoadError, UnknownName
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline, encode_prompts, render_together
from streamcanvas.pipelines.styles import apply_style, load_styles

SIZE = 64
SCRIBBLE = {"model": "scribble", "scale": 1.0, "preprocessor": "scribble"}


def stream(model, **params) -> StreamPipeline:  # type: ignore[no-untyped-def]
    pipeline = StreamPipeline(model, SIZE, SIZE)
    params.setdefault("prompt", "a red house")
    pipeline.configure(StreamParams(**params), img2img=True)
    return pipeline


def in_threads_together(count: int, work: Callable[[int, threading.Barrier], None]) -> list[BaseException]:
    """Run `work(index, barrier)` on `count` threads at once (they meet at the barrier as they choose);
    what they raised."""
    errors: list[BaseException] = []
    together = threading.Barrier(count, timeout=60)

    def run(index: int) -> None:
        try:
            work(index, together)
        except BaseException as error:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def frame(model, canvas: np.ndarray | None = None, layer: np.ndarray | None = None, **params) -> np.ndarray:  # type: ignore[no-untyped-def]
    return stream(model, **params).render(make_canvas(SIZE, 1) if canvas is None else canvas, tag=1, layer=layer).image


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def lines(size: int, seed: int) -> np.ndarray:
    """A line drawing: white strokes on black, as a control layer."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        draw.line([tuple(rng.integers(0, size, 2)) for _ in range(3)], fill="white", width=3)
    return np.asarray(image).copy()


# ControlNet ----------------------------------------------------------------------------------------


def test_a_controlnet_changes_the_frame_and_scale_0_is_none(controlled_model) -> None:  # type: ignore[no-untyped-def]
    plain = frame(controlled_model)
    controlled = frame(controlled_model, controls=[SCRIBBLE])
    assert difference(plain, controlled) > 2
    assert np.array_equal(frame(controlled_model, controls=[{**SCRIBBLE, "scale": 0.0}]), plain)
    half = frame(controlled_model, controls=[{**SCRIBBLE, "scale": 0.5}])
    assert 0 < difference(plain, half) < difference(plain, controlled)


def test_start_and_end_choose_the_steps_a_control_applies_to(controlled_model) -> None:  # type: ignore[no-untyped-def]
    # Two steps: [0, 0.5) is the first, [0.5, 1] the second.
    assert ControlSpec("x", start=0.0, end=0.5).keeps(2) == [True, False]
    assert ControlSpec("x", start=0.5, end=1.0).keeps(2) == [False, True]
    plain = frame(controlled_model, steps=2)
    everywhere = frame(controlled_model, steps=2, controls=[SCRIBBLE])
    nowhere = frame(controlled_model, steps=2, controls=[{**SCRIBBLE, "start": 0.1, "end": 0.4}])
    first = frame(controlled_model, steps=2, controls=[{**SCRIBBLE, "end": 0.5}])
    assert np.array_equal(nowhere, plain)
    assert difference(first, plain) > 0.5 and difference(first, everywhere) > 0.5


def test_a_control_layer_steers_the_frame_and_its_absence_is_no_control(controlled_model) -> None:  # type: ignore[no-untyped-def]
    control = {**SCRIBBLE, "source": "layer", "preprocessor": "none"}
    plain = frame(controlled_model)
    assert np.array_equal(frame(controlled_model, controls=[control]), plain)  # no layer sent yet
    first = frame(controlled_model, layer=lines(SIZE, 1), controls=[control])
    second = frame(controlled_model, layer=lines(SIZE, 2), controls=[control])
    assert difference(first, plain) > 1 and difference(first, second) > 1


def test_two_controlnets_add_up_and_each_session_keeps_its_own(controlled_model) -> None:  # type: ignore[no-untyped-def]
    edges = {"model": "edges", "preprocessor": "canny"}
    one = frame(controlled_model, controls=[SCRIBBLE])
    both = frame(controlled_model, controls=[SCRIBBLE, edges])
    assert difference(one, both) > 1
    # Batched together, each stream's frame is what it renders alone, control images and scales included.
    canvases = [make_canvas(SIZE, 1), make_canvas(SIZE, 2)]
    together = [stream(controlled_model, controls=[SCRIBBLE, edges]), stream(controlled_model, controls=[{**SCRIBBLE, "scale": 0.3}, edges])]
    alone = [stream(controlled_model, controls=[SCRIBBLE, edges]), stream(controlled_model, controls=[{**SCRIBBLE, "scale": 0.3}, edges])]
    for tag in range(3):
        results = render_together([(pipeline, canvases[index], tag) for index, pipeline in enumerate(together)])
        for index, result in enumerate(results):
            expected = alone[index].render(canvases[index], tag=tag).image
            assert np.abs(result.image.astype(int) - expected).max() <= 1


def test_unknown_controlnets_and_bad_controls_are_typed_errors(controlled_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownName, match="scribble, edges"):
        stream(controlled_model, controls=[{"model": "depth"}])
    for bad in ([{"scale": 1}], [{"model": "scribble", "scale": 3}], [{"model": "scribble", "start": 0.6, "end": 0.5}],
                [{"model": "scribble", "preprocessor": "hed"}], [{"model": "scribble", "colour": 1}], ["scribble"], [{}] * 5):
        with pytest.raises(InvalidParameter):
            StreamParams(controls=bad)


def test_preprocessors_draw_white_edges_on_black() -> None:
    canvas = np.full((SIZE, SIZE, 3), 255, np.uint8)
    canvas[16:48, 16:48] = (200, 30, 30)
    for name in ("canny", "scribble"):
        edges = preprocess(canvas, name)  # type: ignore[arg-type]
        assert edges.shape == canvas.shape and edges.dtype == np.uint8
        assert edges[32, 32].max() == 0 and edges[2, 2].max() == 0  # inside and outside the square: black
        assert edges[16, 16:48].max() == 255 or edges[15, 16:48].max() == 255  # its border: white
    assert (preprocess(canvas, "scribble") > 0).sum() > (preprocess(canvas, "canny") > 0).sum()  # thicker
    assert preprocess(canvas, "none") is canvas


def test_the_depth_preprocessor_runs_the_depth_network(controlled_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 3)
    depth = preprocess(canvas, "depth", controlled_model.depth)
    assert depth.shape == canvas.shape and depth.dtype == np.uint8 and (depth.min(), depth.max()) == (0, 255)
    assert np.array_equal(depth[:, :, 0], depth[:, :, 2]) and np.array_equal(depth, preprocess(canvas, "depth", controlled_model.depth))
    assert not np.array_equal(depth, preprocess(make_canvas(SIZE, 4), "depth", controlled_model.depth))
    control = {"model": "scribble", "preprocessor": "depth"}
    assert difference(frame(controlled_model, canvas, controls=[control]), frame(controlled_model, canvas)) > 1
    with pytest.raises(UnknownName, match="--depth-model"):
        preprocess(canvas, "depth")


# LoRA adapters -------------------------------------------------------------------------------------


def test_loras_are_chosen_per_stream_with_weights(controlled_model) -> None:  # type: ignore[no-untyped-def]
    plain = frame(controlled_model)
    ink = frame(controlled_model, loras={"ink": 1.0})
    assert difference(plain, ink) > 1
    assert np.array_equal(frame(controlled_model, loras={"ink": 0.0}), plain)
    weaker = frame(controlled_model, loras={"ink": 0.5})
    assert 0 < difference(plain, weaker) < difference(plain, ink)
    assert difference(frame(controlled_model, loras={"ink": 1.0, "glow": 1.0}), ink) > 1
    with pytest.raises(UnknownName, match="ink, glow"):
        stream(controlled_model, loras={"sepia": 1.0})


def test_a_lora_switched_off_live_leaves_nothing_behind(controlled_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 3)
    # One step and no residual CFG: each frame depends on its input alone, not on the frames before.
    pipeline = stream(controlled_model, steps=1, cfg_type="none")
    before = pipeline.render(canvas, tag=1).image
    pipeline.configure(pipeline.params.replace(loras={"glow": 1.0}), img2img=True)
    assert difference(pipeline.render(canvas, tag=2).image, before) > 1
    pipeline.configure(pipeline.params.replace(loras={}), img2img=True)
    assert np.array_equal(pipeline.render(canvas, tag=3).image, before)


def test_threads_with_different_loras_never_see_each_others_weights(controlled_model) -> None:  # type: ignore[no-untyped-def]
    """Three workers share one UNet: one with `ink`, one with `glow`, one with none. They build their
    streams and render at the same moments (a barrier), so every UNet call may switch the shared
    adapters to another thread's wish; every frame is still that worker's frame rendered on its own."""
    wanted = [{"ink": 1.0}, {"glow": 0.8}, {}]
    canvas = make_canvas(SIZE, 4)
    expected = [frame(controlled_model, canvas, loras=loras, steps=1, cfg_type="none") for loras in wanted]
    mismatches: list[int] = []

    def work(index: int, together: threading.Barrier) -> None:
        together.wait()
        pipeline = stream(controlled_model, loras=wanted[index], steps=1, cfg_type="none")
        for tag in range(6):
            together.wait()
            image = pipeline.render(canvas, tag=tag).image
            # Up to a grey level or two of float rounding: OpenMP may give a busy thread fewer
            # threads than the main one had (another order of sums). A LoRA's effect is ~5 levels.
            if np.abs(image.astype(int) - expected[index]).max() > 2:
                mismatches.append(index)

    errors = in_threads_together(len(wanted), work)
    assert not errors and not mismatches
    assert controlled_model.adapters.describe()["switches"] > 0


def test_prompts_encoded_by_several_threads_at_once_are_the_prompts_encoded_alone(toy_model) -> None:  # type: ignore[no-untyped-def]
    """The tokenizer is one shared object that keeps its padding settings between calls, and
    encode_prompt tokenizes each prompt twice with different ones: unguarded, a thread now and then got
    its prompt padded to 5 tokens instead of 77, and a frame 57 grey levels off (`LoadedModel.prompt_lock`)."""
    prompts = ["a red house", "a blue sea at night", "green hills"]
    alone = [encode_prompts(toy_model, [(text, 1.0)], "blurry") for text in prompts]
    wrong: list[tuple[int, int]] = []

    def work(index: int, together: threading.Barrier) -> None:
        for round_ in range(30):
            together.wait()
            encoded = encode_prompts(toy_model, [(prompts[index], 1.0)], "blurry")
            if not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(encoded, alone[index])):
                wrong.append((round_, index))

    errors = in_threads_together(len(prompts), work)
    assert not errors and not wrong, wrong[:5]


# Prompts, transitions, seeds, feedback -------------------------------------------------------------


def test_weighted_prompts_mix_their_embeddings(controlled_model) -> None:  # type: ignore[no-untyped-def]
    red = frame(controlled_model, prompt="a red house")
    blue = frame(controlled_model, prompt="a blue sea")
    assert np.array_equal(frame(controlled_model, prompt=[["a red house", 2]]), red)
    assert np.array_equal(frame(controlled_model, prompt=[["a red house", 1], ["a blue sea", 0]]), red)
    mixed = frame(controlled_model, prompt=[["a red house", 1], ["a blue sea", 1]])
    assert difference(mixed, red) > 1 and difference(mixed, blue) > 1
    for bad in ([], [["a", -1]], [["a", 0]], [["a"]], [[1, 1]], "x" * 2001, [["a", True]]):
        with pytest.raises(InvalidParameter):
            StreamParams(prompt=bad)


def test_a_prompt_change_blends_over_transition_frames(controlled_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 1)
    target = frame(controlled_model, canvas, prompt="a blue sea")
    pipeline = stream(controlled_model, transition_frames=4)
    pipeline.render(canvas, tag=1)
    assert pipeline.settled
    pipeline.configure(pipeline.params.replace(prompt="a blue sea"), img2img=True)
    distances = []
    while not pipeline.settled and len(distances) < 10:
        distances.append(difference(pipeline.render(canvas, tag=1).image, target))
    # Four blended frames, then one more (the stream batch's depth) at the new prompt: it has arrived.
    assert len(distances) == 5 and distances[-1] == 0
    assert all(later < earlier for earlier, later in zip(distances, distances[1:]))
    # Without a transition the new prompt is there as soon as it has passed the stream batch.
    snapping = stream(controlled_model)
    snapping.render(canvas, tag=1)
    snapping.configure(snapping.params.replace(prompt="a blue sea"), img2img=True)
    snapping.render(canvas, tag=1)
    assert snapping.settled and np.array_equal(snapping.render(canvas, tag=1).image, target)


def test_a_seed_change_slerps_the_noise(controlled_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 2)
    target = frame(controlled_model, canvas, seed=9)
    pipeline = stream(controlled_model, transition_frames=3)
    start = pipeline.render(canvas, tag=1).image
    pipeline.configure(pipeline.params.replace(seed=9), img2img=True)
    frames = []
    while not pipeline.settled and len(frames) < 10:
        frames.append(pipeline.render(canvas, tag=1).image)
    assert len(frames) == 4 and np.array_equal(frames[-1], target)
    # (The first frame after the change finishes a latent noised before it.)
    assert difference(frames[1], start) > 0.5 and difference(frames[1], target) > 0.5


def test_latent_feedback_steadies_a_noisy_camera(controlled_model) -> None:  # type: ignore[no-untyped-def]
    """A still scene with sensor noise: frame-to-frame change (flicker) is lower with feedback on."""
    scene = make_canvas(SIZE, 5).astype(np.int16)
    rng = np.random.default_rng(0)
    noisy = [np.clip(scene + rng.normal(0, 20, scene.shape), 0, 255).astype(np.uint8) for _ in range(10)]

    def flicker(feedback: float) -> float:
        pipeline = stream(controlled_model, feedback=feedback, strength=0.6, cfg_type="none")
        frames = [pipeline.render(image, tag=index).image for index, image in enumerate(noisy)]
        return float(np.mean([difference(a, b) for a, b in zip(frames[3:], frames[4:])]))

    assert flicker(0.6) < 0.7 * flicker(0.0)


# Style presets -------------------------------------------------------------------------------------


def test_the_shipped_styles_load_and_apply_under_the_sessions_own_changes() -> None:
    styles = load_styles(None)
    assert {"watercolor", "pencil", "dream", "webcam"} <= set(styles)
    defaults = StreamParams()
    styled = apply_style(defaults.replace(prompt="a cat"), defaults, styles, {"style": "watercolor", "strength": 0.7})
    assert styled.style == "watercolor" and styled.strength == 0.7  # the session's own value wins
    assert styled.prompts() == [("a cat, watercolor painting, soft, colorful", 1.0)]
    dream = apply_style(styled, defaults, styles, {"style": "dream"})
    assert dream.strength == 0.85 and dream.negative_prompt == defaults.negative_prompt  # watercolor's is gone
    plain = apply_style(dream, defaults, styles, {"style": ""})
    assert plain.prompts() == [("a cat", 1.0)] and plain.strength == defaults.strength
    with pytest.raises(UnknownName, match="watercolor"):
        apply_style(defaults, defaults, styles, {"style": "baroque"})


def test_a_style_file_that_names_what_is_not_loaded_is_a_start_up_error(tmp_path: Path) -> None:
    path = tmp_path / "styles.toml"
    path.write_text('[inked]\nloras = { ink = 0.8 }\ncontrol_scale = 0.5\n')
    assert load_styles(path, loras=["ink"])["inked"].describe()["fields"] == {"loras": {"ink": 0.8}, "control_scale": 0.5}
    with pytest.raises(ModelLoadError, match="'ink'"):
        load_styles(path)
    for text, problem in (('[a]\nseed = 3\n', "unknown field 'seed'"), ('[a]\nstrength = 7\n', "strength"), ("[a\n", "styles.toml")):
        path.write_text(text)
        with pytest.raises(ModelLoadError, match=problem):
            load_styles(path)


def test_a_controlnet_costs_one_call_per_unet_call_whatever_the_batch(controlled_model) -> None:  # type: ignore[no-untyped-def]
    """Four controlled streams rendered together: one ControlNet call beside each UNet call, for every
    latent of every stream batch at once."""
    calls = {"unet": 0, "controlnet": 0}
    hooks = [
        controlled_model.pipe.unet.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1)),
        controlled_model.controlnets.get("scribble").register_forward_hook(lambda *_: calls.__setitem__("controlnet", calls["controlnet"] + 1)),
    ]
    try:
        streams = [stream(controlled_model, seed=index, controls=[SCRIBBLE]) for index in range(4)]
        for tag in range(3):
            render_together([(pipeline, make_canvas(SIZE, tag), tag) for pipeline in streams])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["unet"] == calls["controlnet"] == 4  # a priming step, then one a frame


def test_on_onnxruntime_controlnets_and_loras_run_compiled(
    toy_model_dir: Path, live_extras: dict[str, Path], tmp_path: Path
) -> None:
    """With ControlNets loaded, ONNX Runtime also gets a UNet graph that takes their residuals and one
    graph per ControlNet; with named LoRAs, UNet graphs whose LoRA-touched weights are inputs, bound to
    the weights merged for the stream's LoRAs. Streams with controls, LoRAs or both run wholly compiled
    and render what torch renders (up to float rounding)."""
    from streamcanvas.pipelines.backends import BackendConfig, prepare_backend
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    spec = ModelSpec(
        model=str(toy_model_dir),
        adapters=(("ink", str(live_extras["ink"])),),
        controlnets=(("scribble", str(live_extras["scribble"])), ("edges", str(live_extras["edges"]))),
    )
    eager, compiled = load_model(spec), load_model(spec)
    compiled.backend = prepare_backend(compiled, BackendConfig(name="onnxruntime", engine_dir=tmp_path, threads=2, measure_side=SIZE))
    assert compiled.backend.describe()["controlnets"] == ["scribble", "edges"]
    canvas = make_canvas(SIZE, 2)
    two = [SCRIBBLE, {"model": "edges", "scale": 0.7, "preprocessor": "canny", "end": 0.5}]
    cases = [
        ({"controls": [SCRIBBLE]}, "onnxruntime"),
        ({"controls": two, "steps": 2, "cfg_type": "full", "guidance_scale": 2.0}, "onnxruntime"),
        ({"loras": {"ink": 1.0}}, "onnxruntime"),
        ({"loras": {"ink": 0.6}, "steps": 2, "cfg_type": "full", "guidance_scale": 2.0}, "onnxruntime"),
        ({"loras": {"ink": 1.0}, "controls": [SCRIBBLE]}, "onnxruntime"),
    ]
    torch_calls = [0]
    hooks = [
        module.register_forward_hook(lambda *_: torch_calls.__setitem__(0, torch_calls[0] + 1))
        for module in (compiled.controlnets.get("scribble"), compiled.controlnets.get("edges"), compiled.pipe.unet)
    ]
    assert compiled.backend.takes_loras and compiled.backend.describe()["takes_loras"]
    for params, backend in cases:
        on_onnx = stream(compiled, **params)
        assert on_onnx.backend == backend, params
        before = torch_calls[0]
        rendered = [on_onnx.render(canvas, tag=tag).image for tag in range(3)]
        # Compiled: torch's ControlNets (and UNet) never ran.
        assert torch_calls[0] == before, (params, torch_calls)
        reference = stream(eager, **params)
        expected = [reference.render(canvas, tag=tag).image for tag in range(3)]
        worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(rendered, expected))
        assert worst <= 3, (params, worst)
        # And the controls and LoRAs did act: not the frame without them.
        for control in ("controls", "loras"):
            if control in params:
                plain = {name: value for name, value in params.items() if name != control}
                assert difference(rendered[-1], frame(eager, canvas, **plain)) > 1, (control, params)
    # Threads with different LoRA sets at the same moments: each binds its own merged weights.
    wanted: list[dict[str, float]] = [{"ink": 1.0}, {"ink": -0.7}, {}]
    expected = [frame(eager, canvas, loras=loras, steps=1, cfg_type="none") for loras in wanted]
    worst_seen: list[int] = []

    def work(index: int, together: threading.Barrier) -> None:
        together.wait()
        pipeline = stream(compiled, loras=wanted[index], steps=1, cfg_type="none")
        for tag in range(4):
            together.wait()
            image = pipeline.render(canvas, tag=tag).image
            worst_seen.append(int(np.abs(image.astype(int) - expected[index]).max()))

    errors = in_threads_together(len(wanted), work)
    assert not errors and len(worst_seen) == 4 * len(wanted) and max(worst_seen) <= 3, (errors, worst_seen)
    for hook in hooks:
        hook.remove()
    assert torch_calls[0] == 0
    assert stream(compiled).backend == "onnxruntime"
    # Merged weights are kept for a bounded number of LoRA sets, the least recently used going first.
    from streamcanvas.pipelines.adapters import MERGED_SETS

    lifted = compiled.adapters.lifted()
    merges = compiled.adapters.merges
    for weight in range(MERGED_SETS + 2):
        compiled.adapters.merged((("ink", weight / 10),), lifted)
    assert len(compiled.adapters._merged) == MERGED_SETS
    compiled.adapters.merged((("ink", (MERGED_SETS + 1) / 10),), lifted)  # the newest: still there
    compiled.adapters.merged((("ink", 0.0),), lifted)  # the oldest: merged again
    assert compiled.adapters.merges == merges + MERGED_SETS + 3


def test_a_fused_lora_stays_fused_beside_named_ones(toy_model_dir: Path, live_extras: dict[str, Path]) -> None:
    """`--lora PATH` (fused, e.g. an LCM-LoRA) with `--lora NAME=PATH`: switching the named adapters on
    and off never takes the fused one out."""
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    fused = load_model(ModelSpec(model=str(toy_model_dir), lora=str(live_extras["glow"])))
    both = load_model(ModelSpec(model=str(toy_model_dir), lora=str(live_extras["glow"]), adapters=(("ink", str(live_extras["ink"])),)))
    canvas = make_canvas(SIZE, 5)
    expected = frame(fused, canvas, cfg_type="none", steps=1)
    assert np.array_equal(frame(both, canvas, cfg_type="none", steps=1), expected)
    assert not np.array_equal(frame(both, canvas, cfg_type="none", steps=1, loras={"ink": 1.0}), expected)
    assert np.array_equal(frame(both, canvas, cfg_type="none", steps=1), expected)  # after the switch back


def test_a_transition_cut_short_lands_where_it_was_going(controlled_model) -> None:  # type: ignore[no-untyped-def]
    canvas = make_canvas(SIZE, 2)
    target = frame(controlled_model, canvas, seed=9, prompt="a blue sea", cfg_type="none")
    pipeline = stream(controlled_model, transition_frames=10, cfg_type="none")
    pipeline.render(canvas, tag=1)
    pipeline.configure(pipeline.params.replace(seed=9, prompt="a blue sea"), img2img=True)
    pipeline.render(canvas, tag=1)
    pipeline.configure(pipeline.params.replace(transition_frames=0), img2img=True)
    for _ in range(pipeline.depth):
        last = pipeline.render(canvas, tag=1).image
    assert pipeline.settled and np.array_equal(last, target)


def test_a_transition_answers_its_input_only_once_it_has_arrived(controlled_model) -> None:  # type: ignore[no-untyped-def]
    """A frame answers an input when it fully shows it: the prompt change (input 2) is answered by the
    last frame of the blend, not the first; clients waiting for it (the page) wait for the whole blend."""
    canvas = make_canvas(SIZE, 1)
    pipeline = stream(controlled_model, transition_frames=3)
    assert pipeline.render(canvas, tag=1).answers == 1
    pipeline.configure(pipeline.params.replace(prompt="a blue sea"), img2img=True)
    answers = [pipeline.render(canvas, tag=2).answers for _ in range(4)]
    assert answers == [1, 1, 1, 2] and pipeline.settled


@pytest.mark.parametrize("also", [{"strength": 0.7}, {"cfg_type": "none"}, {"steps": 3}], ids=["strength", "cfg", "steps"])
def test_a_transition_that_rebuilds_the_stream_still_blends_and_answers_at_its_end(controlled_model, also) -> None:  # type: ignore[no-untyped-def]
    """A prompt and seed change that also moves strength, CFG or steps starts a new stream batch. The
    prompt still blends, the frames answer the change only at the end of the blend (they answered it at
    once), and the seed slerps (it cut in), except with new steps: a deeper stream batch has other noise."""
    canvas = make_canvas(SIZE, 1)
    changes = {"prompt": "a blue sea", "seed": 77, **also}
    pipeline = stream(controlled_model, transition_frames=4)
    assert pipeline.render(canvas, tag=1).answers == 1
    target = frame(controlled_model, canvas, transition_frames=4, **changes)
    pipeline.configure(pipeline.params.replace(**changes), img2img=True)
    results = []
    while not pipeline.settled and len(results) < 12:
        results.append(pipeline.render(canvas, tag=2))
    answers = [result.answers for result in results]
    assert answers[-1] == 2 and set(answers[:-1]) == {1}, answers
    assert len(results) == 4 + pipeline.depth - 1 and np.array_equal(results[-1].image, target)
    distances = [difference(result.image, target) for result in results[:4]]
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    if "steps" not in also:  # the seed's noise moved over the blend too: the first frame is not the new seed's
        assert pipeline.params.seed == 77 and difference(results[0].image, target) > 1


def test_a_seed_and_a_prompt_blending_at_once_both_arrive(controlled_model) -> None:  # type: ignore[no-untyped-def]
    """The page sends a new seed at once and the prompt a moment later: the second transition starts
    while the first is under way, and the stream still ends exactly where a fresh one starts."""
    canvas = make_canvas(SIZE, 3)
    target = frame(controlled_model, canvas, seed=77, prompt="a blue sea", transition_frames=8)
    pipeline = stream(controlled_model, transition_frames=8)
    pipeline.render(canvas, tag=1)
    pipeline.configure(pipeline.params.replace(seed=77), img2img=True)
    for _ in range(3):
        pipeline.render(canvas, tag=2)
    pipeline.configure(pipeline.params.replace(prompt="a blue sea"), img2img=True)
    frames = 0
    while not pipeline.settled and frames < 30:
        last = pipeline.render(canvas, tag=3).image
        frames += 1
    assert pipeline.settled and np.array_equal(last, target)
