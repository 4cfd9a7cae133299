"""The queue's image jobs beyond txt2img/img2img: inpainting, outpainting, upscaling and the hires fix,
over /v1/jobs and the A1111 routes that call for them, on the shared server and its trained toy model."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from batch_helpers import Jobs, png_base64
from conftest import TEST_RESOLUTION
from helpers import ServerProcess, make_canvas
from streamcanvas.batch_fallback.upscaling import tile_count, tiled
from streamcanvas.pipelines.super_resolution import SuperResolution

SIZE = TEST_RESOLUTION
QUICK = {"prompt": "a red house", "steps": 4, "scheduler": "euler", "seed": 21}


@pytest.fixture
def jobs(server: ServerProcess) -> Iterator[Jobs]:
    client = Jobs(server.base_url)
    yield client
    client.close()


def finished(jobs: Jobs, kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    job = jobs.wait(jobs.create(kind, params)["id"])
    assert job["status"] == "finished", job
    return job, [np.asarray(jobs.image(result["url"]).convert("RGB")) for result in job["results"]]


def square_mask(size: int, low: int, high: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[low:high, low:high] = 255
    return mask


def test_inpainting_repaints_inside_the_mask_and_keeps_every_pixel_outside(jobs: Jobs) -> None:
    canvas = make_canvas(SIZE, 4)
    mask = square_mask(SIZE, SIZE // 4, 3 * SIZE // 4)
    blur = 4
    reach = 3 * blur + 1  # beyond this the blurred mask is 0
    outside = np.ones((SIZE, SIZE), dtype=bool)
    outside[SIZE // 4 - reach : 3 * SIZE // 4 + reach, SIZE // 4 - reach : 3 * SIZE // 4 + reach] = False
    inside = square_mask(SIZE, SIZE // 4 + reach, 3 * SIZE // 4 - reach) > 0
    renders = {}
    for fill in ("original", "latent_nothing"):
        _, (image,) = finished(jobs, "inpaint", {**QUICK, "image": png_base64(canvas), "mask": png_base64(mask), "mask_blur": blur, "inpainting_fill": fill})
        assert image.shape == canvas.shape
        assert np.array_equal(image[outside], canvas[outside]), fill  # the input's own pixels
        assert np.abs(image[inside].astype(int) - canvas[inside]).mean() > 5.0, fill
        renders[fill] = image
    assert np.abs(renders["original"][inside].astype(int) - renders["latent_nothing"][inside]).mean() > 2.0  # what the area starts as matters
    # The mask inverted: now the middle is kept and the border repainted.
    _, (inverted,) = finished(jobs, "inpaint", {**QUICK, "image": png_base64(canvas), "mask": png_base64(mask), "mask_blur": blur, "invert_mask": True})
    assert np.array_equal(inverted[inside], canvas[inside])

    refused = jobs.create("inpaint", {**QUICK, "image": png_base64(canvas), "mask": png_base64(np.zeros((SIZE, SIZE), np.uint8))}, expect=422)
    assert refused["field"] == "params.mask" and "empty" in refused["message"]
    refused = jobs.create("inpaint", {**QUICK, "image": png_base64(canvas), "mask": "bm90IGFuIGltYWdl"}, expect=422)
    assert refused["field"] == "params.mask"


def test_outpainting_extends_the_canvas_and_keeps_the_original(jobs: Jobs) -> None:
    canvas = make_canvas(SIZE, 5)
    job, (image,) = finished(jobs, "outpaint", {**QUICK, "image": png_base64(canvas), "right": 64, "top": 32, "mask_blur": 4})
    assert image.shape == (SIZE + 32, SIZE + 64, 3) and job["params"]["width"] == SIZE + 64
    kept = image[32 + 13 : 32 + SIZE, : SIZE - 13]
    assert np.array_equal(kept, canvas[13:, : SIZE - 13])
    border = np.repeat(canvas[:, -1:], 64, axis=1)  # what a plain edge stretch would give
    assert np.abs(image[32 + 13 :, SIZE + 13 :].astype(int) - border[13:, 13:]).mean() > 3.0
    assert jobs.create("outpaint", {**QUICK, "image": png_base64(canvas)}, expect=422)["field"] == "params.left"


def test_upscaling_resamples_exactly_and_the_hires_pass_runs_in_tiles(jobs: Jobs) -> None:
    canvas = make_canvas(SIZE, 6)
    _, (lanczos,) = finished(jobs, "upscale", {"image": png_base64(canvas), "scale": 2.0})
    expected = np.asarray(Image.fromarray(canvas).resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS))
    assert np.array_equal(lanczos, expected)
    _, (nearest,) = finished(jobs, "upscale", {"image": png_base64(canvas), "scale": 4.0, "upscaler": "nearest"})
    assert np.array_equal(nearest, np.repeat(np.repeat(canvas, 4, axis=0), 4, axis=1))

    hires = {"scale": 2.0, "strength": 0.3, "steps": 10, "prompt": "a red house", "seed": 3, "tile": 128, "overlap": 32, "guidance_scale": 2.0}
    job, (refined,) = finished(jobs, "upscale", {"image": png_base64(canvas), **hires})
    # One step of resampling, then 256 px in 128 px tiles with at least 32 px overlap: 3 × 3 tiles, each
    # 3 steps (10 × 0.3), counted after it.
    assert job["progress"] == {"step": 28, "steps": 28}
    assert refined.shape == expected.shape and np.abs(refined.astype(int) - expected).mean() > 1.0  # repainted
    # The tiles are blended: the picture changes no faster across the tiles' edges (96, 128, 224 …) than elsewhere.
    steps_x = np.abs(np.diff(refined.astype(int), axis=1)).mean(axis=(0, 2))
    steps_y = np.abs(np.diff(refined.astype(int), axis=0)).mean(axis=(1, 2))
    for edges, profile in (((95, 127, 223), steps_x), ((95, 127, 223), steps_y)):
        assert max(profile[edge] for edge in edges) < 3 * np.median(profile), (edges, profile[list(edges)], np.median(profile))
    # And it is a repaint of this picture: what differs from a repaint of another is where the two differ.
    other = make_canvas(SIZE, 16)
    _, (refined_other,) = finished(jobs, "upscale", {"image": png_base64(other), **hires})
    upscaled_other = np.asarray(Image.fromarray(other).resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS))
    change = np.corrcoef((refined.astype(float) - refined_other).mean(axis=-1).ravel(), (expected.astype(float) - upscaled_other).mean(axis=-1).ravel())[0, 1]
    assert change > 0.25, change
    refused = jobs.create("upscale", {"image": png_base64(make_canvas(1024, 1)), "scale": 4.0}, expect=422)
    assert refused["field"] == "params.scale" and "scale 4 makes the width 4096, over the maximum" in refused["message"]
    refused = jobs.create("upscale", {"image": png_base64(canvas), "width": 4096, "height": SIZE}, expect=422)
    assert refused["field"] == "params.width"
    refused = jobs.create("upscale", {"image": png_base64(canvas), "strength": 0.3, "controls": [{"model": "scribble"}]}, expect=422)
    assert refused["field"] == "params.controls"


def test_upscales_come_at_exactly_the_size_asked_for(jobs: Jobs) -> None:
    """As A1111's extras: round(side × scale), or any width × height; no multiple of 8 needed."""
    source = make_canvas(100, 8)[:60]  # 100 × 60
    image = Image.fromarray(source)
    for params, size in (({"scale": 2.5}, (250, 150)), ({"scale": 1.0}, (100, 60)), ({"width": 301, "height": 75}, (301, 75))):
        job = jobs.wait(jobs.create("upscale", {"image": png_base64(source), **params})["id"])
        assert job["status"] == "finished", job
        result = jobs.image(job["results"][0]["url"])
        assert result.size == size, params
        assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image))
        # A plain resample is described as A1111's extras describe one: no diffusion settings.
        assert "parameters" not in result.text, result.text
        expected = "Postprocess upscale by: 2.5" if params.get("scale") == 2.5 else "Postprocess upscale by: 1" if "scale" in params else "Postprocess upscale to: 301x75"
        assert result.text["postprocessing"] == f"{expected}, Postprocess upscaler: Lanczos"
    # The hires pass repaints at the next multiple of 8 up (152 × 96: 2 tiles of 128 px) and gives the size asked for.
    job = jobs.wait(jobs.create("upscale", {"image": png_base64(source), "scale": 1.5, "strength": 0.3, "steps": 10, "prompt": "a red house",
                                            "seed": 4, "tile": 128, "overlap": 32})["id"])
    assert job["status"] == "finished", job
    assert job["progress"] == {"step": 1 + tile_count(152, 96, 128, 32) * 3, "steps": 1 + tile_count(152, 96, 128, 32) * 3} == {"step": 7, "steps": 7}
    repainted = jobs.image(job["results"][0]["url"])
    assert repainted.size == (150, 90) and "Denoising strength: 0.3" in repainted.text["parameters"]
    plain = np.asarray(image.resize((150, 90), Image.Resampling.LANCZOS))
    assert np.abs(np.asarray(repainted.convert("RGB")).astype(int) - plain).mean() > 1.0


@pytest.fixture(scope="module")
def networks(upscaler_dirs: dict[str, Path]) -> dict[str, SuperResolution]:
    """The shared server's upscalers (`--upscaler sr2=… --upscaler sr4=…`), loaded here too."""
    return {name: SuperResolution(path, torch.device("cpu"), torch.float32) for name, path in upscaler_dirs.items()}


def test_tiles_are_placed_and_blended_exactly_at_every_scale() -> None:
    """With a painter that upscales each tile by repeating pixels, the tiled whole is the image upscaled
    the same way, to the last bit: every tile lands where it belongs and the ramps add up to 1."""
    image = make_canvas(200, 3)[:, :168]
    for scale in (1, 2, 4):
        seen: list[tuple[int, int]] = []

        def paint(piece: np.ndarray, index: int, total: int) -> np.ndarray:
            seen.append((index, total))
            return np.repeat(np.repeat(piece, scale, axis=0), scale, axis=1)

        assert np.array_equal(tiled(image, 64, 16, scale, paint), np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)), scale
        assert seen == [(index, 16) for index in range(16)]  # 200 × 168 in 64 px tiles: 4 × 4


def test_a_super_resolution_network_upscales_tile_by_tile(jobs: Jobs, networks: dict[str, SuperResolution]) -> None:
    canvas = make_canvas(2 * SIZE, 8)  # 256²: 2 × 2 tiles of 192 px
    job, (image,) = finished(jobs, "upscale", {"image": png_base64(canvas), "scale": 2.0, "upscaler": "sr2"})
    whole = networks["sr2"].upscale_tile(canvas)  # the network over the whole picture at once
    assert image.shape == whole.shape == (4 * SIZE, 4 * SIZE, 3)
    assert job["progress"] == {"step": 4, "steps": 4}
    assert np.abs(image.astype(int) - whole).mean() < 0.5  # measured 0.02: float rounding (tiles are other matrix shapes)
    lanczos = np.asarray(Image.fromarray(canvas).resize(image.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(image.astype(int) - lanczos).mean() > 20  # the network's picture, not a resampler's

    # x4 from the x2 network: two passes (one tile, then four); x2 from the x4 network: its x4, resampled down.
    small = make_canvas(SIZE, 9)
    job, (four,) = finished(jobs, "upscale", {"image": png_base64(small), "scale": 4.0, "upscaler": "sr2"})
    assert four.shape == (4 * SIZE, 4 * SIZE, 3) and job["progress"] == {"step": 5, "steps": 5}
    assert np.abs(four.astype(int) - networks["sr2"].upscale_tile(networks["sr2"].upscale_tile(small))).mean() < 0.5
    _, (two,) = finished(jobs, "upscale", {"image": png_base64(small), "scale": 2.0, "upscaler": "sr4"})
    down = np.asarray(Image.fromarray(networks["sr4"].upscale_tile(small)).resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS))
    assert two.shape == down.shape and np.abs(two.astype(int) - down).mean() < 0.5

    refused = jobs.create("upscale", {"image": png_base64(small), "upscaler": "R-ESRGAN 4x+"}, expect=422)
    assert refused["field"] == "params.upscaler" and "lanczos" in refused["message"] and "sr2, sr4" in refused["message"]
    # A 1200 px picture through the x4 network would be 4800 px on the way, over twice the 2048 px batch limit.
    refused = jobs.create("upscale", {"image": png_base64(make_canvas(1200, 2)), "scale": 1.0, "upscaler": "sr4"}, expect=422)
    assert refused["field"] == "params.upscaler" and "4800x4800" in refused["message"]
    refused = jobs.create("txt2img", {**QUICK, "width": SIZE, "height": SIZE, "hires": {"upscaler": "sr3"}}, expect=422)
    assert refused["field"] == "params.hires.upscaler"


def test_the_hires_fix_can_upscale_with_a_network(jobs: Jobs) -> None:
    hires = {"scale": 2.0, "strength": 0.3, "steps": 4, "tile": 128}
    _, (network,) = finished(jobs, "txt2img", {**QUICK, "width": SIZE, "height": SIZE, "hires": {**hires, "upscaler": "sr2"}})
    _, (lanczos,) = finished(jobs, "txt2img", {**QUICK, "width": SIZE, "height": SIZE, "hires": hires})
    assert network.shape == lanczos.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.abs(network.astype(int) - lanczos).mean() > 5.0  # the second pass started from the network's picture


def test_the_hires_fix_renders_at_the_larger_size(jobs: Jobs) -> None:
    created = jobs.create("txt2img", {**QUICK, "width": SIZE, "height": SIZE, "hires": {"scale": 2.0, "strength": 0.4, "steps": 5, "tile": 128}})
    events = jobs.events(created["id"])
    job = jobs.get(created["id"])
    image = np.asarray(jobs.image(job["results"][0]["url"]).convert("RGB"))
    assert image.shape == (2 * SIZE, 2 * SIZE, 3) and job["results"][0]["width"] == 2 * SIZE
    # Progress is one count over the passes, as A1111 counts them: 4 steps of the first render, 1 of
    # the resampling, then 2 (5 steps at strength 0.4) for each tile of the repaint; it never goes back.
    total = 4 + 1 + tile_count(2 * SIZE, 2 * SIZE, 128, 64) * 2
    assert job["progress"] == {"step": total, "steps": total}, job["progress"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and len(steps) > 1, events
    refused = jobs.create("txt2img", {**QUICK, "width": 1024, "height": 1024, "hires": {"scale": 4.0}}, expect=422)
    assert refused["field"] == "params.hires.scale"
    # Tiles overlap by at most half their size (overlap 64 at tile 64 made the 256² pass 626 tiles).
    for kind, params, field in (
        ("txt2img", {**QUICK, "width": SIZE, "height": SIZE, "hires": {"tile": 64, "overlap": 64}}, "params.hires.overlap"),
        ("upscale", {"image": png_base64(make_canvas(SIZE, 1)), "strength": 0.3, "tile": 128, "overlap": 65}, "params.overlap"),
    ):
        refused = jobs.create(kind, params, expect=422)
        assert refused["field"] == field and "more than half the tile" in refused["message"], refused
    # A target size: covering 4096x512 from a square means a 4096x4096 image on the way.
    refused = jobs.create("txt2img", {**QUICK, "width": 512, "height": 512, "hires": {"width": 4096, "height": 512}}, expect=422)
    assert refused["field"] == "params.hires" and "4096x4096" in refused["message"], refused


def _b64(array: np.ndarray) -> str:
    return png_base64(array)


def _decoded(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_the_a1111_routes_for_upscaling_inpainting_and_png_info(jobs: Jobs, networks: dict[str, SuperResolution]) -> None:
    http = jobs.http
    canvas = make_canvas(SIZE, 7)
    upscalers = {entry["name"]: entry for entry in http.get("/sdapi/v1/upscalers").json()}
    assert {"None", "Lanczos", "Nearest", "sr2", "sr4"} <= set(upscalers)
    assert upscalers["sr4"]["scale"] == 4.0 and upscalers["sr2"]["model_name"] == "Swin2SRForImageSuperResolution"
    answer = http.post("/sdapi/v1/extra-single-image", json={"image": _b64(canvas), "upscaling_resize": 2, "upscaler_1": "SR2"}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert np.abs(_decoded(answer.json()["image"]).astype(int) - networks["sr2"].upscale_tile(canvas)).mean() < 0.5
    answer = http.post("/sdapi/v1/extra-single-image", json={"image": _b64(canvas), "upscaling_resize": 2, "upscaler_1": "Nearest"}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert np.array_equal(_decoded(answer.json()["image"]), np.repeat(np.repeat(canvas, 2, axis=0), 2, axis=1))
    assert http.post("/sdapi/v1/extra-single-image", json={"image": _b64(canvas), "upscaler_1": "R-ESRGAN 4x+"}).status_code == 404

    mask = square_mask(SIZE, SIZE // 4, 3 * SIZE // 4)
    answer = http.post(
        "/sdapi/v1/img2img",
        json={"prompt": "a red house", "init_images": [_b64(canvas)], "mask": _b64(mask), "mask_blur": 2, "inpainting_fill": 1,
              "denoising_strength": 0.75, "steps": 4, "seed": 3, "width": SIZE, "height": SIZE},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    painted = _decoded(answer.json()["images"][0])
    assert np.array_equal(painted[:SIZE // 4 - 7], canvas[:SIZE // 4 - 7])
    assert not np.array_equal(painted[SIZE // 2], canvas[SIZE // 2])

    answer = http.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a red house", "steps": 4, "seed": 9, "width": SIZE, "height": SIZE, "enable_hr": True, "hr_scale": 2,
              "hr_upscaler": "Latent", "denoising_strength": 0.5, "hr_second_pass_steps": 4},
        timeout=180,
    )
    assert answer.status_code == 200, answer.text
    image = answer.json()["images"][0]
    assert _decoded(image).shape == (2 * SIZE, 2 * SIZE, 3)
    info = http.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert "Steps: 4" in info["info"] and info["parameters"]["Seed"] == 9 and info["parameters"]["Prompt"] == "a red house"
    assert "streamcanvas" in info["items"]
    # The hires fix is in the text, in A1111's words, so that sending it back asks for the same job;
    # numbers come back as numbers, sizes as their two sides.
    parameters = info["parameters"]
    assert parameters["Hires upscale"] == 2 and parameters["Hires steps"] == 4 and parameters["Denoising strength"] == 0.5
    assert parameters["Hires upscaler"] == "Bilinear"  # what "Latent" is here (see the A1111 table in batch.md)
    assert parameters["CFG scale"] == 7.0 and parameters["Size-1"] == SIZE and "Size" not in parameters
    # A target size of another aspect: scaled to cover it, the middle cropped to it (A1111 does the same);
    # with one side given, the other follows the image's aspect.
    for resize, shape in (({"hr_resize_x": 2 * SIZE, "hr_resize_y": SIZE}, (SIZE, 2 * SIZE, 3)), ({"hr_resize_y": 2 * SIZE}, (2 * SIZE, 2 * SIZE, 3))):
        answer = http.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a red house", "steps": 2, "seed": 9, "width": SIZE, "height": SIZE, "enable_hr": True, **resize,
                  "hr_upscaler": "Lanczos", "denoising_strength": 0.3, "hr_second_pass_steps": 2},
            timeout=180,
        )
        assert answer.status_code == 200, answer.text
        assert _decoded(answer.json()["images"][0]).shape == shape, resize
        written = json.loads(answer.json()["info"])["infotexts"][0]
        assert f"Hires resize: {resize.get('hr_resize_x', 0)}x{resize['hr_resize_y']}, Hires steps: 2, Hires upscaler: Lanczos" in written
    # Exactly the size A1111's extras give: 2.5 × 100 × 60 is 250 × 150; any width and height with resize_mode 1.
    odd = _b64(make_canvas(100, 2)[:60])
    for body, size in (({"upscaling_resize": 2.5}, (150, 250, 3)), ({"resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 300}, (300, 300, 3))):
        answer = http.post("/sdapi/v1/extra-single-image", json={"image": odd, **body}, timeout=120)
        assert answer.status_code == 200 and _decoded(answer.json()["image"]).shape == size, answer.text
    refused = http.post("/sdapi/v1/png-info", json={"image": "bm90"})  # base64 of "not"
    assert refused.status_code == 422 and refused.json()["detail"] == "image: not a readable image (PNG, JPEG or WebP)"
    assert http.get("/sdapi/v1/loras").json() == []


# --- video ---------------------------------------------------------------------------------------------


def make_clip(frames: int = 20, size: int = SIZE, fps: int = 10, audio: bool = True, container: str = "mp4", video_codec: str = "libx264",
              audio_codec: str = "aac", picture: Any = None) -> bytes:
    """A clip made here with PyAV: `picture(index)` (default: a bar sweeping across a gradient), and a
    440 Hz tone."""
    import av

    output = io.BytesIO()
    with av.open(output, "w", format=container) as clip:
        video = clip.add_stream(video_codec, rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        sound = clip.add_stream(audio_codec, rate=48000) if audio else None
        for index in range(frames):
            if picture is not None:
                frame = picture(index)
            else:
                frame = make_canvas(size, 8)
                left = index * size // frames
                frame[:, left : left + size // 8] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                clip.mux(packet)
        for packet in video.encode(None):
            clip.mux(packet)
        if sound is not None:
            samples = 48000 * frames // fps
            wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)[None]
            pcm = audio_codec.startswith("pcm_")
            samples_as = (wave * 32767).astype(np.int16) if pcm else wave.astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(samples_as, format="s16" if pcm else "fltp", layout="mono")
            chunk.sample_rate = 48000
            for packet in sound.encode(chunk):
                clip.mux(packet)
            for packet in sound.encode(None):
                clip.mux(packet)
    return output.getvalue()


def read_clip(data: bytes) -> tuple[list[np.ndarray], list[int], Any, list[bytes], str | None]:
    """Frames, their timestamps, the frame rate, the audio packets and the audio codec."""
    import av

    with av.open(io.BytesIO(data)) as clip:
        video = clip.streams.video[0]
        rate = video.average_rate
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in clip.decode(video)]
    with av.open(io.BytesIO(data)) as clip:
        codec = clip.streams.audio[0].codec_context.name if clip.streams.audio else None
        audio = [bytes(packet) for packet in clip.demux(clip.streams.audio[0]) if packet.size] if clip.streams.audio else []
    return [image for _, image in decoded], [pts for pts, _ in decoded], rate, audio, codec


def video_job(jobs: Jobs, data: bytes, **params: Any) -> tuple[dict[str, Any], bytes]:
    job = jobs.wait(jobs.create("video", {"video": base64.b64encode(data).decode(), "prompt": "a red house", "seed": 5, **params})["id"])
    assert job["status"] == "finished", job
    (result,) = job["results"]
    assert result["url"].endswith("/results/0.mp4")
    answer = jobs.http.get(result["url"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
    return job, answer.content


def test_a_video_job_restyles_every_frame_and_keeps_rate_and_audio(jobs: Jobs) -> None:
    first, second = make_canvas(SIZE, 1), make_canvas(SIZE, 2)
    scenes = "AAAAABBBBBAAAAABBBBB"  # two pictures in turn, five frames each
    clip = make_clip(picture=lambda index: first if scenes[index] == "A" else second)
    source, source_pts, source_rate, source_audio, codec = read_clip(clip)
    job, output = video_job(jobs, clip, strength=0.3, steps=2)
    frames, pts, rate, audio, out_codec = read_clip(output)
    assert len(frames) == len(source) == 20 and job["progress"] == {"step": 20, "steps": 20}
    assert rate == source_rate and [p - pts[0] for p in pts] == [p - source_pts[0] for p in source_pts]  # the same timing
    assert out_codec == codec == "aac" and audio == source_audio  # audio copied packet for packet
    assert frames[0].shape == (SIZE, SIZE, 3)
    # Every frame renders its own input, also through the two-step stream batch (which answers an
    # input a frame late): frame by frame, what sets a render apart from the clip's average render is
    # which picture that frame showed, switching exactly where the clip switches.
    mean = np.mean([frame.astype(np.float32) for frame in frames], axis=0)
    difference = first.astype(np.float32) - second
    seen = "".join("A" if _correlation(frame - mean, difference) > 0 else "B" for frame in frames)
    assert seen == scenes, seen
    assert all(np.abs(frame.astype(int) - picture).mean() > 3.0 for frame, picture in zip(frames, source))  # restyled, not copied
    again = video_job(jobs, clip, strength=0.3, steps=2)[1]
    assert [np.abs(a.astype(int) - b).max() for a, b in zip(read_clip(again)[0], frames)] == [0] * 20  # the same seed, the same frames


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, np.float32).mean(axis=-1).ravel(), np.asarray(b, np.float32).mean(axis=-1).ravel())[0, 1])


def test_webm_clips_and_session_recordings_are_inputs_too(jobs: Jobs, tmp_path: Any) -> None:
    from streamcanvas.sessions.recording import Recorder

    webm = make_clip(frames=10, container="webm", video_codec="libvpx", audio_codec="libopus")
    _, output = video_job(jobs, webm)
    frames, _, _, audio, codec = read_clip(output)
    assert len(frames) == 10 and codec == "opus" and audio == read_clip(webm)[3]

    # A recording as a session writes it (render-time timestamps, no audio).
    recorder = Recorder(tmp_path / "session.mp4", SIZE, SIZE, max_seconds=60)
    for index in range(12):
        recorder.offer(make_canvas(SIZE, index))
        time.sleep(0.03)
    summary = recorder.stop()
    assert summary.error is None and summary.frames == 12
    recording = summary.path.read_bytes()
    _, output = video_job(jobs, recording)
    frames, pts, _, audio, codec = read_clip(output)
    assert len(frames) == 12 and codec is None and pts == read_clip(recording)[1]


def test_a_video_over_the_limits_is_refused_before_decoding(jobs: Jobs) -> None:
    long_clip = make_clip(frames=62, size=64, fps=1, audio=False)  # 62 s at 1 fps: over the 60 s limit
    refused = jobs.create("video", {"video": base64.b64encode(long_clip).decode(), "prompt": "x"}, expect=422)
    assert refused["field"] == "params.video" and "over the limit of 60 s" in refused["message"]
    for data, expected in ((b"not a video at all", "cannot be read"), (_png_bytes(make_canvas(64, 1)), "")):
        refused = jobs.create("video", {"video": base64.b64encode(data).decode(), "prompt": "x"}, expect=422)
        assert refused["field"] == "params.video" and expected in refused["message"], refused
    pcm = make_clip(frames=5, container="mov", audio_codec="pcm_s16le")  # MOV holds PCM audio, MP4 cannot
    refused = jobs.create("video", {"video": base64.b64encode(pcm).decode(), "prompt": "x"}, expect=422)
    assert "pcm_s16le audio cannot be copied" in refused["message"]


def _png_bytes(array: np.ndarray) -> bytes:
    return base64.b64decode(png_base64(array))



def test_a_mask_may_be_grey_levels_or_transparency(jobs: Jobs) -> None:
    """White on black, or opaque on transparent (an opaque RGBA mask is read by its grey levels)."""
    canvas = make_canvas(SIZE, 9)
    grey = square_mask(SIZE, SIZE // 4, 3 * SIZE // 2 // 2)
    transparent = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    transparent[..., 3] = grey
    opaque = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    renders = [finished(jobs, "inpaint", {**QUICK, "image": png_base64(canvas), "mask": png_base64(mask)})[1][0] for mask in (grey, transparent, opaque)]
    assert np.array_equal(renders[0], renders[1]) and np.array_equal(renders[0], renders[2])
    assert not np.array_equal(renders[0], canvas)


def test_a_video_job_cancelled_mid_clip_stops_between_frames(jobs: Jobs) -> None:
    clip = base64.b64encode(make_clip(frames=120, size=256, fps=15)).decode()
    job = jobs.create("video", {"video": clip, "prompt": "a red house", "seed": 1})
    jobs.wait(job["id"], {"running"}, step=3)
    assert jobs.cancel(job["id"]).status_code == 202
    ended = jobs.wait(job["id"])
    assert ended["status"] == "cancelled" and ended["results"] == []
    step = int(ended["error"].split("cancelled at step ")[1].split(" of ")[0])
    assert 3 <= step < 120 and ended["error"].endswith("of 120")


def test_a_model_with_an_inpainting_unet_inpaints_with_it(cache_dir: Any) -> None:
    """A 9-channel UNet (noisy latents, mask, masked image) is what inpainting runs on when the model
    has one; the kept pixels are the input's all the same. Through the inpaint kind and the renderer."""
    from streamcanvas.batch_fallback.kinds import KINDS, AcceptContext
    from streamcanvas.batch_fallback.rendering import QualityRenderer
    from streamcanvas.codecs.images import ImageLimits
    from streamcanvas.pipelines.loading import ModelSpec, load_model
    from streamcanvas.pipelines.models import ModelSet
    from streamcanvas.pipelines.tiny import make_tiny_inpainting_model

    model = load_model(ModelSpec(model=str(make_tiny_inpainting_model(cache_dir / "tiny-inpainting"))))
    models = ModelSet.single(model)
    seen: list[int] = []
    hook = model.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        kind = KINDS["inpaint"]
        canvas, mask = make_canvas(64, 2), square_mask(64, 16, 48)
        context = AcceptContext(512, 512, ImageLimits(), lambda session, token: None, models=models.choices())
        accepted = kind.accept(kind.parse({**QUICK, "image": png_base64(canvas), "mask": png_base64(mask), "mask_blur": 0}), context)
        (result,) = kind.run(accepted.params, accepted.input_image, QualityRenderer(models), lambda step, steps, preview: None)
    finally:
        hook.remove()
    assert seen and set(seen) == {9}
    image = np.asarray(result.image)
    outside = square_mask(64, 16, 48) == 0
    assert np.array_equal(image[outside], canvas[outside]) and not np.array_equal(image[~outside], canvas[~outside])
