"""Slots: busy answers, waiting in line, disconnects and idle timeouts free a slot at once.

Over both transports (the `transport` fixture), except waiting in line: a WebRTC offer is one HTTP
request and cannot wait (a busy server answers it 503 at once, tested here too)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TEST_RESOLUTION, start_server
from helpers import Client, ServerProcess, make_canvas
from transport_clients import CLOSED, LOOPBACK_ARGS, open_session, refused_hello

IDLE_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def one_slot_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        cache_dir, artifacts_dir, "one-slot", "--slots", "1", "--max-waiting", "1", "--idle-timeout", str(IDLE_TIMEOUT_S),
        *LOOPBACK_ARGS,
    )
    yield process
    process.stop()


async def wait_for_free_slots(server: ServerProcess, expected: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = server.info()
        if info["slots_free"] == expected or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.05)


async def test_all_slots_busy_gets_a_busy_answer_not_a_hang(one_slot_server: ServerProcess, transport: str) -> None:
    async with open_session(transport, one_slot_server):
        refusal = await refused_hello(transport, one_slot_server, {"type": "hello", "protocol": [1]})
        busy = refusal["busy"]
        assert refusal["code"] == "busy" and busy is not None, refusal
        assert "queue_position" not in busy  # not put in line: the key is absent (docs/protocol.md)
        assert busy["slots_total"] == 1 and busy["retry_after_s"] > 0
        assert refusal.get("close_code", 1013) == 1013 and refusal.get("status", 503) == 503, refusal
    info = await wait_for_free_slots(one_slot_server, 1)
    assert info["slots_free"] == 1 and info["sessions"] == 0


async def test_waiting_in_line_then_ready_when_the_slot_frees(one_slot_server: ServerProcess) -> None:
    async with contextlib.AsyncExitStack() as stack:
        second = await stack.enter_async_context(Client.connect(one_slot_server.ws_url))
        async with Client.connect(one_slot_server.ws_url) as first:
            await first.hello()
            await second.send_raw(_hello_bytes(queue=True))
            busy = await second.expect("busy", timeout=5)
            assert busy["queue_position"] == 1
            # The line holds one: a third client that asks to wait is told to retry instead.
            async with Client.connect(one_slot_server.ws_url) as third:
                await third.send_raw(_hello_bytes(queue=True))
                refused = await third.expect("busy", timeout=5)
                assert "queue_position" not in refused
            # A waiting client may already send its canvas; it renders once the slot is its own.
            seq = await second.send_canvas(make_canvas(TEST_RESOLUTION, 3))
        ready = await second.expect("ready", timeout=10)
        assert ready["session_id"]
        frame = await second.frame_for(seq)
        assert frame["input_seq"] == seq


async def test_disconnect_during_inference_frees_the_slot(one_slot_server: ServerProcess, transport: str) -> None:
    for attempt in range(3):
        async with open_session(transport, one_slot_server, width=256, height=256) as client:
            await client.send_canvas(make_canvas(256, attempt))
            await asyncio.sleep(0.05)  # the worker has taken the canvas and is rendering it
        info = await wait_for_free_slots(one_slot_server, 1)
        assert info["slots_free"] == 1, info
    async with open_session(transport, one_slot_server) as client:
        frame = await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, 9)))
        assert frame["type"] == "frame"


async def test_idle_timeout_frees_the_slot(one_slot_server: ServerProcess, transport: str) -> None:
    async with open_session(transport, one_slot_server) as client:
        started = time.monotonic()
        error = await client.expect("error", timeout=IDLE_TIMEOUT_S + 10)
        assert error["code"] == "idle_timeout" and error["fatal"] is True
        assert time.monotonic() - started >= IDLE_TIMEOUT_S - 0.5
        with pytest.raises(CLOSED) as closed:
            await client.recv(timeout=5)
        if transport == "websocket":
            assert closed.value.rcvd.code == 1001
    assert (await wait_for_free_slots(one_slot_server, 1))["slots_free"] == 1


async def test_many_connections_leave_nothing_behind(one_slot_server: ServerProcess, transport: str) -> None:
    def threads() -> int:
        status = Path(f"/proc/{one_slot_server.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])

    async def short_session(index: int) -> None:
        async with open_session(transport, one_slot_server) as client:
            await client.frame_for(await client.send_canvas(make_canvas(TEST_RESOLUTION, index)))

    await short_session(0)
    baseline = threads()
    for index in range(12):
        await short_session(index)
    # Abrupt ends too: WebSocket connections dropped without a close handshake, peer connections closed
    # while their canvas renders.
    for index in range(4):
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(open_session(transport, one_slot_server))
            await client.send_canvas(make_canvas(TEST_RESOLUTION, index))
            if transport == "websocket":
                client.connection.transport.abort()
        await wait_for_free_slots(one_slot_server, 1)
    info = await wait_for_free_slots(one_slot_server, 1)
    assert info["sessions"] == 0 and info["slots_free"] == 1 and info["queue_length"] == 0
    assert threads() <= baseline + 2  # the default executor may have grown by a thread or two, no more


def _hello_bytes(queue: bool = False) -> bytes:
    from streamcanvas.codecs.images import ImageFormat
    from streamcanvas.codecs.messages import Hello, serialize

    return serialize(Hello(protocol=(1,), codec=ImageFormat.PNG, queue=queue))
