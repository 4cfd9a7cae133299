"""The ComfyUI-compatible API: workflows queued by an unmodified client from PyPI (comfy-api-simplified),
and the raw shapes of /prompt, /queue, /history, /view, /upload/image, /object_info and /ws."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from comfy_api_simplified import ComfyApiWrapper
from PIL import Image

from conftest import TEST_RESOLUTION
from helpers import ServerProcess, make_canvas

SIZE = TEST_RESOLUTION


def txt2img_graph(model: str, seed: int = 5, steps: int = 4, text: str = "a red house", size: int = SIZE, batch: int = 1) -> dict[str, Any]:
    """ComfyUI's default text-to-image API workflow (as its "Save (API)" exports it), at our size."""
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                    "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    return _titled(graph)


def img2img_graph(model: str, image: str, denoise: float = 0.5, seed: int = 5) -> dict[str, Any]:
    """ComfyUI's image-to-image example: LoadImage → VAEEncode → KSampler at a denoise below 1."""
    graph = txt2img_graph(model, seed=seed, steps=4)
    del graph["5"]
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}}
    graph["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["12", 0], denoise=denoise)
    return _titled(graph)


def _titled(graph: dict[str, Any]) -> dict[str, Any]:
    for node in graph.values():
        node.setdefault("_meta", {"title": "Save Image" if node["class_type"] == "SaveImage" else node["class_type"]})
    return graph


@pytest.fixture(scope="module")
def model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["models"][0]["id"]


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def upload(http: httpx.Client, array: np.ndarray, name: str, **fields: str) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    answer = http.post("/upload/image", files={"image": (name, buffer.getvalue(), "image/png")}, data=fields)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_unmodified_comfyui_client_runs_the_default_workflow(server: ServerProcess, model: str, http: httpx.Client) -> None:
    logged = len(server.log())
    api = ComfyApiWrapper(server.base_url)
    graph = txt2img_graph(model, seed=11)
    first = api.queue_and_wait_images(graph, "Save Image")
    again = api.queue_and_wait_images(copy.deepcopy(graph), "Save Image")
    other_seed = api.queue_and_wait_images(txt2img_graph(model, seed=12), "Save Image")
    (name, data), = first.items()
    assert name == "ComfyUI_00001_.png"
    image = Image.open(io.BytesIO(data))
    assert image.size == (SIZE, SIZE)
    assert json.loads(image.text["prompt"]) == graph  # as ComfyUI writes it, so the PNG loads back as a workflow
    # The same graph renders the same image; another seed another one.
    assert np.array_equal(pixels(data), pixels(next(iter(again.values()))))
    assert np.abs(pixels(data) - pixels(next(iter(other_seed.values())))).mean() > 2.0
    assert pixels(data).std() > 5.0  # a picture, not a flat fill

    history = http.get("/history", params={"max_items": 3}).json()
    assert len(history) == 3
    prompt_id, entry = list(history.items())[0]  # oldest first: the first of the three
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [message[0] for message in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["prompt"][1] == prompt_id and entry["prompt"][2] == graph and entry["prompt"][4] == ["9"]
    assert entry["outputs"] == {"9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": prompt_id, "type": "output"}]}}
    assert http.get(f"/history/{prompt_id}").json() == {prompt_id: entry}
    assert http.get(f"/history/{uuid.uuid4().hex}").json() == {}
    assert http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    # The client hangs up its /ws after each prompt: the server ends those connections quietly.
    assert "Exception in ASGI application" not in server.log()[logged:]


def test_an_img2img_workflow_follows_its_uploaded_image(server: ServerProcess, model: str, http: httpx.Client, tmp_path: Path) -> None:
    api = ComfyApiWrapper(server.base_url)
    canvases = {seed: make_canvas(SIZE, seed) for seed in (1, 2)}
    names = {}
    for seed, canvas in canvases.items():
        path = tmp_path / f"canvas-{seed}.png"
        Image.fromarray(canvas).save(path)
        stored = api.upload_image(path)  # the client's default subfolder: "default_upload_folder"
        assert stored["type"] == "input" and stored["subfolder"] == "default_upload_folder"
        names[seed] = f"{stored['subfolder']}/{stored['name']}"
        viewed = http.get("/view", params={"filename": stored["name"], "subfolder": stored["subfolder"], "type": "input"})
        assert viewed.status_code == 200 and np.array_equal(pixels(viewed.content), canvas.astype(np.float32))
    for seed, canvas in canvases.items():
        # Through the model's full VAE and back: the picture is the uploaded one.
        round_trip = _titled({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
            "10": {"class_type": "LoadImage", "inputs": {"image": names[seed]}},
            "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "round-trip", "images": ["8", 0]}},
        })
        result = pixels(next(iter(api.queue_and_wait_images(round_trip, "Save Image").values())))
        own, other = np.abs(result - canvas).mean(), np.abs(result - canvases[3 - seed]).mean()
        assert own < 25 and own < other / 2, (seed, own, other)
    # Sampled from those latents (same seed, same prompt), what differs between the two renders is
    # where the two inputs differ: the sampler started from the uploaded image, not from noise.
    rendered = {
        seed: pixels(next(iter(api.queue_and_wait_images(img2img_graph(model, names[seed], denoise=0.3), "Save Image").values())))
        for seed in canvases
    }
    change = _correlation(rendered[1] - rendered[2], canvases[1].astype(np.float32) - canvases[2])
    assert change > 0.25, change  # 0.38 measured; renders from noise would be identical (no correlation)

    # Uploading the same name again keeps both files unless asked to overwrite.
    array = canvases[1]
    first = upload(http, array, "same.png")
    second = upload(http, array, "same.png")
    replaced = upload(http, array, "same.png", overwrite="true")
    assert (first["name"], second["name"], replaced["name"]) == ("same.png", "same (1).png", "same.png")
    assert http.get("/view", params={"filename": "../jobs.db", "type": "input"}).status_code == 404
    refused = http.post("/upload/image", files={"image": ("x.png", b"not an image", "image/png")})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_prompt"
    outside = http.post("/upload/image", files={"image": ("x.png", _png(array), "image/png")}, data={"subfolder": "../.."})
    assert outside.status_code == 400


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.mean(axis=-1).ravel(), b.astype(np.float32).mean(axis=-1).ravel())[0, 1])


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(http: httpx.Client, graph: object, **extra: Any) -> httpx.Response:
    # Encoded here, not by httpx: as Python's json module (and ComfyUI's clients) do, NaN and Infinity pass.
    return http.post("/prompt", content=json.dumps({"prompt": graph, **extra}), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("change", "node", "error_type", "detail"),
    [
        (lambda g: g["3"]["inputs"].pop("steps"), "3", "required_input_missing", "steps"),
        (lambda g: g["3"]["inputs"].update(steps="20"), "3", "invalid_input_type", "steps"),
        (lambda g: g["3"]["inputs"].update(steps=True), "3", "invalid_input_type", "steps"),
        (lambda g: g["3"]["inputs"].update(steps=0), "3", "value_smaller_than_min", "steps"),
        (lambda g: g["3"]["inputs"].update(cfg=1e9), "3", "value_bigger_than_max", "cfg"),
        (lambda g: g["3"]["inputs"].update(sampler_name="dpmpp_sde_gpu"), "3", "value_not_in_list", "sampler_name"),
        (lambda g: g["3"]["inputs"].update(sampler_name="ddim", scheduler="karras"), "3", "value_not_in_list", "scheduler"),
        (lambda g: g["4"]["inputs"].update(ckpt_name="v1-5-pruned-emaonly.safetensors"), "4", "value_not_in_list", "ckpt_name"),
        (lambda g: g["5"]["inputs"].update(width=100000), "5", "value_bigger_than_max", "width"),
        # JSON parsers here take NaN and Infinity; the answer must still be JSON (it was a 500).
        (lambda g: g["3"]["inputs"].update(cfg=float("inf")), "3", "invalid_input_type", "cfg"),
        (lambda g: g["5"]["inputs"].update(width=float("nan")), "5", "invalid_input_type", "width"),
        (lambda g: g["3"]["inputs"].update(positive=["5", 0]), "3", "return_type_mismatch", "received_type(LATENT) mismatch input_type(CONDITIONING)"),
        (lambda g: g["3"]["inputs"].update(positive=["99", 0]), "3", "bad_linked_input", "99"),
        (lambda g: g["8"]["inputs"].update(samples=["3", 4]), "8", "bad_linked_input", "no output 4"),
        (lambda g: g["3"]["inputs"].update(model=["4", "0"]), "3", "bad_linked_input", "model"),
        (lambda g: g.update({"20": {"class_type": "CLIPTextEncode", "inputs": {"text": "unused", "clip": ["4", 1]}}}), "20", "output_not_consumed", "not linked"),
    ],
)
def test_a_bad_workflow_is_refused_before_it_is_queued(http: httpx.Client, model: str, change: Any, node: str, error_type: str, detail: str) -> None:
    graph = txt2img_graph(model)
    change(graph)
    before = http.get("/v1/jobs", params={"limit": 1}).json()["jobs"][:1]
    answer = _post(http, graph)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    errors = body["node_errors"]
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert node in errors, errors
    problem = errors[node]["errors"][0]
    assert problem["type"] == error_type and detail in problem["details"], problem
    assert errors[node]["class_type"] == graph[node]["class_type"]
    assert http.get("/v1/jobs", params={"limit": 1}).json()["jobs"][:1] == before  # nothing was queued


def test_a_cycle_and_other_whole_graph_errors_name_what_is_wrong(http: httpx.Client, model: str) -> None:
    graph = txt2img_graph(model)
    # A type-correct cycle: an upscale of the sampler's own output feeds the sampler.
    graph["30"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 1.0}}
    graph["3"]["inputs"]["latent_image"] = ["30", 0]
    del graph["5"]
    body = _post(http, graph).json()
    (node, entry), = body["node_errors"].items()
    assert entry["errors"][0]["type"] == "dependency_cycle" and "3, 30" in entry["errors"][0]["details"]
    assert entry["class_type"] == graph[node]["class_type"]
    # With another fault besides, both are told in one answer.
    graph["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "unused", "clip": ["4", 1]}}
    errors = _post(http, graph).json()["node_errors"]
    assert {problem["type"] for entry in errors.values() for problem in entry["errors"]} == {"dependency_cycle", "output_not_consumed"}, errors

    unknown = txt2img_graph(model)
    unknown["8"]["class_type"] = "VAEDecodeTiled_SDXL_Custom"
    body = _post(http, unknown).json()
    assert body["error"]["type"] == "invalid_prompt" and "VAEDecodeTiled_SDXL_Custom" in body["error"]["message"]
    assert body["error"]["details"] == "Node ID '#8'"

    no_output = txt2img_graph(model)
    del no_output["9"]
    assert _post(http, no_output).json()["error"]["type"] == "prompt_no_outputs"
    for bad in ([], "text", {"1": "node"}, {"1": {"inputs": {}}}):
        answer = _post(http, bad)
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_prompt", answer.text
    assert _post(http, {}).json()["error"]["details"] == "got an empty object"
    # A body that is no graph at all is told in the body's own names ("prompt", not the job's "params.prompt").
    answer = http.post("/prompt", json={"prompt": [1, 2]})
    assert answer.status_code == 400 and answer.json()["error"]["details"] == "prompt", answer.text
    assert "params." not in answer.json()["error"]["message"]
    assert http.post("/prompt", content=b"{not json").status_code == 400
    assert http.post("/prompt", json={"client_id": "x"}).json()["error"]["type"] == "no_prompt"
    # The /v1 API takes the same workflows, and refuses them with the node named.
    refused = http.post("/v1/jobs", json={"kind": "workflow", "params": {"prompt": unknown}})
    assert refused.status_code == 422 and "VAEDecodeTiled_SDXL_Custom" in refused.json()["message"]


async def _messages_until_done(url: str, client_id: str, post: Any, limit_s: float = 120.0) -> tuple[list[Any], str]:
    """Connect as a ComfyUI client, queue with `post(client_id)`, and collect every message until
    the prompt's `executing` None."""
    received: list[Any] = []
    async with websockets.connect(f"{url}/ws?clientId={client_id}", max_size=None) as connection:
        received.append(json.loads(await asyncio.wait_for(connection.recv(), 10)))
        prompt_id = await asyncio.to_thread(post, client_id)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            message = await asyncio.wait_for(connection.recv(), deadline - time.monotonic())
            received.append(message if isinstance(message, bytes) else json.loads(message))
            if isinstance(message, str):
                data = received[-1]["data"]
                if received[-1]["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                    return received, prompt_id
    raise AssertionError(f"no end of prompt in {limit_s} s: {received[-5:]}")


def test_the_websocket_sends_comfyuis_messages_in_order(server: ServerProcess, http: httpx.Client, model: str) -> None:
    graph = txt2img_graph(model, steps=12, size=256)

    def post(client_id: str) -> str:
        answer = _post(http, graph, client_id=client_id, extra_data={"preview_method": "auto"})
        assert answer.status_code == 200, answer.text
        assert set(answer.json()) == {"prompt_id", "number", "node_errors"}
        return answer.json()["prompt_id"]

    messages, prompt_id = asyncio.run(_messages_until_done(server.base_url.replace("http", "ws"), "client-a", post))
    assert messages[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "client-a"}}
    text = [m for m in messages if isinstance(m, dict) and m["type"] != "status"]
    kinds = [m["type"] for m in text]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert kinds[-3:] == ["executed", "execution_success", "executing"]
    for message in text:
        assert message["data"]["prompt_id"] == prompt_id
    executing = [m["data"]["node"] for m in text if m["type"] == "executing"]
    assert executing == ["4", "5", "6", "7", "3", "8", "9", None]  # every node once, in run order
    progress = [m["data"] for m in text if m["type"] == "progress"]
    assert progress and all(p["node"] == "3" and p["max"] == 12 and 1 <= p["value"] <= 12 for p in progress)
    assert [p["value"] for p in progress] == sorted(p["value"] for p in progress)
    previews = [m for m in messages if isinstance(m, bytes)]
    assert previews, "a prompt with preview_method auto gets binary previews"
    for frame in previews:
        assert struct.unpack(">II", frame[:8]) == (1, 1) and frame[8:11] == b"\xff\xd8\xff"  # PREVIEW_IMAGE, JPEG
    executed = next(m["data"] for m in text if m["type"] == "executed")
    assert executed["node"] == "9"
    assert executed["output"] == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": prompt_id, "type": "output"}]}
    image = http.get("/view", params={"filename": "ComfyUI_00001_.png", "subfolder": prompt_id, "type": "output"})
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (256, 256)
    assert any(m.get("type") == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 1 for m in messages if isinstance(m, dict))


def test_a_failing_node_is_an_execution_error_naming_it(server: ServerProcess, http: httpx.Client, model: str) -> None:
    graph = txt2img_graph(model, steps=2)
    graph["20"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": "bilinear", "scale_by": 8.0}, "_meta": {"title": "big"}}
    graph["21"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["20", 0], "upscale_method": "bilinear", "scale_by": 8.0}, "_meta": {"title": "bigger"}}
    graph["9"]["inputs"]["images"] = ["21", 0]

    def post(client_id: str) -> str:
        return _post(http, graph, client_id=client_id).json()["prompt_id"]

    messages, prompt_id = asyncio.run(_messages_until_done(server.base_url.replace("http", "ws"), "client-b", post))
    error = next(m["data"] for m in messages if isinstance(m, dict) and m["type"] == "execution_error")
    assert error["node_id"] == "21" and error["node_type"] == "ImageScaleBy" and error["exception_type"] == "ValueError"
    assert "8192x8192, over the limit" in error["exception_message"]
    assert error["executed"][-1] == "20"
    entry = http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False and entry["outputs"] == {}


def test_queue_delete_and_interrupt(server: ServerProcess, http: httpx.Client, model: str) -> None:
    slow = txt2img_graph(model, steps=150, size=512)
    waiting = txt2img_graph(model, steps=2)
    deleted: list[str] = []

    def post(client_id: str) -> str:
        prompt_id = _post(http, slow, client_id=client_id).json()["prompt_id"]
        pending = _post(http, waiting, client_id=client_id).json()["prompt_id"]
        deleted.append(pending)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queue = http.get("/queue").json()
            if queue["queue_running"] and queue["queue_running"][0][1] == prompt_id:
                assert [item[1] for item in queue["queue_pending"]] == [pending]
                assert queue["queue_running"][0][3]["client_id"] == client_id and queue["queue_running"][0][4] == ["9"]
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the slow prompt did not start: {queue}")
        assert http.post("/queue", json={"delete": [pending]}).status_code == 200
        assert http.get("/queue").json()["queue_pending"] == []
        while not http.get(f"/v1/jobs/{prompt_id}").json()["progress"]["step"]:
            time.sleep(0.05)
        assert http.post("/interrupt").status_code == 200
        return prompt_id

    messages, prompt_id = asyncio.run(_messages_until_done(server.base_url.replace("http", "ws"), "client-c", post))
    interrupted = next(m["data"] for m in messages if isinstance(m, dict) and m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    assert interrupted["executed"] == ["4", "5", "6", "7"]
    entry = http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert http.get("/v1/jobs").json()["jobs"][0]["status"] == "cancelled"
    # The prompt deleted before it ran left no history (ComfyUI keeps none), by its id or in the list.
    assert http.get(f"/history/{deleted[0]}").json() == {}
    assert prompt_id in http.get("/history").json() and deleted[0] not in http.get("/history").json()


def test_object_info_lists_every_node_from_its_declaration(http: httpx.Client, model: str) -> None:
    info = http.get("/object_info").json()
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "VAEEncode", "LoadImage",
                 "SaveImage", "PreviewImage", "LoraLoader", "ControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced", "ImageScale",
                 "ImageScaleBy", "LatentUpscale", "LatentUpscaleBy", "UpscaleModelLoader", "ImageUpscaleWithModel"):
        assert info[name]["name"] == name, name
    sampler = info["KSampler"]
    assert sampler["input"]["required"]["sampler_name"][0][:2] == ["euler", "euler_ancestral"]
    assert sampler["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 150}]
    assert sampler["output"] == ["LATENT"] and sampler["output_node"] is False
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [model]
    assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert info["SaveImage"]["output_node"] is True
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == ["sr2", "sr4"]
    assert info["UpscaleModelLoader"]["output"] == ["UPSCALE_MODEL"] and info["ImageUpscaleWithModel"]["output"] == ["IMAGE"]
    assert http.get("/object_info/KSampler").json() == {"KSampler": sampler}
    assert http.get("/object_info/NoSuchNode").json() == {}
    stats = http.get("/system_stats").json()
    assert stats["devices"][0]["type"] == "cpu" and stats["system"]["ram_total"] > 0


def test_an_upscale_model_workflow_upscales_by_the_networks_factor(server: ServerProcess, http: httpx.Client, upscaler_dirs: dict[str, Path]) -> None:
    """ComfyUI's upscale-model pair: LoadImage → UpscaleModelLoader + ImageUpscaleWithModel → SaveImage."""
    import torch

    from streamcanvas.pipelines.super_resolution import SuperResolution

    canvas = make_canvas(SIZE // 2, 4)
    name = upload(http, canvas, "small.png")["name"]
    graph = _titled({
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "sr4"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "upscaled", "images": ["3", 0]}},
    })
    result = pixels(next(iter(ComfyApiWrapper(server.base_url).queue_and_wait_images(graph, "Save Image").values())))
    expected = SuperResolution(upscaler_dirs["sr4"], torch.device("cpu"), torch.float32).upscale_tile(canvas)
    assert result.shape == expected.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.abs(result - expected).mean() < 0.5
    graph["2"]["inputs"]["model_name"] = "RealESRGAN_x4plus.pth"
    answer = _post(http, graph)
    assert answer.status_code == 400 and answer.json()["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"


def test_the_upload_folder_is_bounded(tmp_path: Path) -> None:
    """Uploads are copied into the jobs that read them, so old ones can go: by age, count and size."""
    from streamcanvas.batch_fallback.uploads import Uploads
    from streamcanvas.codecs.images import ImageLimits

    uploads = Uploads(tmp_path, ImageLimits(), max_files=3, max_bytes=10**9, max_age_s=3600)
    for index in range(5):
        uploads.save(f"image-{index}.png", _png(make_canvas(64, index)))
        stamp = time.time() - 100 + index  # oldest first
        os.utime(tmp_path / f"image-{index}.png", (stamp, stamp))
    assert sorted(uploads.names()) == ["image-2.png", "image-3.png", "image-4.png"]
    assert uploads.prune(now=time.time() + 3600 - 96.5) == 2  # past the retention: the two older of the three
    assert uploads.names() == ("image-4.png",)
    tight = Uploads(tmp_path / "small", ImageLimits(), max_bytes=3 * len(_png(make_canvas(64, 1))))
    for index in range(4):
        tight.save(f"same-{index}.png", _png(make_canvas(64, 1)))
    assert len(tight.names()) == 3


def test_inpainting_nodes_repaint_only_the_masked_area(server: ServerProcess, model: str, http: httpx.Client) -> None:
    """LoadImage's MASK (the transparent area) through SetLatentNoiseMask or VAEEncodeForInpaint:
    outside the mask the sampler keeps the image's latents, so the result there stays near the image's
    round trip through the VAE (not equal: the decoder's attention reads the repainted latents too),
    while the hole is painted anew."""
    api = ComfyApiWrapper(server.base_url)
    rgba = np.dstack([make_canvas(SIZE, 3), np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[SIZE // 4 : SIZE // 2, SIZE // 4 : 3 * SIZE // 4, 3] = 0  # the transparent hole is what is painted
    name = upload(http, rgba, "holed.png")["name"]

    def graph(encoder: dict[str, Any]) -> dict[str, Any]:
        nodes = txt2img_graph(model, steps=6)
        del nodes["5"]
        nodes.update({"10": {"class_type": "LoadImage", "inputs": {"image": name}}, "12": encoder})
        nodes["3"]["inputs"]["latent_image"] = ["12", 0]
        return _titled(nodes)

    round_trip = _titled({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "10": {"class_type": "LoadImage", "inputs": {"image": name}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rt", "images": ["8", 0]}},
    })
    reference = pixels(next(iter(api.queue_and_wait_images(round_trip, "Save Image").values())))
    graph_a = graph({"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}})
    graph_a["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}, "_meta": {"title": "enc"}}
    graph_b = graph({"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}})
    far = np.ones((SIZE, SIZE), dtype=bool)
    far[SIZE // 4 - 16 : SIZE // 2 + 16, SIZE // 4 - 16 : 3 * SIZE // 4 + 16] = False
    hole = np.zeros((SIZE, SIZE), dtype=bool)
    hole[SIZE // 4 + 4 : SIZE // 2 - 4, SIZE // 4 + 4 : 3 * SIZE // 4 - 4] = True
    unmasked = copy.deepcopy(graph_a)
    unmasked["3"]["inputs"]["latent_image"] = ["11", 0]  # the same sampling without the mask
    del unmasked["12"]  # (a node nothing reads is refused)
    control = pixels(next(iter(api.queue_and_wait_images(unmasked, "Save Image").values())))
    everywhere = np.abs(control - reference)[far].mean()
    for nodes in (graph_a, graph_b):
        result = pixels(next(iter(api.queue_and_wait_images(nodes, "Save Image").values())))
        kept, painted = np.abs(result - reference)[far].mean(), np.abs(result - reference)[hole].mean()
        assert painted > 3 * kept and everywhere > 2 * kept, (nodes["12"]["class_type"], kept, painted, everywhere)
