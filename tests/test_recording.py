"""Recording a session's output to MP4, started and stopped by the controlling client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import av
import httpx
import msgpack

from conftest import TEST_RESOLUTION
from helpers import Client, ServerProcess, make_canvas
from streamcanvas.codecs.messages import Record

SIZE = TEST_RESOLUTION


def decode_mp4(path: Path) -> list[tuple[int, int, float]]:
    with av.open(str(path)) as container:
        return [(frame.width, frame.height, float(frame.time)) for frame in container.decode(video=0)]


async def test_record_start_stop_and_download(server: ServerProcess, tmp_path: Path) -> None:
    async with Client.connect(server.ws_url) as client:
        ready = await client.hello()
        await client.send(Record(action="start", seq=100))
        started = await client.expect("recording")
        assert started["state"] == "started" and started["ref_seq"] == 100
        for seed in range(6):
            await client.frame_for(await client.send_canvas(make_canvas(SIZE, seed)))
        await client.send(Record(action="stop", seq=101))
        while (stopped := await client.recv())["type"] != "recording":
            assert stopped["type"] == "frame", stopped
        assert stopped["state"] == "stopped" and stopped["recording_id"] == started["recording_id"]
        assert stopped["frames"] >= 6 and stopped["dropped"] == 0 and stopped["bytes"] > 0
        url = f"{server.base_url}{stopped['url']}"
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.get(url)).status_code == 401
            viewer = await http.get(url, headers={"Authorization": f"Bearer {ready['viewer_token']}"})
            assert viewer.status_code == 403  # watching is not owning
            response = await http.get(url, headers={"Authorization": f"Bearer {ready['token']}"})
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        path = tmp_path / "recording.mp4"
        path.write_bytes(response.content)
    frames = decode_mp4(path)
    assert len(frames) == stopped["frames"]
    assert all((width, height) == (SIZE, SIZE) for width, height, _ in frames)
    times = [stamp for _, _, stamp in frames]
    assert times == sorted(times) and len(set(times)) == len(times)
    # Timestamps are when frames were rendered: the file lasts as long as the recording did.
    assert abs((times[-1] - times[0]) - stopped["duration_s"]) < 0.005


async def test_recording_mistakes_get_typed_errors(server: ServerProcess) -> None:
    async with Client.connect(server.ws_url) as client:
        await client.send(Record(action="start", seq=1))
        assert (await client.expect("error"))["code"] == "not_ready"  # before hello
        await client.hello()
        await client.send(Record(action="stop", seq=2))
        assert (await client.expect("error"))["code"] == "not_ready"
        await client.send_raw(msgpack.packb({"type": "record", "action": "pause"}))
        assert (await client.expect("error"))["field"] == "action"
        await client.send(Record(action="start"))
        await client.expect("recording")
        await client.send(Record(action="start"))
        assert (await client.expect("error"))["code"] == "not_ready"
        await client.send(Record(action="stop"))
        empty = await client.expect("recording")  # no frame came: no file, and no address that would 404
        assert (empty["state"], empty["frames"], empty["url"]) == ("stopped", 0, None)


async def test_a_recording_is_finished_when_the_session_ends(server: ServerProcess, cache_dir: Path) -> None:
    async with Client.connect(server.ws_url) as client:
        ready = await client.hello()
        await client.send(Record(action="start"))
        started = await client.expect("recording")
        for seed in range(3):
            await client.frame_for(await client.send_canvas(make_canvas(SIZE, seed)))
    path = cache_dir / "recordings" / f"{ready['session_id']}-{started['recording_id']}.mp4"
    deadline = time.monotonic() + 20
    while True:
        try:
            frames = decode_mp4(path)
            break
        except (av.FFmpegError, OSError):
            assert time.monotonic() < deadline, "the recording was not finished"
            await asyncio.sleep(0.2)
    assert len(frames) >= 3


def test_bursty_frames_still_make_a_valid_file(tmp_path: Path) -> None:
    """Frames arriving in bursts and pauses (as a worker delivers them) always mux into a valid MP4."""
    import random

    import numpy as np

    from streamcanvas.sessions.recording import Recorder

    chooser = random.Random(0)
    rng = np.random.default_rng(0)
    for attempt in range(6):
        recorder = Recorder(tmp_path / f"burst-{attempt}.mp4", 64, 64, max_seconds=60)
        for _ in range(chooser.randint(2, 25)):
            recorder.offer(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            time.sleep(chooser.choice([0, 0.0005, 0.002, 0.02]))
        summary = recorder.stop()
        assert summary.error is None, summary.error
        frames = decode_mp4(summary.path)
        assert len(frames) == summary.frames
        assert summary.frames + summary.dropped >= 2
        times = [stamp for _, _, stamp in frames]
        assert times == sorted(times)
