"""Live controls over the wire: a real server started with two LoRAs and two ControlNets (built offline
for the trained toy model), driven by WebSocket clients."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from batch_helpers import Jobs, png_base64
from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, decode_frame, encode_payload, make_canvas
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import Canvas, CanvasDelta, Hello, Params, Patch, parse_client_message
from test_browser import TIMEOUT_MS, browser, open_page, stroke, wait_settled  # noqa: F401 - browser is a fixture
from test_live_controls import lines

SIZE = TEST_RESOLUTION
LAYER_CONTROL = {"model": "scribble", "scale": 1.0, "preprocessor": "none", "source": "layer"}
STEADY = {"prompt": "a red house", "steps": 1, "cfg_type": "none"}
"""One step without residual CFG: a frame depends on its inputs only, so two sessions can be compared."""


@pytest.fixture(scope="module")
def controls_server(cache_dir: Path, artifacts_dir: Path, live_extras: dict[str, Path], toy_model_dir: Path, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """The trained toy model with the LoRAs, ControlNets and depth network, and beside it the untrained
    tiny model, which has none of them (they load on the default model)."""
    process = start_server(
        cache_dir,
        artifacts_dir,
        "controls",
        "--slots", "2",
        "--model", f"toy={toy_model_dir}",
        "--model", f"tiny={tiny_model_dir}",
        "--lora", f"ink={live_extras['ink']}",
        "--lora", f"glow={live_extras['glow']}",
        "--controlnet", f"scribble={live_extras['scribble']}",
        "--controlnet", f"edges={live_extras['edges']}",
        "--depth-model", str(live_extras["depth"]),
    )
    yield process
    process.stop()


async def first_frame(client: Client, seq: int) -> np.ndarray:
    return decode_frame(await client.frame_for(seq))


async def send_layer(client: Client, rgb: np.ndarray) -> int:
    seq = client.next_seq()
    await client.send(Canvas(image=encode_payload(rgb, ImageFormat.PNG), seq=seq, layer="control"))
    return seq


async def error_for(client: Client, seq: int) -> dict[str, Any]:
    while True:
        message = await client.recv()
        if message["type"] == "error" and message["ref_seq"] == seq:
            return message


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_info_and_styles_list_what_sessions_can_name(controls_server: ServerProcess) -> None:
    info = controls_server.info()
    assert info["model"]["loras"]["names"] == ["ink", "glow"]
    assert [net["name"] for net in info["model"]["controlnets"]] == ["scribble", "edges"]
    assert {"watercolor", "pencil", "dream", "webcam"} <= set(info["styles"])
    styles = httpx.get(f"{controls_server.base_url}/v1/styles", timeout=5).json()["styles"]
    watercolor = next(style for style in styles if style["name"] == "watercolor")
    assert watercolor["fields"]["prompt_template"].startswith("{prompt}") and watercolor["description"]


async def test_a_control_layer_steers_frames_and_ready_echoes_the_controls(controls_server: ServerProcess) -> None:
    canvas = make_canvas(SIZE, 1)
    params = {**STEADY, "controls": [LAYER_CONTROL], "loras": {"ink": 0.7}}
    async with Client.connect(controls_server.ws_url) as client, Client.connect(controls_server.ws_url) as other:
        ready = await client.hello(params=params)
        assert ready["params"]["controls"] == [{**LAYER_CONTROL, "start": 0.0, "end": 1.0}]
        assert ready["params"]["loras"] == {"ink": 0.7}
        await other.hello(params=params)
        without_layer = await first_frame(client, await client.send_canvas(canvas))
        with_layer = await first_frame(client, await send_layer(client, lines(SIZE, 1)))
        assert difference(with_layer, without_layer) > 1
        # A delta on the control layer is an input too; the other session, with no layer, is untouched.
        seq = client.next_seq()
        patch = Patch(0, 0, encode_payload(lines(SIZE // 2, 2), ImageFormat.PNG))
        await client.send(CanvasDelta(patches=(patch,), seq=seq, layer="control"))
        assert difference(await first_frame(client, seq), with_layer) > 0.1
        assert np.array_equal(await first_frame(other, await other.send_canvas(canvas)), without_layer)


async def test_a_txt2img_session_follows_its_control_layer(controls_server: ServerProcess) -> None:
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(mode="txt2img", params={**STEADY, "controls": [LAYER_CONTROL]})
        first = await first_frame(client, await send_layer(client, lines(SIZE, 3)))
        second = await first_frame(client, await send_layer(client, lines(SIZE, 4)))
        assert difference(first, second) > 1
        seq = await client.send_params(controls=[{**LAYER_CONTROL, "source": "canvas"}])
        error = await error_for(client, seq)
        assert error["code"] == "invalid_value" and error["field"] == "controls" and "layer" in error["message"]


async def test_loras_and_styles_switch_live(controls_server: ServerProcess) -> None:
    canvas = make_canvas(SIZE, 2)
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(params=STEADY)
        plain = await first_frame(client, await client.send_canvas(canvas))
        inked = await first_frame(client, await client.send_params(loras={"ink": 1.0}))
        assert difference(inked, plain) > 1
        back = await first_frame(client, await client.send_params(loras={}))
        assert np.array_equal(back, plain)
        styled = await first_frame(client, await client.send_params(style="dream"))
        assert difference(styled, plain) > 1
        assert np.array_equal(await first_frame(client, await client.send_params(style="")), plain)


async def test_a_prompt_transition_plays_out_without_new_input(controls_server: ServerProcess) -> None:
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(params={"prompt": "a red house", "transition_frames": 6})
        await client.frame_for(await client.send_canvas(make_canvas(SIZE, 3)))
        await client.send_params(prompt="a blue sea")
        frames = []
        while len(frames) < 7:
            message = await client.recv()
            if message["type"] == "frame":
                frames.append(decode_frame(message))
        # One params message, seven frames (six blended, one more through the stream batch), each a step
        # further from the old prompt.
        assert all(difference(a, b) > 0 for a, b in zip(frames, frames[1:]))


@pytest.mark.parametrize(
    ("changes", "code", "field", "named"),
    [
        ({"loras": {"sepia": 1.0}}, "unknown_name", "loras", "ink, glow"),
        ({"controls": [{"model": "depth"}]}, "unknown_name", "controls", "scribble, edges"),
        ({"style": "baroque"}, "unknown_name", "style", "watercolor"),
        ({"controls": "scribble"}, "invalid_field", "controls", "array"),
        ({"controls": [{"model": "scribble", "scale": "big"}]}, "invalid_value", "controls", "scale"),
        ({"loras": {"ink": 9}}, "invalid_value", "loras", "outside"),
        ({"prompt": [["a", "b"]]}, "invalid_value", "prompt", "[text, weight]"),
        ({"transition_frames": 10_000}, "invalid_value", "transition_frames", "outside"),
    ],
)
async def test_bad_controls_are_typed_errors_and_the_session_goes_on(
    controls_server: ServerProcess, changes: dict[str, Any], code: str, field: str, named: str
) -> None:
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(params=STEADY)
        seq = await client.send_params(**changes)
        error = await error_for(client, seq)
        assert (error["code"], error["field"], error["fatal"]) == (code, field, False) and named in error["message"]
        await client.frame_for(await client.send_canvas(make_canvas(SIZE, 1)))


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"loras": {"x" * 1_000_000: 1.0}}, "unknown_name", "loras"),
        ({"controls": [{"model": "y" * 1_000_000}]}, "unknown_name", "controls"),
        ({"controls": [{"model": "scribble", "preprocessor": "z" * 1_000_000}]}, "invalid_value", "controls"),
        ({"controls": [{"model": "scribble", "scale": b"\0" * 2_000_000}]}, "invalid_value", "controls"),
        ({"controls": [{"model": "scribble", "w" * 1_000_000: 1}]}, "invalid_value", "controls"),
        ({"q" * 1_000_000: 1}, "invalid_field", None),
    ],
    ids=["lora-name", "controlnet-name", "preprocessor", "bytes-scale", "control-field", "parameter-name"],
)
async def test_errors_quote_a_clients_megabytes_in_a_few_characters(
    controls_server: ServerProcess, changes: dict[str, Any], code: str, field: str | None
) -> None:
    """What a client sent comes back in an error's message cut short (it was echoed whole, and bytes at four
    times their size: a 2 MB value gave an 8 MB error), and the session goes on."""
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(params=STEADY)
        seq = client.next_seq()
        await client.send(Params(changes=changes, seq=seq))
        error = await error_for(client, seq)
        assert error["code"] == code and not error["fatal"] and len(error["message"]) < 300, len(error["message"])
        assert (error["field"] == field) if field else len(error["field"]) <= 100
        await client.frame_for(await client.send_canvas(make_canvas(SIZE, 1)))


async def test_a_hello_naming_an_unknown_lora_is_refused(controls_server: ServerProcess) -> None:
    async with Client.connect(controls_server.ws_url) as client:
        await client.send(Hello(protocol=(1,), params={"loras": {"sepia": 1.0}}))
        message = await client.expect("error")
        assert message["code"] == "unknown_name" and message["fatal"] and "ink, glow" in message["message"]


async def test_a_bad_layer_is_a_typed_error(controls_server: ServerProcess) -> None:
    async with Client.connect(controls_server.ws_url) as client:
        await client.hello(params=STEADY)
        seq = client.next_seq()
        await client.send(Canvas(image=encode_payload(make_canvas(SIZE, 1), ImageFormat.PNG), seq=seq, layer="depth"))
        error = await error_for(client, seq)
        assert (error["code"], error["field"]) == ("invalid_value", "layer")


# Full-quality renders keep the live look ------------------------------------------------------------


@pytest.fixture
def jobs(controls_server: ServerProcess) -> Iterator[Jobs]:
    client = Jobs(controls_server.base_url)
    yield client
    client.close()


def render(jobs: Jobs, kind: str, **params: Any) -> np.ndarray:
    job = jobs.wait(jobs.create(kind, {"steps": 4, "scheduler": "euler", "seed": 5, "width": SIZE, "height": SIZE, **params})["id"])
    assert job["status"] == "finished", job
    return np.asarray(jobs.image(job["results"][0]["url"]).convert("RGB"))


def test_batch_jobs_take_loras_controls_and_styles(jobs: Jobs) -> None:
    prompt = {"prompt": "a red house"}
    plain = render(jobs, "txt2img", **prompt)
    assert difference(render(jobs, "txt2img", **prompt, loras={"ink": 1.0}), plain) > 1
    assert np.array_equal(render(jobs, "txt2img", **prompt, loras={"ink": 0.0}), plain)
    layer = png_base64(lines(SIZE, 1))
    controlled = render(jobs, "txt2img", **prompt, controls=[{"model": "scribble", "preprocessor": "none"}], control_image=layer)
    assert difference(controlled, plain) > 1
    assert np.array_equal(render(jobs, "txt2img", **prompt, controls=[{"model": "scribble", "scale": 0.0}], control_image=layer), plain)
    # A style is its template applied to the prompt: the same image as writing the templated prompt.
    template = httpx.get(f"{jobs.http.base_url}/v1/styles").json()["styles"][0]["fields"]["prompt_template"]
    styled = render(jobs, "txt2img", prompt="a red house", style="watercolor")
    assert np.array_equal(styled, render(jobs, "txt2img", prompt=template.replace("{prompt}", "a red house"), negative_prompt="dark, sharp"))
    # An img2img job's controls read its input image when no control image is given.
    image = png_base64(make_canvas(SIZE, 2))
    assert difference(render(jobs, "img2img", **prompt, image=image, controls=[{"model": "edges", "preprocessor": "canny"}]), render(jobs, "img2img", **prompt, image=image)) > 1
    assert difference(render(jobs, "img2img", **prompt, image=image, controls=[{"model": "edges", "preprocessor": "depth"}]), render(jobs, "img2img", **prompt, image=image)) > 1


@pytest.mark.parametrize(
    ("params", "field", "named"),
    [
        ({"loras": {"sepia": 1.0}}, "params.loras", "ink, glow"),
        ({"controls": [{"model": "depth"}], "control_image": png_base64(lines(SIZE, 1))}, "params.controls", "scribble, edges"),
        ({"style": "baroque"}, "params.style", "watercolor"),
        ({"controls": [{"model": "scribble"}]}, "params.control_image", "control_image"),
        ({"controls": [{"model": "scribble", "source": "image"}], "control_image": png_base64(lines(SIZE, 1))}, "params.control_image", "input image"),
        ({"controls": [{"model": "scribble", "source": "layer"}]}, "params.controls.0.source", "control_image"),
        ({"controls": [{"model": "scribble", "preprocessor": "hed"}]}, "params.controls.0.preprocessor", "scribble"),
        ({"control_image": "not base64!"}, "params.control_image", "base64"),
    ],
)
def test_bad_live_look_fields_are_refused_before_queueing(jobs: Jobs, params: dict[str, Any], field: str, named: str) -> None:
    response = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": {"prompt": "x", **params}})
    assert response.status_code == 422 and response.json()["field"] == field and named in response.json()["message"], response.json()


async def test_render_full_quality_keeps_the_sessions_loras_and_control_layer(controls_server: ServerProcess, jobs: Jobs) -> None:
    """Every control of the session goes into the job, each reading what it reads live: the control layer
    (the job's control_image) or the canvas (its input image). A canvas control beside a layer control
    used to be dropped."""
    canvas = make_canvas(SIZE, 4)
    control = {**LAYER_CONTROL, "scale": 0.8}
    on_canvas = {"model": "edges", "scale": 0.6, "preprocessor": "canny", "source": "canvas"}
    async with Client.connect(controls_server.ws_url) as client:
        ready = await client.hello(
            params={"prompt": "a blue lake", "seed": 12, "loras": {"glow": 0.6}, "controls": [control, on_canvas], "style": "pencil"}
        )
        await client.send_canvas(canvas)
        await client.frame_for(await send_layer(client, lines(SIZE, 5)))
        created = jobs.create("live_session", {"session_id": ready["session_id"], "session_token": ready["token"], "steps": 4, "scheduler": "euler"})
    assert created["params"]["loras"] == {"glow": 0.6} and created["params"]["style"] == "pencil"
    # The session set its control's scale itself, in the same hello as the style: its own value wins.
    assert created["params"]["controls"] == [
        {"model": "scribble", "scale": 0.8, "start": 0.0, "end": 1.0, "preprocessor": "none", "source": "control_image"},
        {"model": "edges", "scale": 0.6, "start": 0.0, "end": 1.0, "preprocessor": "canny", "source": "image"},
    ]
    assert created["params"]["prompt"].startswith("a blue lake, pencil sketch")
    live = jobs.wait(created["id"])
    assert live["status"] == "finished", live
    same = render(
        jobs, "img2img", prompt=created["params"]["prompt"], negative_prompt=created["params"]["negative_prompt"], seed=12,
        strength=created["params"]["strength"], image=png_base64(canvas), loras={"glow": 0.6},
        controls=created["params"]["controls"], control_image=png_base64(lines(SIZE, 5)),
    )
    live_image = np.asarray(jobs.image(live["results"][0]["url"]).convert("RGB"))
    assert np.abs(live_image.astype(int) - same).max() <= 2
    without_canvas_control = render(
        jobs, "img2img", prompt=created["params"]["prompt"], negative_prompt=created["params"]["negative_prompt"], seed=12,
        strength=created["params"]["strength"], image=png_base64(canvas), loras={"glow": 0.6},
        controls=created["params"]["controls"][:1], control_image=png_base64(lines(SIZE, 5)),
    )
    assert np.abs(live_image.astype(int) - without_canvas_control).mean() > 0.5  # the canvas control took part


async def test_render_full_quality_takes_a_weighted_prompt(controls_server: ServerProcess, jobs: Jobs) -> None:
    """A session's weighted prompt goes into its full-quality render (the job used to fail writing the
    PNG's A1111 text), written there in A1111's composable form."""
    async with Client.connect(controls_server.ws_url) as client:
        ready = await client.hello(params={"prompt": [["a red house", 0.7], ["a blue lake", 0.3]], "seed": 3})
        await client.frame_for(await client.send_canvas(make_canvas(SIZE, 2)))
        created = jobs.create("live_session", {"session_id": ready["session_id"], "session_token": ready["token"], "steps": 2})
    live = jobs.wait(created["id"])
    assert live["status"] == "finished", live
    assert jobs.image(live["results"][0]["url"]).info["parameters"].startswith("a red house :0.7 AND a blue lake :0.3\n")


# The canvas page (last: its module-scoped browser keeps an event loop running in this thread) ------------------------------------------------------------------------------------


@contextlib.contextmanager
def watched_page(browser) -> Iterator[tuple[Any, list[str], list[Any]]]:  # type: ignore[no-untyped-def]
    """A page in a fresh browser context, with the page errors it raises and the messages it sends."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sent: list[Any] = []
    page.on("websocket", lambda websocket: websocket.on("framesent", lambda payload: sent.append(parse_client_message(payload))))
    try:
        yield page, errors, sent
    finally:
        context.close()


def test_the_page_offers_every_live_control(browser, controls_server: ServerProcess, artifacts_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Chromium: the page lists the server's styles, LoRAs and ControlNets, sends each control as the
    protocol has it, and sends its line layer as the control layer (white strokes on black) while the
    canvas it sends keeps only the other layers."""
    with watched_page(browser) as (page, errors, sent):
        open_page(page, controls_server)
        wait_settled(page)
        assert page.locator("#style option").all_inner_texts() == ["none", "watercolor", "pencil", "dream", "webcam"]
        assert page.locator("[data-lora]").count() == 2
        assert page.locator("#controlnet option").all_inner_texts() == ["none", "scribble", "edges"]
        assert page.locator("#preprocessor option").all_inner_texts() == ["scribble", "canny", "none", "depth"]
        assert page.locator("#model option").all_inner_texts() == ["toy (trained toy model)", "tiny (untrained toy model)"]

        def changes() -> dict[str, Any]:
            merged: dict[str, Any] = {}
            for message in sent:
                if isinstance(message, Params):
                    merged.update(message.changes)
            return merged

        page.select_option("#style", "dream")
        assert page.input_value("#strength") == "0.85" and page.locator("#strength-value").inner_text() == "0.85"  # dream's
        page.fill("#negative-prompt", "blurry")
        page.locator("#negative-prompt").dispatch_event("change")
        page.locator("#guidance").fill("2")
        page.select_option("#cfg-type", "full")
        page.check("#similar-filter")
        page.fill("#transition", "12")
        page.locator("#transition").dispatch_event("change")
        page.locator("[data-lora=glow]").fill("0.5")
        assert page.locator("[data-lora-value=glow]").inner_text() == "0.50"  # a weight is shown, as strength is
        page.select_option("#controlnet", "scribble")
        page.select_option("#preprocessor", "canny")
        wait_settled(page)
        assert changes() == {
            "style": "dream", "negative_prompt": "blurry", "guidance_scale": 2.0, "cfg_type": "full",
            "similar_filter": True, "transition_frames": 12, "loras": {"glow": 0.5},
            "controls": [{"model": "scribble", "scale": 1.0, "preprocessor": "canny", "source": "canvas"}],
        }
        page.uncheck("#similar-filter")  # every frame, for the strokes below

        sent.clear()
        page.check("#lines-as-control")
        stroke(page, [(0.2, 0.5), (0.8, 0.5)])
        wait_settled(page)
        assert changes()["controls"] == [{"model": "scribble", "scale": 1.0, "preprocessor": "none", "source": "layer"}]
        assert page.locator("#layers li .name").first.inner_text() == "Lines (control)"
        canvases = [message for message in sent if isinstance(message, Canvas)]
        image = next(message for message in reversed(canvases) if message.layer == "image")
        control = next(message for message in reversed(canvases) if message.layer == "control")
        drawn = np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))
        lines_drawn = np.asarray(Image.open(io.BytesIO(control.image.data)).convert("RGB"))
        assert drawn.min() == 255  # the strokes are not in the img2img input: white paper only
        assert lines_drawn[0, 0].max() == 0 and lines_drawn[SIZE // 2, SIZE // 2].min() == 255  # white on black
        page.screenshot(path=str(artifacts_dir / "browser-live-controls.png"), full_page=True)
        assert not errors


def test_a_comfyui_workflow_applies_loras_and_controlnets(controls_server: ServerProcess, jobs: Jobs) -> None:
    """LoraLoader and ControlNetLoader/ControlNetApply run on the server's LoRAs and ControlNets."""
    from test_comfyui import txt2img_graph

    http = jobs.http

    def run(graph: dict[str, Any]) -> np.ndarray:
        answer = http.post("/prompt", json={"prompt": graph})
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        assert jobs.wait(prompt_id)["status"] == "finished"
        image = http.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]["9"]["images"][0]
        return np.asarray(Image.open(io.BytesIO(http.get("/view", params=image).content)).convert("RGB"), dtype=np.float32)

    model = http.get("/v1/models").json()["models"][0]["id"]

    def with_lora(strength: float, name: str = "ink") -> dict[str, Any]:
        graph = txt2img_graph(model, seed=7)
        graph["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": name, "strength_model": strength, "strength_clip": strength}}
        graph["3"]["inputs"]["model"] = ["10", 0]
        graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 1]
        return graph

    base = run(txt2img_graph(model, seed=7))
    assert np.array_equal(run(with_lora(0.0)), base)  # a LoRA at strength 0 is no LoRA
    assert np.abs(run(with_lora(1.0)) - base).mean() > 1.0
    refused = http.post("/prompt", json={"prompt": with_lora(1.0, "not-a-lora")}).json()
    assert refused["node_errors"]["10"]["errors"][0]["type"] == "value_not_in_list"
    assert "'ink'" in refused["node_errors"]["10"]["errors"][0]["details"]

    buffer = io.BytesIO()
    Image.fromarray(lines(SIZE, 3)).save(buffer, format="PNG")
    stored = http.post("/upload/image", files={"image": ("lines.png", buffer.getvalue(), "image/png")}).json()
    controlled = txt2img_graph(model, seed=7)
    controlled["11"] = {"class_type": "LoadImage", "inputs": {"image": stored["name"]}}
    controlled["12"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "scribble"}}
    controlled["13"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["12", 0], "image": ["11", 0], "strength": 1.0}}
    controlled["3"]["inputs"]["positive"] = ["13", 0]
    assert np.abs(run(controlled) - base).mean() > 1.0
    controlled["13"]["inputs"]["strength"] = 0.0
    assert np.abs(run(controlled) - base).mean() < 0.5  # a ControlNet at scale 0 adds nothing


def test_a_video_job_takes_the_sessions_loras(controls_server: ServerProcess, jobs: Jobs) -> None:
    """A clip restyled with a LoRA differs from the same clip without it, frame for frame."""
    import base64 as b64

    from test_batch_kinds import make_clip, read_clip

    clip = b64.b64encode(make_clip(frames=6)).decode()

    def restyled(**extra: Any) -> list[np.ndarray]:
        job = jobs.wait(jobs.create("video", {"video": clip, "prompt": "a red house", "seed": 3, **extra})["id"])
        assert job["status"] == "finished", job
        return read_clip(jobs.http.get(job["results"][0]["url"]).content)[0]

    plain, inked = restyled(), restyled(loras={"ink": 1.0})
    assert len(plain) == len(inked) == 6
    assert all(np.abs(a.astype(int) - b).mean() > 1.0 for a, b in zip(plain, inked))


def test_the_page_shows_what_the_session_holds_and_switches_models_cleanly(browser, controls_server: ServerProcess) -> None:  # type: ignore[no-untyped-def]
    """Chromium: the controls show the session's parameters (the model's defaults, a style's fields and
    their reset), a reconnect gets the same session back, a model without the LoRAs and ControlNets in use
    is switched to without them (not refused over and over), a hello the server refuses goes back to
    the settings that worked, and removing the line layer stops it steering the frames."""
    with watched_page(browser) as (page, errors, sent):

        def next_ready() -> dict[str, Any]:
            """The next session's ready (each reconnect resumes the same session id: the test marks
            each ready it has seen)."""
            page.wait_for_function("streamcanvas.connection.ready && !streamcanvas.connection.ready.seenByTest")
            return page.evaluate("(() => { const ready = streamcanvas.connection.ready; ready.seenByTest = true; return ready; })()")  # type: ignore[no-any-return]

        open_page(page, controls_server)
        ready = next_ready()
        defaults = ready["defaults"]
        assert ready["params"]["cfg_type"] == defaults["cfg_type"] == "none"  # the toy model's own default
        assert page.input_value("#cfg-type") == "none" and page.input_value("#steps") == str(defaults["steps"])

        page.select_option("#style", "watercolor")
        assert page.input_value("#negative-prompt") == "dark, sharp" and page.input_value("#strength") == "0.6"
        page.select_option("#style", "")  # the preset's fields go back to the defaults, on the server and here
        assert page.input_value("#negative-prompt") == defaults["negative_prompt"]
        assert float(page.input_value("#strength")) == defaults["strength"]

        page.select_option("#style", "dream")
        page.evaluate("streamcanvas.connection.restart()")
        again = next_ready()
        assert (again["params"]["style"], again["params"]["strength"]) == ("dream", 0.85)  # not the page's 0.5

        page.locator("[data-lora=glow]").fill("0.5")
        page.select_option("#controlnet", "scribble")
        wait_settled(page)
        sent.clear()
        page.select_option("#model", "tiny")
        tiny = next_ready()
        assert tiny["model"]["id"] == "tiny" and tiny["params"]["loras"] == {} and tiny["params"]["controls"] == []
        assert [message.type for message in sent].count("hello") == 1
        assert page.locator("[data-lora-label=glow]").is_hidden() and page.locator("#controlnet").input_value() == ""

        # A hello the server refuses (here a size over its maximum) is not sent again and again: the
        # page goes back to the last settings that worked.
        sent.clear()
        page.evaluate("streamcanvas.state.resolution = 4096; streamcanvas.connection.restart()")
        back = next_ready()
        assert (back["width"], back["model"]["id"]) == (SIZE, "tiny")
        assert [message.type for message in sent].count("hello") == 2

        # Back on the model that has them, the LoRA and the ControlNet chosen before are there again
        # (they were dropped for good when the other model could not take them).
        page.select_option("#model", "toy")
        toy = next_ready()
        assert toy["params"]["loras"].get("glow") == 0.5 and [control["model"] for control in toy["params"]["controls"]] == ["scribble"]
        assert page.input_value("[data-lora=glow]") == "0.5" and page.input_value("#controlnet") == "scribble"
        assert page.locator("[data-lora-value=glow]").inner_text() == "0.50"
        page.select_option("#controlnet", "scribble")
        page.check("#lines-as-control")
        stroke(page, [(0.2, 0.5), (0.8, 0.5)])
        wait_settled(page)
        sent.clear()
        page.click("#remove-layer")  # the Lines layer, which is active
        wait_settled(page)
        assert not page.is_checked("#lines-as-control")
        controls = [message.changes["controls"] for message in sent if isinstance(message, Params) and "controls" in message.changes]
        assert controls and controls[-1][0]["source"] == "canvas"
        assert not errors
