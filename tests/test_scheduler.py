"""The render scheduler through real servers: several sessions per slot, their frames in one UNet call,
each session still getting its own frames; round-robin when the batch is capped; admission counted
in sessions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, decode_frame, make_canvas
from streamcanvas.codecs.images import ImageFormat
from transport_clients import LOOPBACK_ARGS, use_loopback_ice

SESSIONS = [  # what four people on one slot might be doing: different prompts, seeds, strengths, steps
    {"prompt": "a red house", "seed": 5, "strength": 0.5, "steps": 2},
    {"prompt": "a blue house", "seed": 6, "strength": 0.6, "steps": 2},
    {"prompt": "a green boat", "seed": 7, "strength": 0.4, "steps": 1},
    {"prompt": "a dark house", "seed": 8, "strength": 0.5, "steps": 3, "cfg_type": "full", "guidance_scale": 1.5},
]


SIDE = 256
"""The fairness test's sessions: large enough that a round takes longer than the flood's input interval."""


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def shared_slot(request: pytest.FixtureRequest, cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    """One slot that serves four sessions at once, batching them, on each backend a CPU has."""
    process = start_server(
        cache_dir, artifacts_dir, f"shared-slot-{request.param}",
        "--slots", "1", "--sessions-per-slot", "4", "--max-waiting", "0", "--backend", request.param,
    )  # fmt: skip
    assert process.info()["backend"]["name"] == request.param
    yield process
    process.stop()


@pytest.fixture(scope="module")
def capped_slot(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    """Three sessions on one slot with a frame-time target no round can meet: the batch shrinks to one
    session a round, and round-robin is all that keeps them fair."""
    process = start_server(
        cache_dir, artifacts_dir, "capped-slot", "--slots", "1", "--sessions-per-slot", "3", "--frame-target", "1"
    )
    yield process
    process.stop()


async def render(client: Client, canvas: np.ndarray) -> np.ndarray:
    return decode_frame(await client.frame_for(await client.send_canvas(canvas), timeout=60))


async def wait_for_places(server: ServerProcess, expected: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (info := server.info())["session_places_free"] != expected:
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)
    return info


def mean_rgb(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(-1, 3).astype(float).mean(axis=0)


async def test_sessions_sharing_a_slot_each_get_their_own_frames(shared_slot: ServerProcess) -> None:
    canvases = [make_canvas(TEST_RESOLUTION, 40 + frame) for frame in range(3)]
    # Each session alone first: the frames it must get when it shares the slot.
    alone = []
    for params in SESSIONS:
        async with Client.connect(shared_slot.ws_url) as client:
            await client.hello(params=params)
            alone.append([await render(client, canvas) for canvas in canvases])
    await wait_for_places(shared_slot, 4)
    batched_before = shared_slot.info()["batched_frames"]

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.connect(shared_slot.ws_url)) for _ in SESSIONS]
        for client, params in zip(clients, SESSIONS):
            await client.hello(params=params)
        info = shared_slot.info()
        assert info["slots_total"] == 1 and info["sessions_per_slot"] == 4 and info["session_capacity"] == 4
        assert info["overlap_decode"] == "auto"  # on a CPU device: for streams on ONNX Runtime
        assert info["session_places_free"] == 0 and info["slots"] == [{"sessions": 4, "capacity": 4, "batch_limit": 4}]
        # A fifth session finds no place: capacity is counted in sessions, not slots.
        async with Client.connect(shared_slot.ws_url) as late:
            await late.send_raw(b"\x83\xa4type\xa5hello\xa8protocol\x91\x01\xa5queue\xc2")
            assert (await late.expect("busy", timeout=10))["slots_total"] == 1
            with pytest.raises(websockets.ConnectionClosed):
                await late.recv(timeout=10)
        together = []
        for canvas in canvases:  # everyone draws at once
            together.append(await asyncio.gather(*(render(client, canvas) for client in clients)))

    assert shared_slot.info()["batched_frames"] > batched_before, "the sessions never shared a UNet call"
    for frame, frames in enumerate(together):
        for index, image in enumerate(frames):
            difference = np.abs(image.astype(int) - alone[index][frame].astype(int))
            assert difference.max() <= 2 and difference.mean() < 0.05, (SESSIONS[index], frame, difference.max())
    # The frames are the sessions' own, not one another's: the red house is redder than the blue one,
    # the dark one darker than the rest.
    last = [mean_rgb(frames) for frames in together[-1]]
    assert (last[0][0] - last[0][2]) - (last[1][0] - last[1][2]) > 30, last
    assert last[3].mean() < min(last[0].mean(), last[1].mean(), last[2].mean()) - 20, last
    await wait_for_places(shared_slot, 4)


async def test_a_session_that_never_stops_drawing_does_not_starve_the_others(capped_slot: ServerProcess) -> None:
    async with contextlib.AsyncExitStack() as stack:
        busy, calm, quiet = [await stack.enter_async_context(Client.connect(capped_slot.ws_url)) for _ in range(3)]
        for client, params in zip((busy, calm, quiet), SESSIONS):
            await client.hello(params=params, width=SIDE, height=SIDE)
        stop = asyncio.Event()
        flood_canvases = [make_canvas(SIDE, seed) for seed in range(7)]

        async def flood() -> int:  # a new canvas every 2 ms: always one waiting when a round begins
            sent, until = 0, time.monotonic() + 30
            while not stop.is_set() and sent < 15_000 and time.monotonic() < until:
                await busy.send_canvas(flood_canvases[sent % 7], ImageFormat.RAW)
                sent += 1
                await asyncio.sleep(0.002)
            return sent

        async def drain() -> int:
            frames = 0
            with contextlib.suppress(TimeoutError):
                while not stop.is_set():
                    frames += (await busy.recv(timeout=1))["type"] == "frame"
            return frames

        flooding, draining = asyncio.create_task(flood()), asyncio.create_task(drain())
        try:
            await asyncio.sleep(0.5)
            # With one session a round, the two that draw now and then are still served in turn: within
            # a few rounds (about 0.1 s each), not once the flood is over (30 s).
            for round_ in range(3):
                for client in (calm, quiet):
                    frame = await client.frame_for(await client.send_canvas(make_canvas(SIDE, 60 + round_)), timeout=5)
                    assert frame["width"] == SIDE
        finally:
            stop.set()
        sent, busy_frames = await flooding, await draining
        assert sent > 20 and busy_frames > 3, (sent, busy_frames)
        info = capped_slot.info()
        assert info["slots"][0]["batch_limit"] == 1, info  # every round missed the 1 ms target
    await wait_for_places(capped_slot, 3)


async def test_without_batching_a_shared_slot_renders_sessions_one_by_one(cache_dir: Path, artifacts_dir: Path) -> None:
    server = start_server(
        cache_dir, artifacts_dir, "round-robin", "--slots", "1", "--sessions-per-slot", "2", "--no-batching", "--overlap-decode", "off"
    )
    try:
        assert server.info()["overlap_decode"] == "off"
        canvas = make_canvas(TEST_RESOLUTION, 3)
        async with Client.connect(server.ws_url) as first, Client.connect(server.ws_url) as second:
            await first.hello(params=SESSIONS[0])
            await second.hello(params=SESSIONS[1])
            for _ in range(3):
                red, blue = await asyncio.gather(render(first, canvas), render(second, canvas))
        assert server.info()["batched_frames"] == 0
        assert (mean_rgb(red)[0] - mean_rgb(red)[2]) - (mean_rgb(blue)[0] - mean_rgb(blue)[2]) > 30
    finally:
        server.stop()


async def test_a_websocket_and_a_webrtc_session_share_a_slot(cache_dir: Path, artifacts_dir: Path) -> None:
    """Their frames go out differently (a frame message; the video track, with nothing encoded for the
    data channel) but render in the same UNet calls."""
    from test_transports import connect

    use_loopback_ice()
    server = start_server(cache_dir, artifacts_dir, "mixed-slot", "--slots", "1", "--sessions-per-slot", "2", *LOOPBACK_ARGS)
    try:
        async with connect("webrtc", server, params=SESSIONS[1]) as peer, Client.connect(server.ws_url) as client:
            await client.hello(params=SESSIONS[0])
            assert server.info()["session_places_free"] == 0
            deadline = time.monotonic() + 60
            peer_frames = 0
            while server.info()["batched_frames"] == 0 or peer_frames < 3:
                assert time.monotonic() < deadline, server.info()
                await render(client, make_canvas(TEST_RESOLUTION, 2))
                with contextlib.suppress(TimeoutError):
                    while (message := await peer.recv(timeout=0.2, keep_stats=True))["type"] != "stats":
                        pass
                    peer_frames = message["frames"]
            assert message["timings_ms"]["encode_ms"] == 0
    finally:
        server.stop()


def test_sessions_per_slot_auto_follows_its_own_measurement(cache_dir: Path, artifacts_dir: Path) -> None:
    """`auto` times rounds of 1, 2, 4 … sessions rendered together at start-up and takes the most whose
    round stays within 1.5× one session's frame: whatever this machine measured, the server's capacity
    is what that rule gives for the numbers it reports."""
    server = start_server(cache_dir, artifacts_dir, "auto-sharing", "--slots", "1", "--sessions-per-slot", "auto")
    try:
        info = server.info()
    finally:
        server.stop()
    sharing = info["sharing"]
    round_ms = {int(count): ms for count, ms in sharing["round_ms"].items()}
    assert sharing["policy"] == "auto" and 1 in round_ms and len(round_ms) >= 2, sharing
    within = [count for count, ms in round_ms.items() if ms <= sharing["latency_factor"] * round_ms[1]]
    expected = max(count for count in within if all(c in within for c in round_ms if c <= count))
    assert sharing["sessions_per_slot"] == expected == info["sessions_per_slot"] == info["session_capacity"], sharing
    assert info["slots"][0]["capacity"] == expected and sharing["reason"]
