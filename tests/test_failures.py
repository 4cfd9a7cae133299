"""A frame that fails on the server is reported to its session only, and the slot recovers.

The failure is real: a model whose tokenizer knows a token its text encoder has no embedding for (what
happens when a textual-inversion token is added to the tokenizer but the encoder is not resized).
Prompts without that token work; prompts with it fail inside the text encoder.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, decode_frame, make_canvas

BROKEN_TOKEN = "<unembedded-concept>"


@pytest.fixture(scope="module")
def misconfigured_server(tiny_model_dir: Path, tmp_path_factory, cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    model = tmp_path_factory.mktemp("misconfigured") / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    tokenizer.add_tokens([BROKEN_TOKEN])
    tokenizer.save_pretrained(model / "tokenizer")
    process = start_server(cache_dir, artifacts_dir, "misconfigured", "--model", str(model), "--slots", "2")
    yield process
    process.stop()


async def test_a_failing_frame_is_reported_to_its_session_and_the_slot_recovers(
    misconfigured_server: ServerProcess,
) -> None:
    url = misconfigured_server.ws_url
    canvas = make_canvas(TEST_RESOLUTION, 4)

    async def bystander() -> list[np.ndarray]:
        async with Client.connect(url) as client:
            await client.hello(params={"prompt": "a quiet street", "seed": 3})
            frames = []
            for seed in (1, 2, 3):
                frames.append(decode_frame(await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, seed)))))
                await asyncio.sleep(0.1)
            return frames

    async def failing() -> None:
        async with Client.connect(url) as client:
            await client.hello(params={"prompt": f"a {BROKEN_TOKEN} in a field"})
            seq = await client.send_canvas(canvas)
            error = await client.expect("error")
            assert error["code"] == "inference_failed" and error["fatal"] is False
            assert error["ref_seq"] == seq and "IndexError" in error["message"]
            # The session lives on, and the slot renders again once the input can be rendered.
            assert (await client.ping())["type"] == "pong"
            frame = await client.frame_for(await client.send_params(prompt="a field"))
            assert decode_frame(frame).shape == (TEST_RESOLUTION, TEST_RESOLUTION, 3)
            # The same failure again is reported again; the worker does not give up on the session.
            await client.send_params(prompt=BROKEN_TOKEN)
            assert (await client.expect("error"))["code"] == "inference_failed"
            await client.frame_for(await client.send_params(prompt="a meadow"))

    alone = await bystander()
    together, _ = await asyncio.gather(bystander(), failing())
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert "frame failed for session" in misconfigured_server.log()
