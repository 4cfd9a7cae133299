"""One client's real-time session, independent of the transport that carries its bytes.

A transport adapter (WebSocket today, WebRTC's data channel next) does three things only:
`await session.handle(data)` for every message it receives, sends whatever `await
session.next_outgoing()` returns until it returns None, and calls `session.close()` when the connection
ends. Everything else — the handshake, auth, canvas updates, the handoff to a slot's worker thread, and
typed errors — happens here.

Threads: `handle()` and the outgoing side run on the event loop. The slot's worker thread calls
`take_job()` and `deliver()`/`report_failure()`. State they share is guarded by `self._lock`; the
worker only ever gets copies.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol, TypeVar, assert_never

import numpy as np

from streamcanvas.codecs import images
from streamcanvas.codecs.errors import CodecError, MessageTooLarge
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.codecs.messages import (
    PROTOCOL_VERSIONS,
    Busy,
    Canvas,
    CanvasDelta,
    ClientMessage,
    Error,
    Hello,
    ImagePayload,
    Params,
    Ping,
    Pong,
    Ready,
    Record,
    Recording,
    RenewTokens,
    Stats,
    Tokens,
    message_ref,
    parse_client_message,
    serialize,
)
from streamcanvas.pipelines.errors import InvalidParameter, UnknownName
from streamcanvas.pipelines.sizes import side_problem
from streamcanvas.pipelines.stream import StreamParams

from .broadcast import BroadcastFrame, FrameBroadcast
from .canvas import CanvasBuffer
from .config import SessionConfig
from .recording import Recorder, RecordingFailed
from .errors import (
    InvalidResolution,
    NotReady,
    RecordingError,
    SessionError,
    Unauthorized,
    UnsupportedVersion,
    WrongMode,
)
from .jobs import DeliveredFrame, InputMark, RenderJob
from .mailbox import Latest
from .stats import SessionStats, percentiles

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    QUEUED = "queued"
    READY = "ready"
    STREAMING = "streaming"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a session ended; adapters map it to their transport's close code."""

    CLIENT_LEFT = "client_left"
    ERROR = "error"
    BUSY = "busy"
    IDLE = "idle"
    SHUTDOWN = "shutdown"
    REPLACED = "replaced"
    """A new connection resumed this session (hello.resume with its control token)."""


class SessionBroker(Protocol):
    """What a session needs from the server around it (the `SessionManager` is one): a place to
    render, tokens, and to be forgotten when it ends."""

    def describe_model(self, name: str | None) -> dict[str, object]:
        """What `ready.model` says of a model (None: the default)."""
        ...

    @property
    def slots_total(self) -> int: ...

    @property
    def queue_length(self) -> int: ...

    def acquire(self, session: Session) -> bool:
        """Seat the session in a slot now; False when every place is taken."""

    def enqueue(self, session: Session) -> int | None:
        """Put the session in line for a place: its 1-based position, or None when the line is full."""

    def issue_token(self, session_id: str, role: str) -> str: ...

    def resume(self, session: Session, session_id: str, token: str) -> bool:
        """Give `session` the id of the earlier session `token` controls (ending it if it is still open);
        False, and the id unchanged, when the token is not a valid control token of that id."""
        ...

    def forget(self, session: Session) -> None:
        """The session has ended: drop it and free its place (or its place in line) at once."""


_INTERNAL_ERROR_MESSAGE = "the frame failed on the server; the slot has been reset and your next input renders"
SLOW_CONSUMER = Error(code="slow_consumer", message="the client is not reading its messages", fatal=True)
"""Sent when the control queue overflows here, and by the WebSocket connection when its pong is late."""


class Session:
    def __init__(self, broker: SessionBroker, config: SessionConfig, transport: str) -> None:
        self.broker = broker
        self.config = config
        self.transport = transport
        self.id = uuid.uuid4().hex
        self.state = SessionState.CONNECTING
        self.close_reason: CloseReason | None = None
        self.loop = asyncio.get_running_loop()
        self.stats = SessionStats()

        # Settled by hello.
        self.width = self.config.default_width
        self.height = self.config.default_height
        self.codec = ImageFormat.JPEG
        self.quality = 80
        self.mode = "img2img"
        self.model_name: str | None = None
        """The model this session renders with (None: the server's default)."""
        self.protocol: int | None = None

        # Shared with the worker thread, under _lock.
        self._lock = threading.Lock()
        self._closed = False
        self._canvas: CanvasBuffer | None = None
        self._control_layer: CanvasBuffer | None = None
        self._has_canvas = False
        self._params = self.config.default_params
        self._newest: InputMark | None = None
        self._taken_number = 0
        self._waker: Callable[[], None] | None = None

        # Outgoing side, event loop only.
        self._control: collections.deque[bytes] = collections.deque()
        self._frame: Latest[DeliveredFrame] = Latest()
        self._wakeup = asyncio.Event()
        self._stats_task: asyncio.Task[None] | None = None
        self.broadcast = FrameBroadcast(self.config.max_viewers)
        self.recorder: Recorder | None = None  # read by the worker; set and cleared on the loop
        # False when frames reach the client another way (a WebRTC video track): frame messages are
        # then not queued for the data channel, and latency is counted when the frame is ready.
        self.frames_to_client = True
        self.resumed: bool | None = None  # whether hello.resume was honoured; None: it asked for none
        self.recording_id = ""

        # The idle timeout, for every transport: no message (or video frame) from the client and no frame
        # rendered for it for idle_timeout_s ends the session. A session waiting in line is waiting on
        # us, and does not idle out.
        self._last_activity = time.monotonic()
        self._closed_event = asyncio.Event()
        self._idle_task = self.loop.create_task(self._watch_idle(), name=f"idle-{self.id}")

    # ------------------------------------------------------------------------------------------------
    # Incoming (event loop)

    async def handle(self, data: bytes) -> None:
        """Process one received message; every problem becomes a typed `error` to this client."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self._last_activity = time.monotonic()
        message: ClientMessage | None = None
        try:
            if len(data) > self.config.max_message_bytes:
                raise MessageTooLarge(
                    f"message of {len(data)} bytes is over the limit of {self.config.max_message_bytes} bytes"
                )
            message = parse_client_message(data)
            await self._dispatch(message)
        except (CodecError, SessionError, InvalidParameter) as error:
            if message is not None:
                ref_seq, ref_type = message.seq, message.type
            else:
                ref_seq, ref_type = message_ref(data) if len(data) <= self.config.max_message_bytes else (None, None)
            # A bad hello ends the connection (the client must fix it and reconnect); anything else
            # is answered and the session goes on.
            fatal = getattr(error, "fatal", False) or (
                ref_type == Hello.type and self.state is SessionState.CONNECTING
            )
            code = _error_code(error)
            self.send_control(
                Error(
                    code=code,
                    message=str(error),
                    ref_seq=ref_seq,
                    ref_type=ref_type,
                    field=getattr(error, "field", None),
                    fatal=fatal,
                )
            )
            if fatal:
                self.close(CloseReason.ERROR)
        except Exception:  # noqa: BLE001 - the adapter boundary: a bug must not end the connection silently
            logger.exception("session %s: unexpected error handling a %s message", self.id, getattr(message, "type", "?"))
            self.send_control(
                Error(
                    code="internal_error",
                    message="the server failed to handle this message; the session goes on",
                    ref_seq=getattr(message, "seq", None),
                    ref_type=getattr(message, "type", None),
                )
            )

    async def _dispatch(self, message: ClientMessage) -> None:
        match message:
            case Hello():
                self._hello(message)
            case Canvas():
                canvas = self._layer(message.type, message.layer)
                rgb = await _decode(canvas.decode_full, message.image, [message.image])
                with self._lock:
                    canvas.replace(rgb)
                    self._new_input(message.seq, canvas_changed=canvas is self._canvas)
            case CanvasDelta():
                canvas = self._layer(message.type, message.layer)
                decoded = await _decode(canvas.decode_patches, message.patches, [p.image for p in message.patches])
                with self._lock:
                    canvas.paste(decoded)
                    self._new_input(message.seq, canvas_changed=canvas is self._canvas)
            case Params():
                if self.state is SessionState.CONNECTING:
                    raise NotReady("send hello first")
                params = self._resolve(self._params, message.changes)
                with self._lock:
                    self._params = params
                    self._new_input(message.seq)
            case Record():
                await self._record(message)
            case Ping():
                if self.state is SessionState.CONNECTING:
                    raise NotReady("'ping' before hello: send hello first")
                self.send_control(Pong(t=message.t, seq=message.seq))
            case RenewTokens():
                if self.state not in (SessionState.READY, SessionState.STREAMING):
                    raise NotReady("'renew_tokens' needs a session that is ready (its tokens come with ready)")
                self.send_control(
                    Tokens(
                        token=self.broker.issue_token(self.id, "control"),
                        viewer_token=self.broker.issue_token(self.id, "viewer"),
                        ttl_s=self.config.token_ttl_s,
                        ref_seq=message.seq,
                    )
                )
            case _:
                assert_never(message)

    async def _record(self, message: Record) -> None:
        if self.state not in (SessionState.READY, SessionState.STREAMING):
            raise NotReady("recording needs a session with a slot (after ready)")
        if message.action == "start":
            if self.recorder is not None:
                raise NotReady("already recording; stop first")
            recording_id = uuid.uuid4().hex
            path = self.config.recordings_dir / f"{self.id}-{recording_id}.mp4"
            try:
                self.recorder = Recorder(path, self.width, self.height, self.config.max_recording_s)
            except RecordingFailed as error:
                raise RecordingError(str(error)) from None
            self.recording_id = recording_id
            self.send_control(Recording(state="started", recording_id=recording_id, ref_seq=message.seq))
            return
        if self.recorder is None:
            raise NotReady("not recording")
        recorder, recording_id = self.recorder, self.recording_id
        self.recorder = None
        summary = await asyncio.to_thread(recorder.stop)
        if summary.error:
            raise RecordingError(f"the recording failed: {summary.error}")
        self.send_control(
            Recording(
                state="stopped",
                recording_id=recording_id,
                frames=summary.frames,
                dropped=summary.dropped,
                duration_s=round(summary.duration_s, 3),
                bytes=summary.bytes,
                truncated=summary.truncated,
                # No frame came while recording: there is no file to fetch.
                url=f"/v1/sessions/{self.id}/recordings/{recording_id}.mp4" if summary.frames else None,
                ref_seq=message.seq,
            )
        )

    async def video_frame(self, rgb: np.ndarray) -> None:
        """A frame of the client's video track (WebRTC): the newest whole canvas, latest-wins."""
        if self.state not in (SessionState.READY, SessionState.STREAMING) or self._canvas is None:
            return  # before ready, or a txt2img session: the track's frames have nowhere to go
        self._last_activity = time.monotonic()
        canvas = self._canvas
        scaled = await asyncio.to_thread(canvas.fit, rgb)
        with self._lock:
            canvas.replace(scaled)
            self._new_input(None, canvas_changed=True)

    def _resolve(self, current: StreamParams, changes: dict[str, object]) -> StreamParams:
        return self.config.catalog.resolve(current, self._defaults(), changes, self.mode == "img2img", self.model_name)

    def _defaults(self) -> StreamParams:
        """Where this session's parameters start: its model's defaults, or the server's."""
        return self.config.catalog.choice(self.model_name).defaults or self.config.default_params

    def _layer(self, kind: str, layer: str) -> CanvasBuffer:
        """The buffer a canvas or delta message draws on: the canvas, or the control layer (which any
        session may have, a txt2img one included; it starts black, as control images do)."""
        if layer == "image":
            return self._require_canvas_session(kind)
        if self.state is SessionState.CONNECTING:
            raise NotReady(f"'{kind}' before hello: send hello first")
        if self._control_layer is None:
            self._control_layer = CanvasBuffer(self.width, self.height, self.config.image_limits, fill=0)
        return self._control_layer

    def _require_canvas_session(self, kind: str) -> CanvasBuffer:
        if self.state is SessionState.CONNECTING:
            raise NotReady(f"'{kind}' before hello: send hello first")
        if self._canvas is None:
            raise WrongMode(f"'{kind}' is for img2img sessions; this session is {self.mode}")
        return self._canvas

    def _hello(self, hello: Hello) -> None:
        if self.state is not SessionState.CONNECTING:
            raise NotReady("hello was already accepted on this connection")
        common = set(hello.protocol) & set(PROTOCOL_VERSIONS)
        if not common:
            raise UnsupportedVersion(
                f"protocol versions {list(hello.protocol)} are not spoken here; this server speaks "
                f"{list(PROTOCOL_VERSIONS)}",
                field="protocol",
            )
        if self.config.api_keys and not any(
            hmac.compare_digest((hello.api_key or "").encode(), key.encode()) for key in self.config.api_keys
        ):
            raise Unauthorized("a valid api_key is required in hello", field="api_key")
        width = self.config.default_width if hello.width is None else hello.width
        height = self.config.default_height if hello.height is None else hello.height
        self._check_resolution(width, height)
        self.mode = hello.mode
        self.model_name = self.config.catalog.model(hello.model)
        try:
            params = self._resolve(self._defaults(), hello.params)
        except InvalidParameter as error:
            raise type(error)(error.field, f"{error.detail} (in hello)") from None
        if hello.resume is not None:
            self.resumed = self.broker.resume(self, hello.resume.session_id, hello.resume.token)
        self.protocol = max(common)
        self.width, self.height = width, height
        self.codec, self.quality = hello.codec, hello.quality
        if hello.frame_messages is not None:
            self.frames_to_client = hello.frame_messages
        with self._lock:
            self._params = params
            if self.mode == "img2img":
                self._canvas = CanvasBuffer(width, height, self.config.image_limits)
        if self.broker.acquire(self):
            self.bind()
            return
        position = self.broker.enqueue(self) if hello.queue else None
        self.queue_moved(position)
        if position is None:
            self.close(CloseReason.BUSY)
        else:
            self.state = SessionState.QUEUED

    def _check_resolution(self, width: int, height: int) -> None:
        config = self.config
        for name, value, maximum in (("width", width, config.max_width), ("height", height, config.max_height)):
            problem = side_problem(value, maximum)
            if problem is not None:
                raise InvalidResolution(f"resolution {width}x{height}: {name} {problem}", field=name)

    def _new_input(self, client_seq: int | None, canvas_changed: bool = False) -> None:
        """Record one input (caller holds _lock) and wake the worker: the newest input wins."""
        number = self._newest.number + 1 if self._newest else 1
        self._newest = InputMark(number, client_seq, time.monotonic())
        self.stats.inputs += 1
        if self.state is SessionState.READY:
            self.state = SessionState.STREAMING
        self._has_canvas = self._has_canvas or canvas_changed
        waker = self._waker
        if waker is not None:
            waker()

    def bind(self) -> None:
        """Called once this session has a place in a slot (at once, or from the line)."""
        self._last_activity = time.monotonic()  # the idle timeout starts when the slot is ours
        # A client that waited in line may already have sent its canvas: it is streaming from the start.
        self.state = SessionState.STREAMING if self._newest is not None else SessionState.READY
        self.send_control(
            Ready(
                protocol=self.protocol or PROTOCOL_VERSIONS[-1],
                session_id=self.id,
                width=self.width,
                height=self.height,
                codec=self.codec.value,
                quality=self.quality,
                mode=self.mode,
                params=_params_dict(self._params),
                limits=self.config.limits_dict(),
                model=self.broker.describe_model(self.model_name),
                token=self.broker.issue_token(self.id, "control"),
                viewer_token=self.broker.issue_token(self.id, "viewer"),
                defaults=_params_dict(self._defaults()),
                resumed=self.resumed,
            )
        )
        if self.mode == "txt2img":
            with self._lock:
                self._new_input(None)
        self._stats_task = self.loop.create_task(self._send_stats())

    def queue_moved(self, position: int | None) -> None:
        """Tell the client where it stands: its place in line, or (None) that it must retry later."""
        self.send_control(
            Busy(
                retry_after_s=self.config.busy_retry_after_s,
                slots_total=self.broker.slots_total,
                queue_position=position,
                queue_length=self.broker.queue_length,
            )
        )

    # ------------------------------------------------------------------------------------------------
    # Worker side (called from the slot's thread)

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        with self._lock:
            self._waker = wake

    def take_job(self, settled: bool, flush: bool) -> RenderJob | None:
        """A copy of the newest state if there is an input not taken yet; with `flush` and a stream that
        has not settled (its newest input is still inside the stream batch), the same input again; else
        None. Never waits: the slot's waker is called when something arrives."""
        with self._lock:
            newest = self._newest
            if self._closed or newest is None or not (self.mode == "txt2img" or self._has_canvas):
                return None
            fresh = newest.number != self._taken_number
            if not fresh and (settled or not flush):
                return None
            dropped = max(0, newest.number - self._taken_number - 1)
            self._taken_number = newest.number
            return RenderJob(
                image=self._canvas.snapshot() if self._canvas is not None else None,
                newest=newest,
                taken_at=time.monotonic(),
                params=self._params,
                img2img=self.mode == "img2img",
                width=self.width,
                height=self.height,
                dropped=dropped,
                fresh=fresh,
                codec=self.codec,
                quality=self.quality,
                wants_message=self.frames_to_client,
                wants_jpeg=self.broadcast.wanted,
                recorder=self.recorder,
                model=self.model_name,
                layer=self._control_layer.snapshot() if self._control_layer is not None else None,
            )

    def has_input(self) -> bool:
        with self._lock:
            newest = self._newest
            return not self._closed and newest is not None and newest.number != self._taken_number

    def seconds_since_input(self) -> float | None:
        """Seconds since the newest canvas, delta or params message; None before the first."""
        newest = self._newest
        return None if newest is None else time.monotonic() - newest.received_at

    def capture(self) -> tuple[np.ndarray | None, StreamParams, np.ndarray | None]:
        """Copies of the canvas (None for txt2img sessions), the parameters and the control layer (None
        until one is sent); safe from any thread."""
        with self._lock:
            canvas = self._canvas.snapshot() if self._canvas is not None else None
            layer = self._control_layer.snapshot() if self._control_layer is not None else None
            return canvas, self._params, layer

    @property
    def closed(self) -> bool:
        return self._closed

    def deliver(self, frame: DeliveredFrame, dropped_inputs: int, viewer_frame: BroadcastFrame) -> None:
        self._call_on_loop(self._deliver_on_loop, frame, dropped_inputs, viewer_frame)

    def report_skipped(self, dropped_inputs: int) -> None:
        self._call_on_loop(self._count_skipped, dropped_inputs)

    def report_failure(self, description: str, ref_seq: int | None) -> None:
        self._call_on_loop(self._frame_failed, description, ref_seq)

    def _call_on_loop(self, callback, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the event loop has shut down; there is nobody left to tell

    # ------------------------------------------------------------------------------------------------
    # Outgoing (event loop)

    def _set_frame(self, frame: DeliveredFrame, dropped_inputs: int) -> None:
        self.stats.dropped_inputs += dropped_inputs
        if self.state not in (SessionState.READY, SessionState.STREAMING):
            return
        self._last_activity = time.monotonic()  # a client waiting for a slow frame is not idle
        if not self.frames_to_client:
            latency = (time.monotonic() - frame.answers.received_at) * 1000 if frame.answers else None
            self.stats.frame_sent(latency, frame.timings)
            return
        if self._frame.put(frame):
            self.stats.dropped_frames += 1  # the client had not taken the last one: newest wins
        self._wakeup.set()

    def _deliver_on_loop(self, frame: DeliveredFrame, dropped_inputs: int, viewer_frame: BroadcastFrame) -> None:
        """One hop to the loop per frame: the client's frame, then the viewers'."""
        self._set_frame(frame, dropped_inputs)
        if self.state in (SessionState.READY, SessionState.STREAMING):
            self.broadcast.publish(viewer_frame)

    def _count_skipped(self, dropped_inputs: int) -> None:
        self.stats.dropped_inputs += dropped_inputs
        self.stats.skipped_similar += 1

    def _frame_failed(self, description: str, ref_seq: int | None) -> None:
        self.stats.failures += 1
        self.send_control(
            Error(code="inference_failed", message=f"{_INTERNAL_ERROR_MESSAGE} ({description})", ref_seq=ref_seq)
        )

    def send_control(self, message: Error | Ready | Busy | Pong | Stats) -> None:
        if self.state is SessionState.CLOSED:
            return
        if len(self._control) >= self.config.control_queue_size and not isinstance(message, Error):
            if isinstance(message, Stats):
                return  # stats are a periodic summary; the next one supersedes this
            self._control.append(
                serialize(SLOW_CONSUMER)
            )
            self._wakeup.set()
            self.close(CloseReason.ERROR)
            return
        self._control.append(serialize(message))
        self._wakeup.set()

    def pending_control(self) -> bytes | None:
        """The oldest control message not yet sent, without waiting (signalling answers a hello within
        its HTTP request: the answer, ready or an error, is queued by the time `handle()` returns)."""
        return self._control.popleft() if self._control else None

    async def next_outgoing(self) -> bytes | None:
        """The next message to send: control messages first, then the newest frame; None when done."""
        while True:
            if self._control:
                return self._control.popleft()
            if self._frame.waiting and self.state in (SessionState.READY, SessionState.STREAMING):
                frame = self._frame.take()
                assert frame is not None
                latency = (time.monotonic() - frame.answers.received_at) * 1000 if frame.answers else None
                self.stats.frame_sent(latency, frame.timings)
                return frame.payload
            if self.state in (SessionState.CLOSING, SessionState.CLOSED):
                self.state = SessionState.CLOSED
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _send_stats(self) -> None:
        """Every stats interval while inputs or frames flow, and until one has said fps 0 after they stop."""
        counted = (0, 0)
        last_fps = 0.0
        while self.state in (SessionState.READY, SessionState.STREAMING):
            await asyncio.sleep(self.config.stats_interval_s)
            now = (self.stats.inputs, self.stats.frames)
            if self.state is SessionState.STREAMING and (now != counted or last_fps > 0):
                stats = self.current_stats()
                self.send_control(stats)
                counted, last_fps = now, stats.fps

    def current_stats(self) -> Stats:
        stats = self.stats
        return Stats(
            fps=stats.fps(),
            latency_ms=percentiles(list(stats.latency_ms)),
            frames=stats.frames,
            inputs=stats.inputs,
            dropped_inputs=stats.dropped_inputs,
            dropped_frames=stats.dropped_frames,
            skipped_similar=stats.skipped_similar,
            timings_ms=stats.mean_timings(),
        )

    # ------------------------------------------------------------------------------------------------
    # Ending

    async def _watch_idle(self) -> None:
        timeout = self.config.idle_timeout_s
        while self.state not in (SessionState.CLOSING, SessionState.CLOSED):
            if self.state is SessionState.QUEUED:
                await asyncio.sleep(timeout)
                continue
            remaining = self._last_activity + timeout - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            self.send_control(
                Error(code="idle_timeout", message=f"no message for {timeout:g} s; the slot has been freed", fatal=True)
            )
            self.close(CloseReason.IDLE)

    def replace(self) -> None:
        """End this session because a new connection resumed it (`SessionBroker.resume`)."""
        self.send_control(
            Error(code="replaced", message="a new connection resumed this session (hello.resume); this one is closed", fatal=True)
        )
        self.close(CloseReason.REPLACED)

    async def wait_closed(self) -> None:
        """Return once the session has ended (for anything that must end with it: peers, viewers)."""
        await self._closed_event.wait()

    def close(self, reason: CloseReason) -> None:
        """End the session now: the slot is freed at once; queued control messages still go out."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self.close_reason = reason
        self.state = SessionState.CLOSING
        with self._lock:
            self._closed = True
            self._waker = None
        self._frame.clear()
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._idle_task is not asyncio.current_task():
            self._idle_task.cancel()
        self._closed_event.set()
        self.broadcast.close()  # viewers' streams end with the session
        if self.recorder is not None:  # a recording in progress is finished, not lost
            recorder, self.recorder = self.recorder, None
            self.loop.run_in_executor(None, recorder.stop)
        self.broker.forget(self)
        self._wakeup.set()


_INLINE_DECODE_PIXELS = 512 * 512
"""Images up to this size decode on the event loop (under a millisecond for JPEG); larger ones in a
thread, so the loop never stalls. Handing every small canvas to a thread and back cost more in thread
wake-ups, on cores the inference threads are using, than the decode itself."""


async def _decode(function: Callable[[T], R], argument: T, payloads: list[ImagePayload]) -> R:
    pixels = 0
    for payload in payloads:
        width, height = images.read_dimensions(payload.format, payload.data, width=payload.width, height=payload.height)
        pixels += width * height
    if pixels <= _INLINE_DECODE_PIXELS:
        return function(argument)
    return await asyncio.to_thread(function, argument)


def _error_code(error: CodecError | SessionError | InvalidParameter) -> str:
    if isinstance(error, UnknownName):
        return "unknown_name"
    if isinstance(error, InvalidParameter):
        return "invalid_value"
    return error.code


def _params_dict(params: StreamParams) -> dict[str, object]:
    return params.as_wire()
