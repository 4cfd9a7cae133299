"""Several models on one server: chosen per session and per batch job, counted against the device's
memory before they are loaded. A real server serving the trained toy model and the untrained tiny one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from batch_helpers import Jobs
from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, decode_frame, make_canvas, server_env
from streamcanvas.codecs.messages import Hello
from streamcanvas.pipelines.errors import ModelLoadError, UnknownName
from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.models import load_models, weight_bytes

SIZE = TEST_RESOLUTION
STEADY = {"prompt": "a red house", "steps": 1, "cfg_type": "none"}


@pytest.fixture(scope="module")
def two_models(cache_dir: Path, artifacts_dir: Path, toy_model_dir: Path, tiny_model_dir: Path, tiny_sdxl_dir: Path) -> Iterator[ServerProcess]:
    """Three models, in fact: the toy model (the default), the untrained tiny one and a tiny SDXL-shaped one."""
    process = start_server(
        cache_dir, artifacts_dir, "models",
        "--model", f"toy={toy_model_dir}", "--model", f"tiny={tiny_model_dir}", "--model", f"xl={tiny_sdxl_dir}",
        "--slots", "1", "--sessions-per-slot", "2",
    )  # fmt: skip
    yield process
    process.stop()


def test_weights_are_counted_exactly_from_their_headers(tiny_model_dir: Path) -> None:
    model = load_model(ModelSpec(model=str(tiny_model_dir)))
    modules = [model.pipe.unet, model.pipe.vae, model.pipe.text_encoder, model.full_vae]
    loaded = sum(tensor.numel() * tensor.element_size() for module in modules for tensor in module.state_dict().values())
    assert weight_bytes(tiny_model_dir, torch.float32) == loaded
    assert weight_bytes(tiny_model_dir, torch.bfloat16) == loaded // 2


def test_models_that_do_not_fit_are_refused_before_loading(tiny_model_dir: Path, toy_model_dir: Path) -> None:
    specs = [("toy", ModelSpec(model=str(toy_model_dir))), ("tiny", ModelSpec(model=str(tiny_model_dir)))]
    sizes = [weight_bytes(path, torch.float32) for path in (toy_model_dir, tiny_model_dir)]
    models = load_models(specs, budget_bytes=sum(sizes))
    assert models.names == ("toy", "tiny") and models.default_name == "toy" and list(models.sizes.values()) == sizes
    with pytest.raises(UnknownName, match="toy, tiny"):
        models.get("sd-turbo")
    with pytest.raises(ModelLoadError, match=r"toy \d+\.\d MiB, tiny \d+\.\d MiB .* over the budget"):
        load_models(specs, budget_bytes=sum(sizes) - 1)


def test_the_command_line_says_which_models_do_not_fit(tiny_model_dir: Path, cache_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamcanvas.realtime_server.cli", "serve", "--model", f"a={tiny_model_dir}",
         "--model", f"b={tiny_model_dir}", "--memory-budget", "0.001"],
        capture_output=True, text=True, timeout=120, env=server_env(cache_dir),
    )  # fmt: skip
    assert result.returncode == 2 and "do not fit" in result.stderr and "a 1" in result.stderr and "--memory-budget" in result.stderr


def test_models_are_listed_with_their_sizes(two_models: ServerProcess) -> None:
    listed = httpx.get(f"{two_models.base_url}/v1/models", timeout=5).json()
    assert [model["id"] for model in listed["models"]] == ["toy", "tiny", "xl"]
    assert [model["default"] for model in listed["models"]] == [True, False, False]
    assert [model["architecture"] for model in listed["models"]] == ["sd", "sd", "sdxl"]
    assert all(model["weight_bytes"] > 0 for model in listed["models"]) and listed["memory_budget_bytes"] > 0
    assert two_models.info()["models"] == ["toy", "tiny", "xl"]


async def test_each_session_renders_with_the_model_it_picked(two_models: ServerProcess) -> None:
    canvas = make_canvas(SIZE, 6)

    async def alone(model: str | None) -> np.ndarray:
        async with Client.connect(two_models.ws_url) as client:
            ready = await client.hello(model=model, params=STEADY)
            assert ready["model"]["id"] == (model or "toy")
            return decode_frame(await client.frame_for(await client.send_canvas(canvas)))

    toy, tiny, xl = await alone(None), await alone("tiny"), await alone("xl")
    assert np.abs(toy.astype(int) - tiny).mean() > 5  # other weights, other pictures
    assert not np.array_equal(xl, toy) and not np.array_equal(xl, tiny)
    # Both at once, on one slot: each still gets its own model's frame (never a shared UNet call).
    async with Client.connect(two_models.ws_url) as first, Client.connect(two_models.ws_url) as second:
        await first.hello(model="toy", params=STEADY)
        await second.hello(model="tiny", params=STEADY)
        seqs = [await first.send_canvas(canvas), await second.send_canvas(canvas)]
        # Up to float rounding, which JPEG may spread over a block (a busy machine may give the worker
        # fewer OpenMP threads); the two models' pictures are more than 5 levels apart on average.
        assert np.abs(decode_frame(await first.frame_for(seqs[0])).astype(int) - toy).mean() <= 1
        assert np.abs(decode_frame(await second.frame_for(seqs[1])).astype(int) - tiny).mean() <= 1


async def test_an_unknown_model_is_refused_naming_the_models(two_models: ServerProcess) -> None:
    async with Client.connect(two_models.ws_url) as client:
        await client.send(Hello(protocol=(1,), model="sd-turbo"))
        error = await client.expect("error")
        assert (error["code"], error["field"], error["fatal"]) == ("unknown_name", "model", True) and "toy, tiny, xl" in error["message"]


async def test_ready_gives_the_models_defaults_and_errors_name_the_model(two_models: ServerProcess) -> None:
    """`ready.defaults` is where the session's parameters started (its model's own defaults, which a
    style change puts fields back to); a LoRA on a model that has none says whose LoRAs they are."""
    async with Client.connect(two_models.ws_url) as client:
        ready = await client.hello(model="tiny", params={"prompt": "a red house", "strength": 0.7})
        assert ready["defaults"] == {**ready["params"], "prompt": "", "strength": 0.5}
    async with Client.connect(two_models.ws_url) as client:
        await client.send(Hello(protocol=(1,), model="tiny", params={"loras": {"ink": 1.0}}))
        error = await client.expect("error")
    assert (error["code"], error["field"], error["fatal"]) == ("unknown_name", "loras", True)
    assert "model 'tiny' has: none (LoRAs and ControlNets load on the default model, 'toy')" in error["message"], error


def test_batch_jobs_pick_a_model(two_models: ServerProcess) -> None:
    jobs = Jobs(two_models.base_url)
    try:
        def render(**params: object) -> np.ndarray:
            job = jobs.wait(jobs.create("txt2img", {"prompt": "a red house", "steps": 3, "seed": 1, "width": SIZE, "height": SIZE, **params})["id"])
            assert job["status"] == "finished", job
            return np.asarray(jobs.image(job["results"][0]["url"]).convert("RGB"), dtype=np.int16)

        # The same job on the default model and on it by name: the same picture, up to a grey level or two
        # of float rounding (the two jobs may run on worker threads that OpenMP gives different thread
        # counts when the machine is busy; seen in CI). Another model is far more than that away.
        difference = np.abs(render() - render(model="toy"))
        assert difference.mean() <= 0.5 and difference.max() <= 4
        assert np.abs(render(model="tiny") - render()).mean() > 5
        assert render(model="xl").shape == (SIZE, SIZE, 3)
        refused = jobs.http.post("/v1/jobs", json={"kind": "txt2img", "params": {"prompt": "x", "model": "sd-turbo"}})
        assert refused.status_code == 422 and refused.json()["field"] == "params.model" and "toy, tiny, xl" in refused.json()["message"]
    finally:
        jobs.close()
