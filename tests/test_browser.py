"""The live canvas page in a real browser: Debian's Chromium, headless, driven by Playwright.

The page is served by a real server running the tiny model. Strokes are real pointer events; the
webcam and the screen are Chromium's fake capture devices. Screenshots land in artifacts/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, sync_playwright

from conftest import start_server
from helpers import CHROMIUM_ARGS as HELPER_CHROMIUM_ARGS
from helpers import ServerProcess
from streamcanvas.codecs.images import read_dimensions
from streamcanvas.codecs.messages import Canvas, CanvasDelta, Ping, parse_client_message

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    *HELPER_CHROMIUM_ARGS,
    "--enable-usermedia-screen-capturing",
    "--auto-accept-this-tab-capture",
    "--auto-select-desktop-capture-source=Entire screen",
]
SIZE = 128
TIMEOUT_MS = 30_000

# Pixel hashes computed in the page: of the drawing as sent, and of the latest AI frame.
HASH_JS = """
(data) => { let h = 2166136261; for (let i = 0; i < data.length; i++) { h ^= data[i]; h = Math.imul(h, 16777619); } return h >>> 0; }
"""
DRAWING_HASH = f"() => ({HASH_JS})(streamcanvas.doc.viewContext.getImageData(0, 0, streamcanvas.doc.width, streamcanvas.doc.height).data)"
# Statements that leave the latest AI frame's RGBA pixels in `output`.
READ_OUTPUT_JS = """
  const img = document.querySelector('#output');
  await img.decode();
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const output = context.getImageData(0, 0, canvas.width, canvas.height).data;
"""
OUTPUT_HASH = f"async () => {{ {READ_OUTPUT_JS} return ({HASH_JS})(output); }}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is installed by `make test`; run it through make"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def own_page(browser: Browser, **context_options: Any) -> Iterator[tuple[Page, list[str]]]:
    """A page in a browser context of its own, and the JavaScript errors it raises."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page, errors
    finally:
        context.close()


def server_fixture(name: str, *args: str, scope: str = "function", env: dict[str, str] | None = None) -> Any:
    """A fixture `name`: a server started with these arguments (its job database and results named after it)."""

    def fixture(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
        process = start_server(cache_dir, artifacts_dir, name.replace("_", "-"), *args, env=env)
        try:
            yield process
        finally:
            process.stop()

    return pytest.fixture(scope=scope, name=name)(fixture)  # type: ignore[call-overload]


web_server = server_fixture("web_server", "--slots", "2", scope="module")


@pytest.fixture
def page(browser: Browser, web_server: ServerProcess, artifacts_dir: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    open_page(page, web_server)
    yield page
    page.screenshot(path=str(artifacts_dir / f"browser-{request.node.name}.png"))
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_page(page: Page, server: ServerProcess) -> None:
    # Lossless frames: the tiny untrained model's frames differ by a level or two between inputs, which
    # JPEG could round away; with PNG, "the frame changed" and "the same frame" are exact.
    page.goto(f"{server.base_url}/?resolution={SIZE}&codec=png")
    wait_ready(page)


def wait_ready(page: Page) -> None:
    page.wait_for_function("document.querySelector('#status').dataset.state === 'ready'")


def wait_settled(page: Page) -> None:
    page.wait_for_function("streamcanvas.settled()")


def stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """A real pointer drag across the drawing canvas, in fractions of its size."""
    box = page.locator("#draw").bounding_box()
    assert box is not None
    x0, y0 = points[0]
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=4)
    page.mouse.up()


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def hashes(page: Page) -> tuple[int, int]:
    return page.evaluate(DRAWING_HASH), page.evaluate(OUTPUT_HASH)


def test_drawing_and_typing_change_the_rendered_frames(page: Page) -> None:
    wait_settled(page)
    drawing, output = hashes(page)
    assert page.locator("#status").inner_text() == "Live"
    assert page.locator("#model-name").inner_text() == "trained toy model"

    stroke(page, [(0.2, 0.2), (0.5, 0.4), (0.8, 0.3)])
    wait_settled(page)
    drawn, drawn_output = hashes(page)
    assert drawn != drawing, "the stroke must change the drawing"
    assert drawn_output != output, "the AI frame must follow the stroke"

    page.fill("#prompt", "a lighthouse at night")  # typing is enough: there is no generate button
    wait_settled(page)
    prompted, prompted_output = hashes(page)
    assert prompted == drawn and prompted_output != drawn_output, "the prompt alone must change the frame"
    assert page.evaluate("document.querySelector('#output').naturalWidth") == SIZE


PIXELS_JS = f"""async () => {{ {READ_OUTPUT_JS}
  const doc = streamcanvas.doc;
  return {{ drawing: Array.from(doc.viewContext.getImageData(0, 0, doc.width, doc.height).data), output: Array.from(output) }};
}}"""


def set_brush(page: Page, colour: str, size: int) -> None:
    page.fill("#color", colour)
    page.evaluate(f"(() => {{ const s = document.querySelector('#size'); s.value = {size}; s.dispatchEvent(new Event('input')); }})()")


def test_the_frame_shows_what_is_drawn(page: Page, artifacts_dir: Path) -> None:
    """A house drawn with real pointer events on the trained toy model: the frame is the drawing,
    restyled, in the same place (the grey levels of drawing and frame correlate), and a colour word in
    the prompt tints it. Its screenshot is the README's."""
    size = 256
    page.select_option("#resolution", str(size))
    wait_settled(page)
    page.fill("#prompt", "a house on a hill")
    page.click("[data-tool=fill]")
    set_brush(page, "#9fd0ff", 8)
    stroke(page, [(0.5, 0.1)])  # sky
    page.click("[data-tool=brush]")
    set_brush(page, "#3f8f3f", 48)
    stroke(page, [(0.0, 0.92), (1.0, 0.92)])  # grass
    set_brush(page, "#b03a30", 18)
    for points in ([(0.3, 0.45), (0.3, 0.8)], [(0.3, 0.8), (0.7, 0.8)], [(0.7, 0.8), (0.7, 0.45)], [(0.3, 0.45), (0.7, 0.45)]):
        stroke(page, points)  # walls
    set_brush(page, "#5f3010", 18)
    stroke(page, [(0.22, 0.5), (0.5, 0.22), (0.78, 0.5)])  # roof
    set_brush(page, "#f2c200", 36)
    stroke(page, [(0.8, 0.15), (0.84, 0.17), (0.82, 0.2)])  # sun
    wait_settled(page)

    def rgb(which: str) -> np.ndarray:
        return np.array(page.evaluate(PIXELS_JS)[which], np.float64).reshape(size, size, 4)[..., :3]

    def redness(image: np.ndarray) -> float:
        return float((image[..., 0] - image[..., 2]).mean())

    drawing, output = rgb("drawing"), rgb("output")
    correlation = float(np.corrcoef(drawing.mean(axis=2).ravel(), output.mean(axis=2).ravel())[0, 1])
    assert correlation > 0.6, correlation
    page.screenshot(path=str(artifacts_dir / "browser-house.png"))
    page.fill("#prompt", "a blue house on a hill")
    wait_settled(page)
    blue = rgb("output")
    assert redness(blue) < redness(output) - 15, (redness(blue), redness(output))


def test_only_what_changed_is_sent_and_sending_is_paced(page: Page) -> None:
    wait_settled(page)
    received: list[int] = []

    messages: list[object] = []

    def on_sent(payload: bytes | str) -> None:
        message = parse_client_message(payload)
        if not isinstance(message, Ping):
            messages.append(message)

    def watch(websocket) -> None:  # type: ignore[no-untyped-def]
        websocket.on("framesent", on_sent)
        websocket.on("framereceived", lambda payload: received.append(len(payload)))

    page.on("websocket", watch)
    page.select_option("#resolution", "256")  # a new connection, now observed
    wait_settled(page)
    assert [message.type for message in messages][:2] == ["hello", "canvas"]  # a full canvas first
    messages.clear()
    stroke(page, [(0.45, 0.45), (0.5, 0.5)])  # a small stroke: small patches, no full canvas
    wait_settled(page)
    assert messages and all(isinstance(message, CanvasDelta) for message in messages)
    for message in messages:
        for patch in message.patches:
            width, height = read_dimensions(patch.image.format, patch.image.data)
            assert width * height < 256 * 256 / 8, (width, height)

    # With the webcam on, every send waits for frames: never more than two inputs ahead.
    messages.clear()
    received.clear()
    page.click("#camera")
    page.wait_for_function("Number(document.querySelector('#output').dataset.frames) > 0")
    frames_before = int(page.get_attribute("#output", "data-frames"))
    page.wait_for_function(f"Number(document.querySelector('#output').dataset.frames) > {frames_before + 6}")
    page.click("#camera")
    inputs = [message for message in messages if isinstance(message, Canvas)]
    frames = [size for size in received if size > 200]  # frames, not stats or pongs
    assert inputs and len(inputs) <= len(frames) + 2, (len(inputs), len(frames))
    assert page.locator("#stat-fps").inner_text() != "–"
    assert page.locator("#stat-latency").inner_text().endswith("ms")


def test_undo_restores_the_canvas_and_the_frame(page: Page) -> None:
    stroke(page, [(0.1, 0.5), (0.9, 0.5)])
    wait_settled(page)
    before = hashes(page)
    page.click("[data-tool=rect]")
    stroke(page, [(0.3, 0.3), (0.7, 0.8)])
    wait_settled(page)
    assert hashes(page) != before
    page.locator("#draw").focus()
    page.keyboard.press("Control+z")
    wait_settled(page)
    # The server got back exactly the earlier canvas, so it renders exactly the earlier frame.
    assert hashes(page) == before
    page.keyboard.press("Control+Shift+z")
    wait_settled(page)
    assert hashes(page)[0] != before[0]
    for key, tool in [("e", "eraser"), ("l", "line"), ("o", "ellipse"), ("b", "brush")]:
        page.keyboard.press(key)
        assert page.get_attribute(f"[data-tool={tool}]", "aria-pressed") == "true"


def test_every_tool_changes_the_drawing(page: Page) -> None:
    for tool, points in [
        ("brush", [(0.1, 0.1), (0.3, 0.2)]),
        ("line", [(0.1, 0.9), (0.9, 0.1)]),
        ("rect", [(0.2, 0.6), (0.4, 0.8)]),
        ("ellipse", [(0.6, 0.6), (0.9, 0.9)]),
        ("fill", [(0.05, 0.95)]),
        ("eraser", [(0.1, 0.9), (0.9, 0.1)]),
    ]:
        before = page.evaluate(DRAWING_HASH)
        page.click(f"[data-tool={tool}]")
        stroke(page, points)
        assert page.evaluate(DRAWING_HASH) != before, tool
    # The picker takes the colour under the pointer (the fill put the brush colour there).
    page.click("[data-tool=picker]")
    stroke(page, [(0.95, 0.95)])
    assert page.input_value("#color") == "#1f4fbf"
    assert page.get_attribute("[data-tool=brush]", "aria-pressed") == "true"
    wait_settled(page)


def test_layers_and_an_image_file(page: Page, tmp_path: Path) -> None:
    base = page.evaluate(DRAWING_HASH)
    page.click("#add-layer")
    assert page.locator("#layers li").count() == 2
    stroke(page, [(0.2, 0.2), (0.8, 0.8)])
    drawn = page.evaluate(DRAWING_HASH)
    assert drawn != base
    top = page.locator("#layers li").first
    top.locator("input[type=checkbox]").uncheck()  # hide the new layer
    assert page.evaluate(DRAWING_HASH) == base
    top.locator("input[type=checkbox]").check()
    assert page.evaluate(DRAWING_HASH) == drawn
    page.click("#layer-down")  # the stroke layer goes under the background and disappears
    assert page.evaluate(DRAWING_HASH) == base
    page.click("#layer-up")
    assert page.evaluate(DRAWING_HASH) == drawn
    top.locator("input[type=range]").fill("50")
    assert page.evaluate(DRAWING_HASH) not in (base, drawn)
    # The slider follows a drag and keys: each change used to rebuild the list, dropping the slider
    # under the pointer after its first step (a drag from the middle to a quarter stopped at 0.46).
    slider = top.locator("input[type=range]")
    box = slider.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    dragged = page.evaluate("streamcanvas.doc.layers.at(-1).opacity")
    assert 0.1 < dragged < 0.4, dragged
    slider.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    assert page.evaluate("streamcanvas.doc.layers.at(-1).opacity") == pytest.approx(dragged + 0.05)
    assert page.evaluate("document.activeElement.type") == "range"

    picture = tmp_path / "stripes.png"
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::8] = (250, 120, 0)
    Image.fromarray(stripes).save(picture)
    before_image = page.evaluate(DRAWING_HASH)
    page.set_input_files("#image-file", str(picture))
    page.wait_for_function(f"({DRAWING_HASH})() !== {before_image}")
    # Dropping a file on the canvas does the same (a DataTransfer built in the page, as a drag would).
    before_drop = page.evaluate(DRAWING_HASH)
    page.evaluate(
        """async (bytes) => {
            const file = new File([new Uint8Array(bytes)], 'dropped.png', { type: 'image/png' });
            const transfer = new DataTransfer();
            transfer.items.add(file);
            document.querySelector('#draw').parentElement.dispatchEvent(
                new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        list(png_bytes(np.full((32, 48, 3), (20, 200, 90), np.uint8))),
    )
    page.wait_for_function(f"({DRAWING_HASH})() !== {before_drop}")
    page.click("#remove-layer")
    assert page.locator("#layers li").count() == 1
    wait_settled(page)


def test_webcam_and_screen_are_live_layers(page: Page) -> None:
    wait_settled(page)
    page.click("#camera")
    page.wait_for_function("streamcanvas.sources.isOn('camera')")
    assert page.get_attribute("#camera", "aria-pressed") == "true"
    assert "Camera (live)" in page.locator("#layers").inner_text()
    assert "fake" in page.evaluate("streamcanvas.sources.label('camera')")
    # The video is what the server gets, not hidden under the white paper (as it was), and strokes go
    # over it: on a new layer above it, since the one being painted on was the paper.
    assert page.locator("#layers li .name").all_inner_texts() == ["Drawing", "Camera (live)", "Background"]
    page.wait_for_function("(() => { const d = document.querySelector('#draw').getContext('2d').getImageData(0, 0, 128, 128).data;"
                           " let coloured = 0; for (let i = 0; i < d.length; i += 4) coloured += d[i] + d[i + 1] + d[i + 2] < 600;"
                           " return coloured > 128 * 128 / 2; })()")
    page.fill("#color", "#000000")
    stroke(page, [(0.1, 0.5), (0.9, 0.5)])
    assert max(page.evaluate("streamcanvas.doc.pixelAt(64, 64)")) < 40  # the stroke, black, over the video
    # The camera keeps sending frames by itself; the AI output keeps answering newer inputs.
    first = int(page.get_attribute("#output", "data-input-seq") or 0)
    page.wait_for_function(f"Number(document.querySelector('#output').dataset.inputSeq) > {first + 3}")
    page.click("#screen")  # switch sources without reloading
    page.wait_for_function("streamcanvas.sources.isOn('screen')")
    page.click("#camera")
    page.wait_for_function("!streamcanvas.sources.isOn('camera')")
    assert "Camera" not in page.locator("#layers").inner_text()
    latest = int(page.get_attribute("#output", "data-input-seq") or 0)
    page.wait_for_function(f"Number(document.querySelector('#output').dataset.inputSeq) > {latest + 2}")
    page.click("#screen")
    page.wait_for_function("!streamcanvas.sources.isOn('screen')")
    assert page.locator("#layers li .name").all_inner_texts() == ["Drawing", "Background"]


def test_a_server_error_is_shown_in_words(page: Page) -> None:
    page.fill("#prompt", "x" * 2500)  # over the server's 2000-character limit
    error = page.locator("#errors li[data-code=invalid_value]")
    error.wait_for()
    assert "prompt" in error.inner_text() and "2000" in error.inner_text()
    assert page.locator("#status").get_attribute("data-state") == "ready"  # the session goes on
    page.fill("#prompt", "a short prompt")
    wait_settled(page)


def test_save_png(page: Page) -> None:
    wait_settled(page)
    with page.expect_download() as download:
        page.click("#save")
    data = Path(download.value.path()).read_bytes()
    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).size == (SIZE, SIZE)


def record_three_strokes(page: Page) -> Locator:
    """Record while three strokes are drawn; the download link the page shows when it stops."""
    wait_settled(page)
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').getAttribute('aria-pressed') === 'true'")
    for index in range(3):
        stroke(page, [(0.1 + index * 0.2, 0.2), (0.2 + index * 0.2, 0.8)])
        wait_settled(page)
    page.click("#record")
    link = page.locator("#recording-link")
    link.wait_for()
    return link


def test_record_the_output_and_download_it(page: Page) -> None:
    link = record_three_strokes(page)
    assert "frames" in link.inner_text()
    with page.expect_download() as download:
        link.click()
    with av.open(download.value.path()) as container:
        frames = list(container.decode(video=0))
    assert len(frames) >= 3 and frames[0].width == SIZE


def test_render_the_canvas_at_full_quality(page: Page) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    stroke(page, [(0.2, 0.2), (0.8, 0.7)])
    wait_settled(page)
    page.click("#render-hd")
    link = page.locator("#render-hd-link")
    link.wait_for()
    assert page.locator("#render-hd-status").inner_text() == "Done"
    with page.expect_download() as download:
        link.click()
    image = Image.open(download.value.path())
    assert image.size == (SIZE, SIZE)
    embedded = json.loads(image.text["streamcanvas"])
    assert embedded["kind"] == "live_session" and embedded["prompt"] == "a lighthouse at dusk"
    assert embedded["seed"] == int(page.input_value("#seed")) and embedded["steps"] == 25
    assert f"seed {embedded['seed']}" in link.inner_text()


def canvas_pixels(page: Page, selector: str) -> np.ndarray:
    data = page.evaluate(f"document.querySelector('{selector}').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGBA"))


def test_a_painted_mask_limits_the_full_quality_render_to_it(page: Page) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    page.click("[data-tool=brush]")
    stroke(page, [(0.1, 0.5), (0.9, 0.55)])
    wait_settled(page)
    before = page.evaluate(DRAWING_HASH)
    page.click("[data-tool=mask]")
    stroke(page, [(0.3, 0.25), (0.7, 0.25)])
    assert page.evaluate(DRAWING_HASH) == before  # the mask is not part of the picture (nor sent as one)
    assert page.is_visible("#clear-mask")
    overlay = canvas_pixels(page, "#mask-overlay")
    tinted_rows = np.nonzero(overlay[..., 3].any(axis=1))[0]
    assert tinted_rows.size and tinted_rows.max() < SIZE * 0.45  # shown where it was painted
    drawing = canvas_pixels(page, "#draw")[..., :3]
    page.click("#render-hd")
    link = page.locator("#render-hd-link")
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    image = Image.open(download.value.path())
    embedded = json.loads(image.text["streamcanvas"])
    assert embedded["kind"] == "live_session" and embedded["mask_blur"] == 4
    result = np.asarray(image.convert("RGB")).astype(int)
    # Below the mask (past its blur) the render *is* the drawing; under it, it was painted anew.
    kept = slice(int(SIZE * 0.45) + 13, SIZE)
    assert np.array_equal(result[kept], drawing[kept])
    under = result[tinted_rows.min() : tinted_rows.max() + 1, int(SIZE * 0.35) : int(SIZE * 0.65)]
    assert np.abs(under - drawing[tinted_rows.min() : tinted_rows.max() + 1, int(SIZE * 0.35) : int(SIZE * 0.65)]).mean() > 3.0
    page.click("#clear-mask")
    assert not canvas_pixels(page, "#mask-overlay")[..., 3].any() and page.is_hidden("#clear-mask")


def test_resolution_change_reconnects_at_the_new_size(page: Page) -> None:
    stroke(page, [(0.3, 0.3), (0.6, 0.6)])
    wait_settled(page)
    drawn = canvas_pixels(page, "#draw")
    page.select_option("#resolution", "256")
    page.wait_for_function("document.querySelector('#output').naturalWidth === 256")
    wait_settled(page)
    assert page.evaluate("streamcanvas.doc.width") == 256
    # Back to the size before with nothing drawn in between: the very same pixels and the undo history
    # (scaling up and down again blurred every stroke and dropped the history).
    page.select_option("#resolution", str(SIZE))
    page.wait_for_function(f"document.querySelector('#output').naturalWidth === {SIZE}")
    wait_settled(page)
    assert np.array_equal(canvas_pixels(page, "#draw"), drawn)
    assert not page.is_disabled("#undo")
    # Drawn on at the new size, the picture is scaled when the size changes back.
    page.select_option("#resolution", "256")
    page.wait_for_function("document.querySelector('#output').naturalWidth === 256")
    stroke(page, [(0.7, 0.2), (0.9, 0.4)])
    page.select_option("#resolution", str(SIZE))
    page.wait_for_function(f"document.querySelector('#output').naturalWidth === {SIZE}")
    wait_settled(page)
    assert not np.array_equal(canvas_pixels(page, "#draw"), drawn) and page.is_disabled("#undo")


@pytest.mark.parametrize(("asked", "side", "noted"), [("abc", SIZE, True), ("0", SIZE, True), ("2048", SIZE, True), ("200", 200, False)])
def test_a_resolution_in_the_address_is_used_only_if_the_server_takes_it(
    browser: Browser, web_server: ServerProcess, asked: str, side: int, noted: bool
) -> None:
    """?resolution=abc or 0 threw on the page and left it on "Connecting…"; one over the server's
    maximum (1024 here) left it refused. Such an address now gets the server's size and a note."""
    with own_page(browser, viewport={"width": 1280, "height": 900}) as (page, errors):
        page.goto(f"{web_server.base_url}/?resolution={asked}&codec=png")
        wait_ready(page)
        ready = page.evaluate("[streamcanvas.connection.ready.width, streamcanvas.connection.ready.height]")
        assert ready == [side, side] and page.input_value("#resolution") == str(side)
        notes = page.locator("#errors li.note").all_inner_texts()
        assert any(f"?resolution={asked} is not a size" in note for note in notes) == noted, notes
        assert not errors


def test_narrow_screens_stack_the_panes(page: Page) -> None:
    wide = [page.locator(".pane").nth(index).bounding_box() for index in (0, 1)]
    assert wide[0]["y"] == wide[1]["y"] and wide[0]["x"] < wide[1]["x"]
    page.set_viewport_size({"width": 420, "height": 900})
    narrow = [page.locator(".pane").nth(index).bounding_box() for index in (0, 1)]
    assert narrow[1]["y"] > narrow[0]["y"] + narrow[0]["height"] - 1


def test_a_finger_draws_on_a_touch_screen(browser: Browser, web_server: ServerProcess, artifacts_dir: Path) -> None:
    context = browser.new_context(viewport={"width": 420, "height": 900}, has_touch=True, is_mobile=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_page(page, web_server)
        before = page.evaluate(DRAWING_HASH)
        box = page.locator("#draw").bounding_box()
        touch = context.new_cdp_session(page)
        points = [(box["x"] + 30 + step * 12, box["y"] + 40 + step * 9) for step in range(10)]
        for index, (x, y) in enumerate(points):
            kind = "touchStart" if index == 0 else "touchMove"
            touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
        touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        page.wait_for_function(f"({DRAWING_HASH})() !== {before}")
        wait_settled(page)
        page.screenshot(path=str(artifacts_dir / "browser-touch-narrow.png"))
    finally:
        context.close()


restartable_server = server_fixture("restartable_server")


def test_reconnects_and_resumes_after_the_server_restarts(
    browser: Browser, restartable_server: ServerProcess, artifacts_dir: Path
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_page(page, restartable_server)
        page.fill("#prompt", "a boat on a lake")
        page.fill("#seed", "77")
        page.dispatch_event("#seed", "change")
        stroke(page, [(0.2, 0.7), (0.5, 0.3), (0.8, 0.7)])
        wait_settled(page)
        before = hashes(page)

        restartable_server.process.send_signal(signal.SIGKILL)
        restartable_server.process.wait(10)
        page.wait_for_function("['waiting', 'reconnecting'].includes(document.querySelector('#status').dataset.state)")
        page.screenshot(path=str(artifacts_dir / "browser-disconnected.png"))
        assert "reconnecting" in page.locator("#status").inner_text().lower()

        restartable_server.start()
        wait_ready(page)
        wait_settled(page)
        # Canvas, prompt and seed were restored on the new server: the very same frame comes back.
        assert hashes(page) == before
    finally:
        page.screenshot(path=str(artifacts_dir / "browser-reconnected.png"))
        context.close()


def test_waiting_in_line_is_shown_and_ends_when_the_slot_frees(
    browser: Browser, restartable_server: ServerProcess
) -> None:
    """The restartable server has one slot: a second page waits in line, then goes live."""
    first_context = browser.new_context()
    second_context = browser.new_context()
    try:
        first = first_context.new_page()
        open_page(first, restartable_server)
        second = second_context.new_page()
        second.goto(f"{restartable_server.base_url}/?resolution={SIZE}&codec=png")
        second.wait_for_function("document.querySelector('#status').dataset.state === 'busy'")
        assert "position 1 in line" in second.locator("#status").inner_text()
        first_context.close()
        wait_ready(second)
        wait_settled(second)
    finally:
        second_context.close()


def test_the_viewer_link_outlives_a_reconnect(page: Page, browser: Browser) -> None:
    """A new resolution means a new session; the page resumes its old one (hello.resume), so the viewer
    link an OBS scene holds goes on showing the output, now at the new size (it used to go dead)."""
    page.wait_for_function("!document.querySelector('#viewer-link').disabled")
    session_id = page.evaluate("streamcanvas.connection.ready.session_id")
    with own_page(browser) as (obs, _):
        obs.goto(page.input_value("#viewer-url"))
        page.click("#camera")  # the camera keeps frames coming
        obs.wait_for_function(f"document.querySelector('#output').naturalWidth === {SIZE}")
        page.select_option("#resolution", str(SIZE * 2))
        page.wait_for_function(f"streamcanvas.connection.ready?.width === {SIZE * 2}")
        assert page.evaluate("[streamcanvas.connection.ready.session_id, streamcanvas.connection.ready.resumed]") == [session_id, True]
        obs.wait_for_function(f"document.querySelector('#output').naturalWidth === {SIZE * 2}")
        page.click("#camera")


full_server = server_fixture("full_server", "--max-waiting", "0")  # one slot, no room in line: "busy"


def test_a_full_server_is_shown_as_busy_until_it_said_to_retry(browser: Browser, full_server: ServerProcess) -> None:
    """The "Server busy — retrying in 5s" text used to give way at once to "Disconnected — reconnecting
    in 1s" (the socket's close), and the page came back on its own backoff, not when the server said."""
    with own_page(browser) as (second, _):
        with own_page(browser) as (first, _):
            open_page(first, full_server)
            second.goto(f"{full_server.base_url}/?resolution={SIZE}&codec=png")
            second.wait_for_function("document.querySelector('#status').dataset.state === 'busy'")
            second.evaluate("""() => { window.shown = [];
                new MutationObserver(() => window.shown.push(document.querySelector('#status').textContent))
                    .observe(document.querySelector('#status'), { childList: true, characterData: true, subtree: true }); }""")
            second.wait_for_timeout(2000)
            assert second.locator("#status").inner_text() == "Server busy — retrying in 5s"
            assert not [text for text in second.evaluate("window.shown") if "Disconnected" in text]
        wait_ready(second)  # the first page has gone: the next try, at most 5 s on, gets the slot


quick_idle_server = server_fixture("quick_idle_server", "--idle-timeout", "3")


def test_a_hidden_tab_gives_its_slot_up_until_it_is_shown(browser: Browser, quick_idle_server: ServerProcess) -> None:
    """A page in view keeps its session, pinging within the server's idle timeout (its pings came every
    30 s, so a timeout under that ended it); a hidden one idles out and waits, holding no slot, until
    it is shown again (it used to reconnect at once, again and again, keeping the only slot)."""
    with own_page(browser) as (page, _):
        open_page(page, quick_idle_server)
        session = page.evaluate("streamcanvas.connection.ready.session_id")
        page.wait_for_timeout(5000)
        assert page.evaluate("[streamcanvas.connection.state, streamcanvas.connection.ready.session_id]") == ["ready", session]
        page.evaluate("""() => { Object.defineProperty(document, 'visibilityState', { value: 'hidden', configurable: true });
                                 document.dispatchEvent(new Event('visibilitychange')); }""")
        page.wait_for_function("document.querySelector('#status').dataset.state === 'paused'")
        page.wait_for_timeout(2000)
        assert page.evaluate("streamcanvas.connection.state") == "paused" and quick_idle_server.info()["sessions"] == 0
        assert "reconnects when you come back" in page.locator("#status").inner_text()
        page.evaluate("""() => { Object.defineProperty(document, 'visibilityState', { value: 'visible', configurable: true });
                                 document.dispatchEvent(new Event('visibilitychange')); }""")
        wait_ready(page)
        # The same session again (resumed: viewer links still work), after holding no slot meanwhile.
        assert page.evaluate("[streamcanvas.connection.ready.session_id, streamcanvas.connection.ready.resumed]") == [session, True]


def test_the_viewer_link_opens_the_obs_page(page: Page, browser: Browser, artifacts_dir: Path) -> None:
    page.wait_for_function("!document.querySelector('#viewer-link').disabled")
    link = page.input_value("#viewer-url")
    session_id = page.evaluate("streamcanvas.connection.ready.session_id")
    assert f"session={session_id}" in link and "token=" in link
    obs_context = browser.new_context(viewport={"width": 640, "height": 360})
    obs = obs_context.new_page()
    obs.set_default_timeout(TIMEOUT_MS)
    try:
        obs.goto(link)
        page.click("#camera")  # the camera keeps frames coming
        obs.wait_for_function("Number(document.querySelector('#output').dataset.frames) >= 3")
        # Full-bleed on a transparent page, no controls, following the source's size.
        assert obs.evaluate("getComputedStyle(document.body).backgroundColor") == "rgba(0, 0, 0, 0)"
        assert obs.locator("button, input, select").count() == 0
        assert obs.locator("#output").bounding_box() == {"x": 0, "y": 0, "width": 640, "height": 360}
        obs.set_viewport_size({"width": 300, "height": 500})
        assert obs.locator("#output").bounding_box() == {"x": 0, "y": 0, "width": 300, "height": 500}
        obs.screenshot(path=str(artifacts_dir / "browser-obs-page.png"))
        # A plain <img> plays the MJPEG stream too.
        mjpeg = page.get_attribute("#viewer-url", "data-mjpeg")
        plain = obs_context.new_page()
        plain.goto(mjpeg.split("/v1/")[0] + "/healthz")  # any page of the server's origin
        plain.evaluate("(url) => { const img = document.createElement('img'); img.src = url; document.body.append(img); }", mjpeg)
        plain.wait_for_function(f"document.querySelector('img').naturalWidth === {SIZE}")
        plain.close()
        # When the session ends, the page keeps trying on its own.
        page.click("#camera")
        attempts = int(obs.get_attribute("#output", "data-attempts"))
        page.evaluate("streamcanvas.connection.close()")
        obs.wait_for_function(f"Number(document.querySelector('#output').dataset.attempts) > {attempts}")
    finally:
        obs_context.close()


TOKEN_TTL_S = 3


short_tokens_server = server_fixture("short_tokens_server", scope="module", env={"STREAMCANVAS_TOKEN_TTL_S": str(TOKEN_TTL_S)})


def test_links_made_after_the_tokens_expired_still_work(browser: Browser, short_tokens_server: ServerProcess) -> None:
    """A session open for longer than the token lifetime: the viewer link, a recording's download and a
    full-quality render ask for new tokens (renew_tokens) when they are used, instead of handing out the
    expired ones from `ready` (401)."""
    with own_page(browser, viewport={"width": 1280, "height": 900}, accept_downloads=True) as (page, errors):
        open_page(page, short_tokens_server)
        first_link = page.input_value("#viewer-url")
        first_mjpeg = page.get_attribute("#viewer-url", "data-mjpeg")
        link = record_three_strokes(page)
        page.wait_for_timeout(TOKEN_TTL_S * 1000 + 500)  # every token the page has is now expired

        assert httpx.get(first_mjpeg, timeout=5).status_code == 401
        assert httpx.get(page.evaluate("document.querySelector('#recording-link').href"), timeout=5).status_code == 401
        page.click("#viewer-link")
        page.wait_for_function(f"document.querySelector('#viewer-url').value !== {json.dumps(first_link)}")
        with httpx.stream("GET", page.get_attribute("#viewer-url", "data-mjpeg"), timeout=10) as viewer:
            assert viewer.status_code == 200 and viewer.headers["content-type"].startswith("multipart/x-mixed-replace")

        page.wait_for_timeout(TOKEN_TTL_S * 1000 + 500)  # and the renewed ones too
        with page.expect_download() as download:
            link.click()
        assert download.value.failure() is None
        with av.open(download.value.path()) as container:
            assert len(list(container.decode(video=0))) >= 3

        page.wait_for_timeout(TOKEN_TTL_S * 1000 + 500)
        page.click("#render-hd")
        page.locator("#render-hd-link").wait_for()
        assert page.locator("#render-hd-status").inner_text() == "Done"
        assert not errors
