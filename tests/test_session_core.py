"""The session core on its own: bytes in through `handle()`, bytes out of `pending_control()` /
`next_outgoing()`, a broker written here, and the slot's side (`take_job`, `deliver`) called directly.
No server, no socket, no model: what python-websockets does for its protocol object."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import numpy as np

from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import Canvas, ImagePayload, serialize
from streamcanvas.sessions.broadcast import BroadcastFrame
from streamcanvas.sessions.config import SessionConfig
from streamcanvas.sessions.jobs import DeliveredFrame
from streamcanvas.sessions.mailbox import Latest
from streamcanvas.sessions.session import CloseReason, Session, SessionState

HELLO = b"\x82\xa4type\xa5hello\xa8protocol\x91\x01"  # {"type": "hello", "protocol": [1]}
HELLO_QUEUE = b"\x83\xa4type\xa5hello\xa8protocol\x91\x01\xa5queue\xc3"  # ... "queue": true
PING = b"\x83\xa4type\xa4ping\xa1t\xcb?\xf0\x00\x00\x00\x00\x00\x00\xa3seq\x07"  # t=1.0, seq=7
NOT_MSGPACK = b"\xc1"  # a byte MsgPack never uses
CONFIG = SessionConfig(default_width=64, default_height=64)


class Broker:
    """A broker with `places` seats and a line of `line`; it records what the session asked of it."""

    def describe_model(self, name: str | None) -> dict[str, object]:
        return {"name": "no model"} if name is None else {"name": name}

    def __init__(self, places: int = 1, line: int = 0) -> None:
        self.places, self.line = places, line
        self.seated: list[Session] = []
        self.waiting: list[Session] = []
        self.forgotten: list[Session] = []

    @property
    def slots_total(self) -> int:
        return self.places

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def acquire(self, session: Session) -> bool:
        if len(self.seated) >= self.places:
            return False
        self.seated.append(session)
        return True

    def enqueue(self, session: Session) -> int | None:
        if len(self.waiting) >= self.line:
            return None
        self.waiting.append(session)
        return len(self.waiting)

    def issue_token(self, session_id: str, role: str) -> str:
        return f"{role}:{session_id}"

    def resume(self, session: Session, session_id: str, token: str) -> bool:
        if token != self.issue_token(session_id, "control"):
            return False
        session.id = session_id
        return True

    def forget(self, session: Session) -> None:
        self.forgotten.append(session)
        for group in (self.seated, self.waiting):
            if session in group:
                group.remove(session)


def answers(session: Session) -> list[dict[str, Any]]:
    out = []
    while (raw := session.pending_control()) is not None:
        out.append(msgpack.unpackb(raw))
    return out


def canvas_bytes(value: int, seq: int) -> bytes:
    rgb = np.full((64, 64, 3), value, np.uint8)
    return serialize(Canvas(image=ImagePayload(ImageFormat.RAW, rgb.tobytes(), 64, 64), seq=seq))


async def test_hello_seats_the_session_and_answers_ready_with_the_brokers_tokens() -> None:
    broker = Broker()
    session = Session(broker, CONFIG, "test")
    await session.handle(HELLO)
    [ready] = answers(session)
    assert ready["type"] == "ready" and ready["width"] == 64 and ready["model"] == {"name": "no model"}
    assert ready["token"] == f"control:{session.id}" and ready["viewer_token"] == f"viewer:{session.id}"
    assert broker.seated == [session] and session.state is SessionState.READY
    await session.handle(PING)
    assert answers(session) == [{"type": "pong", "t": 1.0, "seq": 7}]
    session.close(CloseReason.CLIENT_LEFT)
    assert broker.forgotten == [session] and await session.next_outgoing() is None


RENEW = b"\x82\xa4type\xacrenew_tokens\xa3seq\x09"  # {"type": "renew_tokens", "seq": 9}


async def test_renew_tokens_answers_fresh_ones_once_the_session_is_ready() -> None:
    class Counting(Broker):
        issued = 0

        def issue_token(self, session_id: str, role: str) -> str:
            self.issued += 1
            return f"{role}:{session_id}:{self.issued}"

    session = Session(Counting(), CONFIG, "test")
    await session.handle(RENEW)
    [early] = answers(session)
    assert early["code"] == "not_ready" and early["ref_seq"] == 9 and early["ref_type"] == "renew_tokens"
    await session.handle(HELLO)
    [ready] = answers(session)
    await session.handle(RENEW)
    [tokens] = answers(session)
    assert tokens == {"type": "tokens", "token": f"control:{session.id}:3", "viewer_token": f"viewer:{session.id}:4",
                      "ttl_s": CONFIG.token_ttl_s, "ref_seq": 9}
    assert {tokens["token"], tokens["viewer_token"]}.isdisjoint({ready["token"], ready["viewer_token"]})
    session.close(CloseReason.CLIENT_LEFT)


async def test_a_hello_may_resume_an_earlier_session_under_its_id() -> None:
    """hello.resume with the earlier session's control token: the new session takes its id (ready says
    so); with any other token it keeps its own id and ready says it was not resumed."""
    for token, resumed in (("control:abc123", True), ("viewer:abc123", False), ("control:other", False)):
        session = Session(Broker(), CONFIG, "test")
        own_id = session.id
        await session.handle(msgpack.packb({"type": "hello", "protocol": [1], "resume": {"session_id": "abc123", "token": token}}))
        [ready] = answers(session)
        assert (ready["session_id"], ready["resumed"]) == (("abc123" if resumed else own_id), resumed)
        assert ready["token"] == f"control:{ready['session_id']}"
        session.close(CloseReason.CLIENT_LEFT)
    plain = Session(Broker(), CONFIG, "test")
    await plain.handle(HELLO)
    assert "resumed" not in answers(plain)[0]  # asked for nothing, told nothing
    for resume, field in (("abc", "resume"), ({"session_id": "abc"}, "token"), ({"session_id": "a", "token": "t", "x": 1}, "x")):
        session = Session(Broker(), CONFIG, "test")
        await session.handle(msgpack.packb({"type": "hello", "protocol": [1], "resume": resume}))
        [error] = answers(session)
        assert (error["code"], error["field"]) == ("invalid_field", field), error


async def test_bad_bytes_get_typed_errors_and_the_session_goes_on() -> None:
    session = Session(Broker(), CONFIG, "test")
    await session.handle(NOT_MSGPACK)
    await session.handle(canvas_bytes(0, seq=3))  # before hello
    malformed, early = answers(session)
    assert malformed["code"] == "malformed_message" and not malformed.get("fatal")
    assert early["code"] == "not_ready" and early["ref_seq"] == 3 and early["ref_type"] == "canvas"
    await session.handle(HELLO)
    assert answers(session)[0]["type"] == "ready"
    await session.handle(b"\x82\xa4type\xa7unknown\xa3seq\x05")
    [unknown] = answers(session)
    assert unknown["code"] == "unknown_message_type" and unknown["ref_seq"] == 5
    assert session.state is SessionState.READY
    session.close(CloseReason.CLIENT_LEFT)


async def test_no_place_means_busy_and_the_end_or_a_place_in_line() -> None:
    full = Broker(places=0)
    turned_away = Session(full, CONFIG, "test")
    await turned_away.handle(HELLO)
    [busy] = answers(turned_away)
    assert busy["type"] == "busy" and "queue_position" not in busy
    assert turned_away.close_reason is CloseReason.BUSY and full.forgotten == [turned_away]

    with_line = Broker(places=0, line=1)
    waiting = Session(with_line, CONFIG, "test")
    await waiting.handle(HELLO_QUEUE)
    [in_line] = answers(waiting)
    assert in_line["queue_position"] == 1 and waiting.state is SessionState.QUEUED
    await waiting.handle(canvas_bytes(9, seq=1))  # drawing while in line is kept
    waiting.bind()  # a place came free
    [ready] = answers(waiting)
    assert ready["type"] == "ready" and waiting.state is SessionState.STREAMING
    job = waiting.take_job(settled=True, flush=False)
    assert job is not None and int(job.image[0, 0, 0]) == 9
    waiting.close(CloseReason.CLIENT_LEFT)
    assert with_line.forgotten == [waiting]


async def test_the_slot_side_takes_the_newest_input_once_and_the_frame_goes_out_latest_wins() -> None:
    session = Session(Broker(), CONFIG, "test")
    woken: list[bool] = []
    session.set_waker(lambda: woken.append(True))
    await session.handle(HELLO)
    answers(session)
    assert session.take_job(settled=True, flush=True) is None  # nothing drawn yet
    for seq, value in ((1, 10), (2, 20), (3, 30)):
        await session.handle(canvas_bytes(value, seq))
    assert len(woken) == 3
    job = session.take_job(settled=True, flush=False)
    assert job is not None and job.newest.client_seq == 3 and job.dropped == 2 and job.fresh
    assert int(job.image[0, 0, 0]) == 30 and (job.width, job.height, job.codec) == (64, 64, ImageFormat.JPEG)
    assert job.wants_message and not job.wants_jpeg and job.recorder is None
    assert session.take_job(settled=True, flush=True) is None  # taken, and the stream has settled
    assert session.take_job(settled=False, flush=False) is None  # not settled, but not yet time to flush
    again = session.take_job(settled=False, flush=True)
    assert again is not None and not again.fresh and again.newest == job.newest

    rgb = np.zeros((64, 64, 3), np.uint8)
    for payload in (b"older frame", b"newer frame"):
        session.deliver(DeliveredFrame(payload, job.newest, {}), 0, BroadcastFrame(1, rgb, 64, 64))
    await asyncio.sleep(0)  # deliver() hops to the loop (call_soon_threadsafe): let it run
    assert await session.next_outgoing() == b"newer frame"
    assert session.stats.dropped_frames == 1 and session.stats.frames == 1

    session.frames_to_client = False  # a WebRTC session: its frames go out on the video track
    await session.handle(canvas_bytes(40, seq=4))
    job = session.take_job(settled=True, flush=False)
    assert job is not None and not job.wants_message
    session.close(CloseReason.CLIENT_LEFT)
    assert session.take_job(settled=False, flush=True) is None


async def test_the_latest_wins_mailbox() -> None:
    """One box type behind the outgoing frame (take), the viewers (newer) and the WebRTC input (get)."""
    box: Latest[str] = Latest()
    assert box.take() is None and not box.waiting
    assert box.put("a") is False and box.put("b") is True  # "a" was never taken: a drop
    assert box.take() == "b" and box.take() is None and box.value == "b"
    watchers = [asyncio.create_task(box.newer(box.version)) for _ in range(3)]
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not any(task.done() for task in (*watchers, getter))
    box.put("c")
    assert [await task for task in watchers] == [(3, "c")] * 3 and await getter == "c"
    late = asyncio.create_task(box.get())
    box.close()
    assert await late is None and await box.newer(0) is None
