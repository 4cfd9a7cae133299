"""The A1111-compatible routes, driven by a client written from that API's documentation."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from a1111_client import A1111Client
from conftest import TEST_RESOLUTION
from helpers import ServerProcess, make_canvas

SIZE = TEST_RESOLUTION


@pytest.fixture(scope="module")
def a1111(server: ServerProcess) -> Iterator[A1111Client]:
    client = A1111Client(server.base_url)
    yield client
    client.close()


def test_models_samplers_and_options(a1111: A1111Client) -> None:
    samplers = a1111.samplers()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= {sampler["name"] for sampler in samplers}
    assert all(set(sampler) == {"name", "aliases", "options"} for sampler in samplers)
    models = a1111.sd_models()
    assert len(models) == 1 and {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    options = a1111.options()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    a1111.set_options(sd_model_checkpoint=models[0]["title"], samples_format="png")
    with pytest.raises(httpx.HTTPStatusError) as refused:
        a1111.set_options(sd_model_checkpoint="v1-5-pruned-emaonly.safetensors")
    assert refused.value.response.status_code == 422 and "not loaded" in refused.value.response.json()["detail"]


def test_txt2img_in_the_shape_clients_expect(a1111: A1111Client) -> None:
    payload = {
        "prompt": "a red house",
        "negative_prompt": "blurry",
        "steps": 5,
        "sampler_name": "Euler a",
        "cfg_scale": 6.5,
        "width": SIZE,
        "height": SIZE,
        "seed": 4242,
        "batch_size": 2,
        "n_iter": 1,
        "restore_faces": False,  # A1111 fields with no meaning here are accepted and ignored
        "enable_hr": False,
        "override_settings": {},
    }
    result = a1111.txt2img(**payload)
    assert len(result["images"]) == 2 and all(image.size == (SIZE, SIZE) for image in result["images"])
    assert result["parameters"]["prompt"] == "a red house" and result["parameters"]["steps"] == 5
    info = result["info"]
    assert info["seed"] == 4242 and info["all_seeds"] == [4242, 4243]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["width"] == SIZE
    assert "Seed: 4242" in info["infotexts"][0] and "Negative prompt: blurry" in info["infotexts"][0]
    assert "Seed: 4242" in result["images"][0].text["parameters"]
    assert "Sampler: Euler a," in info["infotexts"][0]  # A1111's name: what png-info reads can be sent back
    again = a1111.txt2img(**payload)
    assert np.array_equal(np.asarray(again["images"][0]), np.asarray(result["images"][0]))
    random_seed = a1111.txt2img(prompt="x", steps=2, width=SIZE, height=SIZE, seed=-1, batch_size=1, n_iter=2)
    assert random_seed["info"]["seed"] >= 0 and random_seed["info"]["seed"] != -1
    # batch_size is A1111's own (images a batch), not batch_size × n_iter.
    assert random_seed["info"]["batch_size"] == 1 and len(random_seed["info"]["all_seeds"]) == len(random_seed["images"]) == 2


def test_a_batch_from_the_last_seed_wraps_round_to_seeds_that_can_be_sent_again(a1111: A1111Client) -> None:
    """Image i has seed + i, wrapping round past 2**32 - 1: the second image of a batch from the last seed
    is seed 0 (it used to be 4294967296, which the API then refused), and asking for seed 0 gives it again."""
    batch = a1111.txt2img(prompt="a red house", steps=2, width=SIZE, height=SIZE, seed=2**32 - 1, batch_size=2)
    assert batch["info"]["all_seeds"] == [2**32 - 1, 0]
    assert "Seed: 0," in batch["images"][1].text["parameters"]
    alone = a1111.txt2img(prompt="a red house", steps=2, width=SIZE, height=SIZE, seed=0, batch_size=1)
    first, second, again = (np.asarray(image, dtype=np.int16) for image in (*batch["images"], alone["images"][0]))
    # Alone or in a batch of two, the UNet's sums round differently on the CPU: a level or two, not a new picture.
    assert np.abs(again - second).max() <= 3 < np.abs(again - first).max(), (np.abs(again - second).max(), np.abs(again - first).max())


def test_schedule_types_in_the_sampler_name_or_the_scheduler_field(a1111: A1111Client, server: ServerProcess) -> None:
    """"DPM++ 2M Karras" (A1111 before 1.9) and "DPM++ 2M" with scheduler "Karras" (1.9+) are one job,
    not the plain sampler, and the text says so in a form that can be sent back."""
    base = {"prompt": "a red house", "steps": 4, "seed": 17, "width": SIZE, "height": SIZE, "cfg_scale": 6.5}
    named = a1111.txt2img(**base, sampler_name="DPM++ 2M Karras")
    field = a1111.txt2img(**base, sampler_name="DPM++ 2M", scheduler="Karras")
    plain = a1111.txt2img(**base, sampler_name="DPM++ 2M")
    assert np.array_equal(np.asarray(named["images"][0]), np.asarray(field["images"][0]))
    assert np.abs(np.asarray(named["images"][0]).astype(int) - np.asarray(plain["images"][0])).mean() > 0.5
    text = named["info"]["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5" in text and "Schedule type" not in plain["info"]["infotexts"][0]
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        png = io.BytesIO()
        named["images"][0].save(png, format="PNG", pnginfo=_text_chunks(named["images"][0]))
        parsed = http.post("/sdapi/v1/png-info", json={"image": base64.b64encode(png.getvalue()).decode()}).json()["parameters"]
        assert parsed["Schedule type"] == "Karras" and parsed["CFG scale"] == 6.5 and parsed["Steps"] == 4
        assert {"name": "karras", "label": "Karras"}.items() <= next(e for e in http.get("/sdapi/v1/schedulers").json() if e["label"] == "Karras").items()
        # A spacing the sampler lacks, or one this server does not have, is the scheduler field's fault.
        for body in ({"sampler_name": "DDIM", "scheduler": "Karras"}, {"sampler_name": "Euler", "scheduler": "Polyexponential"}):
            refused = http.post("/sdapi/v1/txt2img", json={**base, "steps": 1, **body})
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "scheduler"], refused.text
        assert http.post("/sdapi/v1/txt2img", json={**base, "sampler_name": "DPM++ 2M Swirly"}).status_code == 404
        assert http.get("/sdapi/v1/cmd-flags").json()["api"] is True


def _text_chunks(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in image.text.items():
        info.add_text(key, value)
    return info


def test_img2img_in_the_shape_clients_expect(a1111: A1111Client) -> None:
    init = Image.fromarray(make_canvas(SIZE, 3))
    result = a1111.img2img(init, prompt="a boat", steps=6, denoising_strength=0.5, sampler_name="DDIM", seed=1, width=SIZE, height=SIZE)
    assert len(result["images"]) == 1 and result["images"][0].size == (SIZE, SIZE)
    assert result["parameters"]["init_images"] is None  # not echoed back unless include_init_images
    assert result["info"]["denoising_strength"] == 0.5 and result["info"]["sampler_name"] == "DDIM"


def test_errors_in_the_shape_clients_expect(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        unknown = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler z"})
        assert unknown.status_code == 404 and "Sampler not found" in unknown.json()["detail"]
        invalid = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
        assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "steps"]
        zero_steps = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0, "width": SIZE, "height": SIZE})
        assert zero_steps.status_code == 422 and "steps" in str(zero_steps.json()["detail"])
        no_image = http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []})
        assert no_image.status_code == 422
        # A refusal names the A1111 field the client sent, not the job field it became.
        for body, loc in (
            ({"cfg_scale": 31}, ["body", "cfg_scale"]),
            ({"seed": 2**32}, ["body", "seed"]),
            ({"batch_size": 3, "n_iter": 3}, ["body", "n_iter"]),
            ({"enable_hr": True, "hr_scale": 9}, ["body", "hr_scale"]),
        ):
            refused = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE, **body})
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == loc, (body, refused.text)
        png = io.BytesIO()
        Image.fromarray(make_canvas(SIZE, 1)).save(png, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        strength = http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image], "denoising_strength": 1.5})
        assert strength.status_code == 422 and strength.json()["detail"][0]["loc"] == ["body", "denoising_strength"], strength.text


def test_progress_and_interrupt(a1111: A1111Client, server: ServerProcess) -> None:
    outcome: dict = {}

    def generate() -> None:
        outcome["result"] = a1111.txt2img(prompt="slow", steps=150, width=512, height=512, sampler_name="Euler")

    idle = a1111.progress()
    assert idle["progress"] == 0 and idle["state"]["sampling_steps"] == 0 and "current_image" in idle
    thread = threading.Thread(target=generate)
    thread.start()
    watcher = A1111Client(server.base_url)
    try:
        deadline = time.monotonic() + 60
        while (progress := watcher.progress())["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline, progress
            time.sleep(0.1)
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
        assert progress["state"]["job_count"] >= 1 and progress["eta_relative"] > 0
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.format == "JPEG" and max(preview.size) <= 128
        assert watcher.progress(skip_current_image=True)["current_image"] is None
        watcher.interrupt()
        thread.join(60)
    finally:
        watcher.close()
    assert not thread.is_alive()
    assert outcome["result"]["info"]["interrupted"] is True and outcome["result"]["images"] == []
