"""End to end: a real server process on a loopback port, the trained toy model, real clients over a
WebSocket and over WebRTC's data channel alike (the `transport` fixture; WebSocket compression is
the WebSocket's own)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from conftest import TEST_RESOLUTION
from helpers import Client, ServerProcess, decode_frame, make_canvas
from transport_clients import open_session, use_loopback_ice

SIZE = TEST_RESOLUTION


async def test_health_and_info(server: ServerProcess) -> None:
    health = httpx.get(f"{server.base_url}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ready"}
    info = server.info()
    assert info["model"]["test_model"] is True and info["model"]["toy_model"] == "trained"
    assert info["model"]["device"] == "cpu" and info["model"]["dtype"] == "float32"
    assert info["model"]["vae"].startswith("AutoencoderTiny")
    assert info["resolution"] == {"width": SIZE, "height": SIZE}
    assert info["slots_total"] == 2
    assert info["protocol_versions"] == [1]


async def test_ready_describes_the_session(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server, params={"prompt": "a red house", "seed": 7}) as client:
        ready = client.ready
        assert ready["protocol"] == 1
        assert (ready["width"], ready["height"]) == (SIZE, SIZE)
        assert ready["params"]["prompt"] == "a red house" and ready["params"]["seed"] == 7
        assert ready["limits"]["max_message_bytes"] > 0
        assert ready["model"]["test_model"] is True
        # Without API keys too, the session gets its own control token and a read-only viewer token.
        assert ready["token"] and ready["viewer_token"] and ready["token"] != ready["viewer_token"]


async def test_frames_follow_canvas_strokes_and_prompt(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server, params={"prompt": "a cat"}) as client:
        canvas = make_canvas(SIZE, seed=1)
        first = await client.frame_for(await client.send_canvas(canvas))
        assert (first["width"], first["height"], first["codec"]) == (SIZE, SIZE, "png")
        assert set(first["timings"]) == {"queue_ms", "inference_ms", "encode_ms"}
        before = decode_frame(first)
        assert before.shape == (SIZE, SIZE, 3)

        stroke = np.zeros((16, 48, 3), dtype=np.uint8)
        after_stroke = decode_frame(await client.frame_for(await client.send_patch(40, 40, stroke)))
        assert not np.array_equal(before, after_stroke), "a stroke must change the rendered frame"
        changed = np.abs(before.astype(int) - after_stroke.astype(int)).sum(axis=2) > 0
        assert changed.any()

        after_prompt = decode_frame(await client.frame_for(await client.send_params(prompt="a dog")))
        assert not np.array_equal(after_stroke, after_prompt), "a new prompt must change the frame"

        # Going back to the first prompt on the same canvas gives back the same frame: frames are a
        # function of canvas, prompt and seed, not of history, once the stream batch has settled.
        again = decode_frame(await client.frame_for(await client.send_params(prompt="a cat")))
        assert np.array_equal(after_stroke, again)


async def _render_alone(server: ServerProcess, transport: str, canvases: list[np.ndarray], prompt: str, seed: int) -> list[np.ndarray]:
    async with open_session(transport, server, params={"prompt": prompt, "seed": seed}) as client:
        frames = []
        for canvas in canvases:
            frames.append(decode_frame(await client.frame_for(await client.send_canvas(canvas))))
        return frames


async def test_same_inputs_and_seed_give_the_same_frames(server: ServerProcess, transport: str) -> None:
    canvases = [make_canvas(SIZE, seed) for seed in (3, 4)]
    one = await _render_alone(server, transport, canvases, "a lighthouse", seed=11)
    two = await _render_alone(server, transport, canvases, "a lighthouse", seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    other_seed = await _render_alone(server, transport, canvases, "a lighthouse", seed=12)
    assert not np.array_equal(one[0], other_seed[0])
    other_canvas = await _render_alone(server, transport, [make_canvas(SIZE, 5)], "a lighthouse", seed=11)
    assert not np.array_equal(one[0], other_canvas[0])


async def test_concurrent_sessions_get_frames_of_their_own_canvas(server: ServerProcess) -> None:
    """Each session alone over one transport, then both at once over the other: the same frames, bit
    for bit, whichever transport carried them and whoever else was rendering."""
    use_loopback_ice()
    canvases_a = [make_canvas(SIZE, seed) for seed in (21, 22, 23)]
    canvases_b = [make_canvas(SIZE, seed) for seed in (31, 32, 33)]
    alone_a = await _render_alone(server, "websocket", canvases_a, "a forest", seed=1)
    alone_b = await _render_alone(server, "webrtc", canvases_b, "a city", seed=2)
    together_a, together_b = await asyncio.gather(
        _render_alone(server, "webrtc", canvases_a, "a forest", seed=1),
        _render_alone(server, "websocket", canvases_b, "a city", seed=2),
    )
    for expected, got in zip(alone_a + alone_b, together_a + together_b):
        assert np.array_equal(expected, got), "a session's frames must not depend on other sessions or the transport"


async def test_txt2img_session_renders_from_the_prompt(server: ServerProcess, transport: str) -> None:
    async def render(prompt: str) -> np.ndarray:
        async with open_session(transport, server, mode="txt2img", params={"prompt": prompt}) as client:
            return decode_frame(await client.expect("frame"))

    first, same, other = await render("a moon"), await render("a moon"), await render("a sun")
    assert np.array_equal(first, same)
    assert not np.array_equal(first, other)


async def test_parameters_change_without_reloading(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server, params={"prompt": "a boat"}) as client:
        canvas = make_canvas(SIZE, 8)
        base = decode_frame(await client.frame_for(await client.send_canvas(canvas)))
        frames = {}
        for name, value in [("strength", 0.9), ("steps", 3), ("guidance_scale", 2.5), ("cfg_type", "initialize")]:
            frames[name] = decode_frame(await client.frame_for(await client.send_params(**{name: value})))
        assert all(not np.array_equal(base, frame) for frame in frames.values())
        pong = await client.ping()
        assert pong["type"] == "pong"


async def test_stats_report_frames_and_latency(server: ServerProcess, transport: str) -> None:
    async with open_session(transport, server) as client:
        for seed in range(3):
            await client.frame_for(await client.send_canvas(make_canvas(SIZE, seed)))
        while True:
            stats = await client.recv(keep_stats=True)
            if stats["type"] == "stats" and stats["frames"] >= 3:
                break
        assert stats["inputs"] == 3
        assert stats["latency_ms"]["p50"] > 0
        assert stats["dropped_inputs"] == 0
        assert stats["timings_ms"]["inference_ms"] > 0


@pytest.mark.parametrize("codec", ["jpeg", "webp", "png", "raw"])
async def test_every_frame_codec(server: ServerProcess, transport: str, codec: str) -> None:
    async with open_session(transport, server, codec=codec, quality=70) as client:
        frame = await client.frame_for(await client.send_canvas(make_canvas(SIZE, 2)))
        assert frame["codec"] == codec
        assert decode_frame(frame).shape == (SIZE, SIZE, 3)


async def test_compression_is_off_for_frame_traffic(server: ServerProcess) -> None:
    """Frames are already compressed: the server declines permessage-deflate even when offered."""
    async with Client.connect(server.ws_url, compression="deflate") as client:
        assert client.connection.response.headers.get("Sec-WebSocket-Extensions") is None
        await client.hello()


async def test_healthz_is_not_ready_before_the_model_is_warm(server: ServerProcess) -> None:
    """The log shows the warm-up finished before the first 200 from /healthz."""
    log = server.log()
    assert "warm-up done" in log
    assert log.index("warm-up done") < log.index('"GET /healthz HTTP/1.1" 200')


async def test_a_session_without_frame_messages_renders_but_sends_none(server: ServerProcess, transport: str) -> None:
    """`frame_messages: false`: a control connection whose frames are watched elsewhere (MJPEG, WHEP,
    the video track). Its canvas still renders, the stats count the frames, no frame message comes."""
    async with open_session(transport, server, frame_messages=False) as client:
        await client.send_canvas(make_canvas(SIZE, 6))
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            message = await client.recv(keep_stats=True)
            assert message["type"] == "stats", message
            if message["frames"] >= 1:
                break
            assert asyncio.get_running_loop().time() < deadline, "no frame rendered"
        assert message["inputs"] == 1


@pytest.mark.parametrize("path", ["/v1/foo", "/v1/foo/bar", "/v1/styles/watercolor", "/v1/models/toy", "/v1/info/x", "/v1/foo/bar/baz"])
@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
def test_a_path_that_does_not_exist_is_not_found(server: ServerProcess, path: str, method: str) -> None:
    """Anywhere under /v1/ (protocol.md): 404 not_found, whatever the method (two-part paths were taken
    for WHIP/WHEP resources: 405 "use PATCH or DELETE", or "no such WHIP/WHEP resource")."""
    answer = httpx.request(method, f"{server.base_url}{path}", timeout=10)
    assert answer.status_code == 404 and answer.json()["error"] == "not_found", (answer.status_code, answer.text)


def test_an_unknown_whip_or_whep_resource_is_unknown_resource(server: ServerProcess) -> None:
    for path in ("/v1/whip/0123", "/v1/whep/0123"):
        answer = httpx.delete(f"{server.base_url}{path}", timeout=10)
        assert answer.status_code == 404 and answer.json()["error"] == "unknown_resource", answer.text
