"""The WebSocket protocol fuzzed: a few thousand mutated client messages against a real server.

Cases come from tests/ws_fuzzer.py (seeded, so every run sends the same bytes). After each one the
fuzzing connection sends a `ping` with a fresh seq and reads until its `pong` (or an error that names
that ping): everything read in between answers the case. Whatever comes back must keep the documented
contract — every `error` a map with a documented `code` (parsed from docs/protocol.md), a string
`message` and a boolean `fatal`; a fatal error followed by the documented close code; no close without
one — and the connection reconnects after a fatal error and goes on. A neighbour session on the same
server streams canvases all along and must keep getting its frames, with no error. Afterwards the
server has no fuzz session left, is healthy, and its log holds no traceback.

Traffic stays on 127.0.0.1; the run is bounded in cases (FUZZ_CASES) and in time (FUZZ_BUDGET_S).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from conftest import TEST_RESOLUTION, start_server
from helpers import ServerProcess, encode_payload, make_canvas
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import Canvas, Hello, Ping, serialize
from ws_fuzzer import FuzzCase, Fuzzer, plan

# The same cases every run; set STREAMCANVAS_WS_FUZZ_SEED (and _CASES) locally to explore further.
SEED = int(os.environ.get("STREAMCANVAS_WS_FUZZ_SEED", "20261123"))
FUZZ_CASES = int(os.environ.get("STREAMCANVAS_WS_FUZZ_CASES", "3000"))
FUZZ_BUDGET_S = 40.0
"""Wall-time bound of the fuzz loop: it stops early (and says so) rather than run on."""
MIN_CASES = 1500
"""Fewer cases than this sent within the budget is a failure: the run would prove too little."""
ANSWER_TIMEOUT_S = 15.0
"""How long one case may go unanswered (its ping's pong) before it counts as a hang."""
NEIGHBOUR_INTERVAL_S = 0.3
NEIGHBOUR_MAX_LAG_S = 10.0
"""An input of the neighbour must be answered by a frame within this long, at any point of the run."""
SYNC_SEQ_BASE = 9_000_000_000_000_000 // 1000  # far from any seq the fuzzer writes
SERVER_MESSAGE_TYPES = {"ready", "busy", "frame", "stats", "recording", "pong", "error"}
PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


# ---------------------------------------------------------------------------------------------------
# The contract, read from the protocol document


@dataclass(frozen=True)
class DocumentedErrors:
    codes: dict[str, str]
    """code → its `fatal` column: "yes", "no" or "no*" (fatal when in a hello)."""
    close_codes: dict[int, str]


def documented_errors(path: Path = PROTOCOL_DOC) -> DocumentedErrors:
    text = path.read_text()
    section = text.split("### `error`", 1)[1]
    codes: dict[str, str] = {}
    in_table = False
    for line in section.splitlines():
        if line.startswith("|"):
            in_table = True
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            match = re.fullmatch(r"`([a-z_]+)`", cells[0])
            if match:
                codes[match.group(1)] = cells[1] if len(cells) > 1 else ""
        elif in_table:
            break  # the first table under the heading is the error table
    closes_section = text.split("## Close codes", 1)[1].split("\n## ", 1)[0]
    close_codes = {int(code): meaning.strip() for code, meaning in re.findall(r"(\d{4})\s+([^·\n]+)", closes_section)}
    return DocumentedErrors(codes, close_codes)


DOC = documented_errors()


def expected_close_code(error_code: str) -> int:
    """The close code the doc gives a fatal error's connection: 1001 idle, 1013 busy, 1008 otherwise."""
    if error_code == "idle_timeout":
        return 1001
    if error_code == "busy":
        return 1013
    return 1008


def contract_problems(message: Any) -> list[str]:
    """What is wrong with one server message under the documented contract (nothing: [])."""
    if not isinstance(message, dict):
        return [f"not a map: {message!r:.200}"]
    kind = message.get("type")
    if kind not in SERVER_MESSAGE_TYPES:
        return [f"unknown server message type {kind!r}"]
    if kind != "error":
        return []
    problems = []
    code, text, fatal = message.get("code"), message.get("message"), message.get("fatal")
    if not isinstance(code, str):
        problems.append(f"error code is not a string: {code!r}")
    elif code not in DOC.codes:
        problems.append(f"error code {code!r} is not in the error table of docs/protocol.md")
    if not isinstance(text, str):
        problems.append(f"error message is not a string: {text!r:.100}")
    if not isinstance(fatal, bool):
        problems.append(f"error fatal is not a boolean: {fatal!r}")
    elif isinstance(code, str) and code in DOC.codes:
        column = DOC.codes[code]
        if column == "yes" and not fatal:
            problems.append(f"{code} is documented as fatal but came with fatal=false")
        # "Any error in a hello is fatal": a code that is otherwise never fatal may be, for a hello.
        if column == "no" and fatal and message.get("ref_type") != "hello":
            problems.append(f"{code} is documented as never fatal but came with fatal=true")
    return problems


# ---------------------------------------------------------------------------------------------------
# The fuzzing connection


@dataclass
class Outcome:
    answers: list[dict[str, Any]] = field(default_factory=list)
    """What answered the case: everything but frames, stats and the sync ping's own answer."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    close_code: int | None = None
    closed: bool = False
    synced: bool = False
    frames: int = 0

    def describe(self) -> str:
        shown = [
            {key: (value if not isinstance(value, (str, bytes)) or len(value) < 160 else f"{value[:160]!r}…") for key, value in answer.items()}
            for answer in self.answers
        ]
        closed = f", then closed with {self.close_code}" if self.closed else ""
        synced = "" if self.synced or self.closed else ", and the sync ping was never answered"
        return f"{shown}{closed}{synced}"


class FuzzConnection:
    """One WebSocket at a time; reconnects whenever a case needs a fresh connection or the last one died."""

    def __init__(self, url: str, fuzzer: Fuzzer) -> None:
        self.url = url
        self.fuzzer = fuzzer
        self.ws: websockets.ClientConnection | None = None
        self.state = "closed"  # closed | pre (before hello) | session (hello accepted: ready or in line)
        self.sync_seqs = itertools.count(SYNC_SEQ_BASE)
        self.connections = 0
        self.control_messages = 0

    async def _open(self) -> None:
        await self.close()
        self.ws = await websockets.connect(self.url, max_size=None, compression=None, open_timeout=30, close_timeout=5)
        self.state = "pre"
        self.connections += 1

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = None
        self.state = "closed"

    async def prepare(self, phase: str, problems: list[str]) -> None:
        """Bring the connection into the state the next case is sent in."""
        if phase in ("pre", "hello"):
            if self.state != "pre":
                await self._open()
            return
        for _ in range(5):
            if self.state == "closed":
                await self._open()
            if self.state == "session":
                return
            outcome = await self.exchange(serialize(self.fuzzer.valid_hello()))
            self.control_messages += 1
            problems.extend(f"{problem}\n  case: a valid hello\n  got: {outcome.describe()}" for problem in outcome.problems)
            if self.state == "session":
                return
            problems.append(f"a valid hello was not accepted\n  got: {outcome.describe()}")
            await self.close()
            await asyncio.sleep(0.2)
        raise AssertionError(f"no fuzz session could be started: {problems[-5:]}")

    async def exchange(self, data: bytes | str) -> Outcome:
        """Send one message and a sync ping; read everything up to the ping's answer (or the close)."""
        assert self.ws is not None
        outcome = Outcome()
        sync_seq = next(self.sync_seqs)
        try:
            await self.ws.send(data)
            await self.ws.send(serialize(Ping(t=0.0, seq=sync_seq)))
            self.control_messages += 1
        except websockets.ConnectionClosed:
            pass  # read what came before the close, and the close itself
        fatal: dict[str, Any] | None = None
        busy_refused = False
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if fatal is not None:
                    outcome.problems.append(f"no close within {ANSWER_TIMEOUT_S:g} s of a fatal error")
                else:
                    outcome.problems.append(f"no answer to the sync ping within {ANSWER_TIMEOUT_S:g} s (a hang)")
                await self.close()
                break
            try:
                raw = await asyncio.wait_for(self.ws.recv(), remaining)
            except TimeoutError:
                continue
            except websockets.ConnectionClosed as closed:
                outcome.closed = True
                outcome.close_code = closed.rcvd.code if closed.rcvd is not None else None
                self.ws = None
                self.state = "closed"
                break
            if not isinstance(raw, bytes):
                outcome.problems.append(f"a text message from the server: {raw!r:.200}")
                continue
            try:
                message = msgpack.unpackb(raw, raw=False)
            except Exception as error:  # noqa: BLE001 - anything unreadable is a finding
                outcome.problems.append(f"an unreadable server message ({error}): {raw[:100]!r}")
                continue
            outcome.problems.extend(contract_problems(message))
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            if kind == "stats":
                continue
            if kind == "frame":
                outcome.frames += 1
                continue
            if kind == "error" and message.get("fatal") is True and fatal is None:
                fatal = message
            if kind == "ready" or (kind == "busy" and message.get("queue_position") is not None):
                self.state = "session"
            if kind == "busy" and message.get("queue_position") is None:
                busy_refused = True
            sync_answer = (kind == "pong" and message.get("seq") == sync_seq) or (
                kind == "error" and message.get("ref_seq") == sync_seq and message.get("ref_type") == "ping"
            )
            if sync_answer:
                outcome.synced = True
                if fatal is None:
                    break
                continue  # after a fatal error only the close may come: read on until it does
            outcome.answers.append(message)
            if kind == "error":
                outcome.errors.append(message)
        if outcome.closed:
            if fatal is not None:
                want = expected_close_code(str(fatal.get("code")))
                if outcome.close_code != want:
                    outcome.problems.append(f"fatal {fatal.get('code')} closed with {outcome.close_code}, not {want}")
            elif busy_refused:
                if outcome.close_code != 1013:
                    outcome.problems.append(f"busy (not in line) closed with {outcome.close_code}, not 1013")
            else:
                outcome.problems.append(f"the server closed the connection ({outcome.close_code}) without a fatal error")
            if outcome.close_code is not None and outcome.close_code not in DOC.close_codes:
                outcome.problems.append(f"close code {outcome.close_code} is not in the doc's close codes")
        elif fatal is not None and self.ws is not None:
            outcome.problems.append("a fatal error was not followed by the connection closing")
            await self.close()
        return outcome


# ---------------------------------------------------------------------------------------------------
# The neighbour: a well-behaved session on the same server, all along


class Neighbour:
    def __init__(self, url: str) -> None:
        self.url = url
        self.payloads = [encode_payload(make_canvas(TEST_RESOLUTION, seed), ImageFormat.JPEG) for seed in (61, 62, 63, 64)]
        self.sent: dict[int, float] = {}
        self.answered: dict[int, float] = {}
        self.frames = 0
        self.errors: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.closing = False
        self.ws: websockets.ClientConnection | None = None
        self.stop = asyncio.Event()
        self.seq = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> dict[str, Any]:
        self.ws = await websockets.connect(self.url, max_size=None, compression=None, open_timeout=30)
        hello = Hello(protocol=(1,), width=TEST_RESOLUTION, height=TEST_RESOLUTION, codec=ImageFormat.JPEG, params={"prompt": "a neighbour", "seed": 7})
        await self.ws.send(serialize(hello))
        while True:
            ready = msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), 30), raw=False)
            if ready["type"] != "stats":
                break
        assert ready["type"] == "ready", ready
        self.tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._send())]
        return ready

    async def _send_canvas(self) -> int:
        assert self.ws is not None
        self.seq += 1
        self.sent[self.seq] = time.monotonic()
        await self.ws.send(serialize(Canvas(image=self.payloads[self.seq % len(self.payloads)], seq=self.seq)))
        return self.seq

    async def _send(self) -> None:
        try:
            while not self.stop.is_set():
                await self._send_canvas()
                try:
                    await asyncio.wait_for(self.stop.wait(), NEIGHBOUR_INTERVAL_S)
                except TimeoutError:
                    pass
        except websockets.ConnectionClosed:
            pass

    async def _receive(self) -> None:
        assert self.ws is not None
        try:
            while True:
                raw = await self.ws.recv()
                try:
                    message = msgpack.unpackb(raw, raw=False)
                except Exception as error:  # noqa: BLE001 - anything unreadable is a finding
                    self.problems.append(f"an unreadable server message ({error}): {raw[:100]!r}")
                    continue
                self.problems.extend(contract_problems(message))
                if not isinstance(message, dict):
                    continue
                if message.get("type") == "error":
                    self.errors.append(message)
                elif message.get("type") == "frame":
                    self.frames += 1
                    input_seq = message.get("input_seq")
                    if isinstance(input_seq, int):
                        now = time.monotonic()
                        for seq in self.sent:
                            if seq <= input_seq and seq not in self.answered:
                                self.answered[seq] = now
        except websockets.ConnectionClosed as closed:
            if not self.closing:
                code = closed.rcvd.code if closed.rcvd is not None else None
                self.problems.append(f"the server closed the neighbour's connection (code {code})")

    async def finish(self) -> int:
        """Stop the steady inputs, send one last canvas and wait (bounded) for the frame that answers it."""
        self.stop.set()
        await self.tasks[1]
        final = await self._send_canvas()
        deadline = time.monotonic() + 30
        while final not in self.answered and time.monotonic() < deadline and not self.tasks[0].done():
            await asyncio.sleep(0.02)
        return final

    async def close(self) -> None:
        assert self.ws is not None
        self.closing = True
        await self.ws.close()
        await asyncio.wait_for(self.tasks[0], 10)


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass(repr=False)
class FuzzRun:
    cases: list[FuzzCase]
    sent: int = 0
    typed_errors: int = 0
    fatal_errors: int = 0
    sent_after_a_fatal: int = 0
    stopped_early: bool = False
    elapsed_s: float = 0.0
    violations: list[str] = field(default_factory=list)
    codes: collections.Counter = field(default_factory=collections.Counter)
    answer_types: collections.Counter = field(default_factory=collections.Counter)
    observations: list[str] = field(default_factory=list)
    """Worth a look, but outside the contract this test holds the server to (see the summary file)."""
    by_phase: collections.Counter = field(default_factory=collections.Counter)
    connections: int = 0
    control_messages: int = 0
    neighbour: Neighbour | None = None
    neighbour_final: int = 0
    neighbour_fuzz_end: float = 0.0
    info_with_neighbour: dict[str, Any] = field(default_factory=dict)
    info_after: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FuzzRun({self.sent} cases sent, {len(self.violations)} violations)"

    def summary(self) -> dict[str, Any]:
        neighbour = self.neighbour
        return {
            "cases_planned": len(self.cases),
            "cases_sent": self.sent,
            "control_messages": self.control_messages,
            "connections": self.connections,
            "typed_error_share": round(self.typed_errors / max(1, self.sent), 3),
            "fatal_errors": self.fatal_errors,
            "stopped_early": self.stopped_early,
            "elapsed_s": round(self.elapsed_s, 1),
            "codes": dict(self.codes.most_common()),
            "answer_types": dict(self.answer_types.most_common()),
            "observations": len(self.observations),
            "by_phase": dict(self.by_phase),
            "violations": len(self.violations),
            "neighbour": neighbour and {
                "inputs": len(neighbour.sent),
                "answered": len(neighbour.answered),
                "frames": neighbour.frames,
                "lag_s": _quantiles([neighbour.answered[s] - neighbour.sent[s] for s in neighbour.answered]),
                "errors": len(neighbour.errors),
            },
        }


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [0.0]
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "max": round(ordered[-1], 3)}


IMAGE_CODES = {"corrupt_image", "image_too_large", "unsupported_image_format"}


def _observations(case: FuzzCase, outcome: Outcome) -> list[str]:
    """Answers the contract allows but a client would trip on: an error's `field` or `ref_type` that
    is not a string, or a valid (unmutated or unusual-but-valid) image refused as an image."""
    notes = []
    for error in outcome.errors:
        for key in ("field", "ref_type"):
            if error.get(key) is not None and not isinstance(error.get(key), str):
                notes.append(f"error {key} is {type(error.get(key)).__name__}, not a string")
        if error.get("ref_seq") is not None and (not isinstance(error.get("ref_seq"), int) or isinstance(error.get("ref_seq"), bool)):
            notes.append(f"error ref_seq is {type(error.get('ref_seq')).__name__}, not an integer")
        unmutated = case.label == "valid" or (case.label.startswith("exotic") and ";" not in case.label)
        if unmutated and error.get("code") in IMAGE_CODES:
            notes.append(f"a valid image was refused with {error.get('code')}")
    return notes


def _report(case: FuzzCase, outcome: Outcome, problem: str) -> str:
    data = case.data if isinstance(case.data, bytes) else case.data.encode()
    wire = "binary" if isinstance(case.data, bytes) else "text"
    return (
        f"{problem}\n  case: {case.phase}/{case.kind}: {case.label}\n"
        f"  sent ({wire}, {len(data)} bytes): {data[:160]!r}{'…' if len(data) > 160 else ''}\n"
        f"  got: {outcome.describe()}"
    )


async def _wait_for_info(server: ServerProcess, done, timeout: float = 10.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            info = (await http.get(f"{server.base_url}/v1/info")).json()
            if done(info) or time.monotonic() > deadline:
                return info
            await asyncio.sleep(0.05)


async def _fuzz(server: ServerProcess) -> FuzzRun:
    fuzzer = Fuzzer(SEED)
    run = FuzzRun(cases=plan(SEED, FUZZ_CASES))
    neighbour = Neighbour(server.ws_url)
    run.neighbour = neighbour
    await neighbour.start()
    connection = FuzzConnection(server.ws_url, fuzzer)
    started = time.monotonic()
    try:
        for case in run.cases:
            if time.monotonic() - started > FUZZ_BUDGET_S:
                run.stopped_early = True
                break
            await connection.prepare(case.phase, run.violations)
            outcome = await connection.exchange(case.data)
            run.sent += 1
            run.by_phase[case.phase] += 1
            if run.fatal_errors:
                run.sent_after_a_fatal += 1
            if outcome.errors:
                run.typed_errors += 1
            for error in outcome.errors:
                run.codes[str(error.get("code"))] += 1
                if error.get("fatal") is True:
                    run.fatal_errors += 1
            for answer in outcome.answers:
                run.answer_types[str(answer.get("type"))] += 1
            for problem in outcome.problems:
                run.violations.append(_report(case, outcome, problem))
            for note in _observations(case, outcome):
                run.observations.append(_report(case, outcome, note))
    finally:
        run.elapsed_s = time.monotonic() - started
        run.neighbour_fuzz_end = time.monotonic()
        run.connections = connection.connections
        run.control_messages = connection.control_messages
        await connection.close()
    run.neighbour_final = await neighbour.finish()
    # The fuzz connections are gone; the neighbour still holds its slot.
    run.info_with_neighbour = await _wait_for_info(server, lambda info: info["sessions"] == 1 and info["slots_free"] == 1)
    await neighbour.close()
    run.info_after = await _wait_for_info(server, lambda info: info["sessions"] == 0 and info["slots_free"] == info["slots_total"])
    return run


@pytest.fixture(scope="module")
def fuzz_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    server = start_server(cache_dir, artifacts_dir, "ws-fuzz", "--slots", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_run(fuzz_server: ServerProcess, artifacts_dir: Path) -> FuzzRun:
    run = asyncio.run(_fuzz(fuzz_server))
    summary = run.summary()
    (artifacts_dir / "ws-fuzz-summary.json").write_text(json.dumps({**summary, "violation_reports": run.violations[:200], "observation_reports": run.observations[:100]}, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    return run


# ---------------------------------------------------------------------------------------------------


def test_the_error_table_is_read_from_the_doc() -> None:
    assert {"malformed_message", "invalid_field", "not_ready", "unsupported_version"} <= set(DOC.codes)
    assert all(column.rstrip("*") in ("yes", "no") for column in DOC.codes.values()), DOC.codes
    assert {1000, 1001, 1008, 1009, 1012, 1013} <= set(DOC.close_codes)


def test_the_fuzzer_is_deterministic() -> None:
    first, second = plan(SEED, 200), plan(SEED, 200)
    assert first == second
    assert {case.kind for case in plan(SEED, FUZZ_CASES)} >= {"hello", "canvas", "delta", "params", "record", "ping", "special"}


def test_thousands_of_mutated_messages_were_sent_and_mostly_refused(fuzz_run: FuzzRun) -> None:
    assert fuzz_run.sent >= min(MIN_CASES, FUZZ_CASES), f"only {fuzz_run.sent} cases in {FUZZ_BUDGET_S:g} s: {fuzz_run.summary()}"
    assert {"pre", "hello", "session"} <= set(fuzz_run.by_phase)
    # Not vacuous: most mutations are refused with a typed error, and some errors ended connections
    # (bad hellos), after which the fuzzer reconnected and went on.
    assert fuzz_run.typed_errors > 0.5 * fuzz_run.sent, fuzz_run.summary()
    assert fuzz_run.fatal_errors > 0 and fuzz_run.sent_after_a_fatal > 0, fuzz_run.summary()
    assert fuzz_run.connections >= fuzz_run.fatal_errors  # each fatal error ended a connection


def test_every_answer_keeps_the_documented_contract(fuzz_run: FuzzRun) -> None:
    # The smallest example of each distinct problem (its first line), with how often it happened.
    kinds: dict[str, list[str]] = {}
    for violation in fuzz_run.violations:
        kinds.setdefault(violation.split("\n", 1)[0], []).append(violation)
    size = lambda report: int(re.search(r"\((?:binary|text), (\d+) bytes\)", report + "(text, 0 bytes)").group(1))  # noqa: E731
    shown = "\n".join(f"[{len(examples)}x] {min(examples, key=size)}" for examples in list(kinds.values())[:12])
    count = len(fuzz_run.violations)
    assert count == 0, f"{count} contract violations of {len(kinds)} kinds:\n{shown}"


def test_the_neighbour_session_kept_getting_frames(fuzz_run: FuzzRun) -> None:
    neighbour = fuzz_run.neighbour
    assert neighbour is not None
    assert not neighbour.errors, neighbour.errors[:5]
    assert not neighbour.problems, neighbour.problems[:5]
    assert len(neighbour.sent) >= 5, "the neighbour hardly sent anything"
    assert fuzz_run.neighbour_final in neighbour.answered, "the neighbour's last input never got its frame"
    lags = {seq: neighbour.answered[seq] - sent for seq, sent in neighbour.sent.items() if seq in neighbour.answered}
    assert set(lags) == set(neighbour.sent), f"inputs never answered: {sorted(set(neighbour.sent) - set(lags))}"
    worst = max(lags, key=lags.get)  # type: ignore[arg-type]
    assert lags[worst] < NEIGHBOUR_MAX_LAG_S, f"input {worst} waited {lags[worst]:.1f} s for its frame"
    # Inputs sent near the end of the fuzz (its last 10 %) were answered too.
    window = max(0.1 * fuzz_run.elapsed_s, 3 * NEIGHBOUR_INTERVAL_S)
    near_end = [seq for seq, sent in neighbour.sent.items() if sent > fuzz_run.neighbour_fuzz_end - window]
    assert near_end and all(seq in neighbour.answered for seq in near_end)


def test_the_server_is_healthy_and_clean_afterwards(fuzz_run: FuzzRun, fuzz_server: ServerProcess) -> None:
    with_neighbour = fuzz_run.info_with_neighbour
    assert (with_neighbour["sessions"], with_neighbour["slots_free"]) == (1, 1), with_neighbour
    after = fuzz_run.info_after
    assert (after["sessions"], after["streaming"], after["queue_length"]) == (0, 0, 0), after
    assert after["slots_free"] == after["slots_total"] == 2, after
    assert httpx.get(f"{fuzz_server.base_url}/healthz", timeout=5).status_code == 200
    log = fuzz_server.log()
    for marker in ("Traceback", "Exception in ASGI application"):
        index = log.find(marker)
        assert index < 0, f"the server log has {marker!r}:\n{log[max(0, index - 200): index + 1500]}"
