"""Slots: the render scheduler. Each slot is one worker thread that serves up to `capacity` sessions.

The pool lives on the event loop (acquire, enqueue, release are plain calls there). A slot's worker
thread owns one `StreamPipeline` per attached client and talks to the clients only through the
`RenderClient` protocol (`sessions.jobs`): it never imports or reads a `Session`. Inference therefore
never runs on the event loop, and a slot never works through a backlog: it always takes each client's
newest input.

Every round the worker takes a job from each client that has something to render, least recently
served first (round-robin: a client that always has input cannot starve the others, because a served
client goes to the back of the line), at most `batch_limit` of them. The jobs whose streams can share
a UNet call (same size, one call a frame) render together (`pipelines.stream.render_together`); the
others one by one. With a frame-time target the batch limit adapts: a round slower than the target
takes one client fewer next time, one well under it one more, between 1 and `capacity`. A client
whose stream has not settled and gets no new input within about one frame is rendered again with the
same input, to flush it through the stream batch.

With `overlap_decode` a slot has a second thread: the worker denoises a round (encode, UNet calls) and
hands its latents over; the decode thread runs the VAE decode, encodes the frames and delivers them
while the worker already denoises the next round ("on": every round; "auto": the rounds of streams
whose networks run in ONNX Runtime's thread pools on the CPU, where it pays, see
`Decoding.beside_denoising`; the others are decoded on the worker). At most one round waits for the
decode thread (the worker waits for it before handing over another, or before decoding one itself),
so frames go out in order and the two threads never encode at once. A client that waits for each
frame (the drawing page) sees about the same; one whose inputs come faster than frames (a camera)
gets more of them, on a CPU where one network call does not keep every core busy. The seat
bookkeeping (which input a frame answers, when to flush) stays on the worker; the decode thread only
reads it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from streamcanvas.codecs.images import ImageFormat, get_encoder
from streamcanvas.codecs.messages import Frame, serialize
from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.models import ModelSet
from streamcanvas.pipelines.stream import Decoding, RenderResult, StreamParams, StreamPipeline, denoise_together

from .broadcast import BroadcastFrame
from .config import OverlapPolicy
from .jobs import DeliveredFrame, InputMark, RenderClient, RenderJob

logger = logging.getLogger(__name__)

_POLL_S = 0.25
"""How often an idle worker re-checks its clients without being woken."""
_MAX_GRACE_S = 0.5
VIEWER_JPEG_QUALITY = 85
_MAX_GATHER_S = 0.02
"""The longest a round waits for more sessions' inputs to batch (see `Slot._gather`)."""
_GROW_BELOW = 0.6
"""A round under this fraction of the frame-time target lets the batch limit grow by one."""


class Admittable(RenderClient, Protocol):
    """What the pool hands slots to: a render client that can be told it is in, or where it waits."""

    def bind(self) -> None: ...

    def queue_moved(self, position: int | None) -> None: ...


@dataclass(eq=False)
class _Seat:
    """One client's place in a slot, and its stream: worker thread only (the list is guarded)."""

    client: RenderClient
    stream: StreamPipeline | None = None
    configured: tuple[StreamParams, bool] | None = None
    marks: dict[int, InputMark] = field(default_factory=dict)
    last_answered: InputMark | None = None
    settled: bool = True
    flush_at: float = 0.0
    waited: bool = True
    """No input was waiting when the worker last looked, or when its last frame was done: the next
    input refills the stream batch (shows in its first frame) instead of being pipelined."""
    frame_seq: int = 0
    served_at: float = float("-inf")
    looks: int = 0
    """How often the worker has looked for this client's input: the decode thread compares it before
    and after its own look, to tell "nothing waiting" from "the worker took it meanwhile"."""
    broken: bool = False
    """A decode failed on the decode thread: the worker resets the stream before its next frame."""

    def reset(self) -> None:
        self.stream, self.configured, self.settled, self.broken = None, None, True, False
        self.marks.clear()


@dataclass
class _Delivery:
    """What the decode thread needs to send one seat's frame, settled on the worker thread."""

    seat: _Seat
    job: RenderJob
    first_answer: InputMark | None
    answers: InputMark | None
    frame_seq: int
    looks: int


class Slot:
    def __init__(
        self,
        index: int,
        models: ModelSet | LoadedModel,
        torch_threads: int | None = None,
        capacity: int = 1,
        batching: bool = True,
        frame_target_ms: float | None = None,
        overlap_decode: OverlapPolicy = "off",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"a slot serves at least one session, got {capacity}")
        self.index = index
        self.models = models if isinstance(models, ModelSet) else ModelSet.single(models)
        """Every model the server serves: a slot renders any of them (one stream per session)."""
        self.torch_threads = torch_threads
        self.capacity = capacity
        self.batching = batching
        self.frame_target_ms = frame_target_ms
        self.batch_limit = capacity
        """How many clients one round renders at most (adapts to the frame-time target)."""
        self.rounds = 0
        self._round_s = 0.0
        """How long the last round took."""
        self.batched_frames = 0
        """Frames rendered in a shared UNet call (for /v1/info and the benchmark)."""
        self._jpeg = get_encoder(ImageFormat.JPEG)
        self._condition = threading.Condition()
        self._seats: list[_Seat] = []
        self._woken = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)
        self.overlap_decode = overlap_decode
        self._decoder = (
            ThreadPoolExecutor(1, thread_name_prefix=f"slot-{index}-decode", initializer=self._set_threads)
            if overlap_decode != "off"
            else None
        )
        self._decoding: Future[None] | None = None
        """The round the decode thread is finishing (at most one: the worker waits for it before it
        hands over the next, so frames go out in order and only two rounds are ever in flight)."""

    @property
    def clients(self) -> list[RenderClient]:
        with self._condition:
            return [seat.client for seat in self._seats]

    @property
    def load(self) -> int:
        return len(self._seats)

    @property
    def room(self) -> int:
        return self.capacity - len(self._seats)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)

    def attach(self, client: RenderClient) -> None:
        with self._condition:
            if len(self._seats) >= self.capacity:
                raise RuntimeError(f"slot {self.index} is full")
            self._seats.append(_Seat(client))
            self._woken = True
            self._condition.notify_all()
        client.set_waker(self._wake)

    def detach(self, client: RenderClient) -> bool:
        client.set_waker(None)
        with self._condition:
            before = len(self._seats)
            self._seats = [seat for seat in self._seats if seat.client is not client]
            self._woken = True
            self._condition.notify_all()
            return len(self._seats) != before

    def holds(self, client: RenderClient) -> bool:
        with self._condition:
            return any(seat.client is client for seat in self._seats)

    def describe(self) -> dict[str, object]:
        return {"sessions": self.load, "capacity": self.capacity, "batch_limit": self.batch_limit}

    def _wake(self) -> None:
        with self._condition:
            self._woken = True
            self._condition.notify_all()

    # Worker thread -----------------------------------------------------------------------------------

    def _set_threads(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # OpenMP's thread count is per calling thread

    def _run(self) -> None:
        self._set_threads()
        while True:
            with self._condition:
                while not self._seats and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                seats = list(self._seats)
                self._woken = False
            taken = self._take(seats)
            if taken and self.batching:
                taken += self._gather(seats, taken)
            if taken:
                try:
                    self._render(taken)
                except Exception as error:  # noqa: BLE001 - the worker is an entry point: it must live on
                    for seat, job in taken:
                        self._failed(seat, job, error)
                self._to_the_back([seat for seat, _ in taken])
                continue
            now = time.monotonic()
            flushes = [seat.flush_at - now for seat in seats if not seat.settled]
            with self._condition:
                if not self._woken and not self._stopping:
                    self._condition.wait(max(0.0, min([_POLL_S, *flushes])))

    def _gather(self, seats: list[_Seat], taken: list[tuple[_Seat, RenderJob]]) -> list[tuple[_Seat, RenderJob]]:
        """Wait a moment for the inputs of sessions that are drawing but have none yet, to batch them
        with those taken: clients that pace themselves by frames (the drawing page) answer a round's
        frames within milliseconds of each other, and without this the first to answer would start a
        round of its own. Only sessions served in the last two rounds are waited for, and for at most
        a fifth of a round (and `_MAX_GATHER_S`)."""
        now = time.monotonic()
        active_since = now - 2 * self._round_s - _MAX_GATHER_S
        served = {id(seat) for seat, _ in taken}
        expected = [seat for seat in seats if id(seat) not in served and seat.served_at >= active_since and not seat.client.closed]
        room = self.batch_limit - len(taken)
        if not expected or room <= 0:
            return []
        deadline = now + min(_MAX_GATHER_S, self._round_s / 5)
        gathered: list[tuple[_Seat, RenderJob]] = []
        while expected and len(gathered) < room:
            with self._condition:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                if not self._woken:
                    self._condition.wait(remaining)
                self._woken = False
            for seat in list(expected):
                if len(gathered) >= room:
                    break
                seat.looks += 1
                job = seat.client.take_job(seat.settled, flush=False)
                if job is not None:
                    gathered.append((seat, job))
                    expected.remove(seat)
        return gathered

    def _take(self, seats: list[_Seat]) -> list[tuple[_Seat, RenderJob]]:
        limit = self.batch_limit if self.batching else 1
        taken = []
        now = time.monotonic()
        for seat in seats:
            if len(taken) >= limit:
                break
            if seat.client.closed:
                continue
            flush = now >= seat.flush_at
            seat.looks += 1
            job = seat.client.take_job(seat.settled, flush)
            if job is None:
                seat.waited = True
                if flush and not seat.settled:
                    seat.flush_at = now + _POLL_S  # nothing to flush after all: do not spin on it
                continue
            taken.append((seat, job))
        return taken

    def _to_the_back(self, served: list[_Seat]) -> None:
        with self._condition:
            rest = [seat for seat in self._seats if seat not in served]
            self._seats = rest + [seat for seat in served if seat in self._seats]

    def _render(self, taken: list[tuple[_Seat, RenderJob]]) -> None:
        started = time.perf_counter()
        together: dict[tuple[object, ...], list[tuple[_Seat, RenderJob, bool]]] = collections.defaultdict(list)
        alone: list[tuple[_Seat, RenderJob, bool]] = []
        for seat, job in taken:
            refill, seat.waited = seat.waited, False
            try:
                stream = self._configured(seat, job)
            except Exception as error:  # noqa: BLE001 - this client's parameters: only its frame fails
                self._failed(seat, job, error)
                continue
            key = (id(stream.model), *stream.batch_key)
            (together[key] if self.batching and stream.batchable else alone).append((seat, job, refill))
        for group in together.values():
            if len(group) == 1:
                alone.extend(group)
                continue
            assert all(seat.stream is not None for seat, _, _ in group)
            decoding = denoise_together([(seat.stream, job.image, job.newest.number, refill, job.layer) for seat, job, refill in group])  # type: ignore[misc]
            self.batched_frames += len(group)
            self._denoised([(seat, job) for seat, job, _ in group], decoding)
        for seat, job, refill in alone:
            assert seat.stream is not None
            try:
                decoding = seat.stream.denoise(job.image, tag=job.newest.number, refill=refill, layer=job.layer)
            except Exception as error:  # noqa: BLE001 - reported to that client
                self._failed(seat, job, error)
                continue
            self._denoised([(seat, job)], decoding)
        self.rounds += 1
        round_s = time.perf_counter() - started
        self._round_s = round_s
        served_at = time.monotonic()
        for seat, _ in taken:
            seat.served_at = served_at
        self._adapt(len(taken), round_s * 1000)

    def _adapt(self, rendered: int, round_ms: float) -> None:
        target = self.frame_target_ms
        if target is None or not self.batching:
            return
        if round_ms > target and self.batch_limit > 1:
            self.batch_limit -= 1
        elif round_ms < target * _GROW_BELOW and rendered >= self.batch_limit and self.batch_limit < self.capacity:
            self.batch_limit += 1

    def _configured(self, seat: _Seat, job: RenderJob) -> StreamPipeline:
        model = self.models.get(job.model)
        if seat.broken:
            seat.reset()
        if seat.stream is None or seat.stream.model is not model or (seat.stream.width, seat.stream.height) != (job.width, job.height):
            seat.reset()
            seat.stream = StreamPipeline(model, job.width, job.height)
        if seat.configured != (job.params, job.img2img):
            seat.configured = None
            seat.stream.configure(job.params, job.img2img)
            seat.configured = (job.params, job.img2img)
        return seat.stream

    def _failed(self, seat: _Seat, job: RenderJob, error: Exception) -> None:
        logger.error(
            "slot %d: frame failed for session %s", self.index, seat.client.id, exc_info=(type(error), error, error.__traceback__)
        )
        seat.client.report_failure(f"{type(error).__name__}: {error}", job.newest.client_seq)
        seat.reset()

    def _denoised(self, entries: list[tuple[_Seat, RenderJob]], decoding: Decoding) -> None:
        """Account for frames whose UNet work is done, on the worker thread, then have them decoded
        and sent: on the decode thread while the worker goes on (`overlap_decode`), or here."""
        deliveries: list[_Delivery | None] = []
        now = time.monotonic()
        for (seat, job), frame, answers in zip(entries, decoding.frames, decoding.answers):
            if isinstance(frame, Exception):
                self._failed(seat, job, frame)
                deliveries.append(None)
                continue
            assert seat.stream is not None
            seat.settled = seat.stream.settled
            # Wait about one frame for the next input before flushing this one through the batch.
            elapsed_s = now - job.taken_at if isinstance(frame, RenderResult) else time.perf_counter() - frame.started
            seat.flush_at = now + min(max(elapsed_s, 0.0), _MAX_GRACE_S)
            seat.marks[job.newest.number] = job.newest
            if isinstance(frame, RenderResult):
                seat.client.report_skipped(job.dropped)
                deliveries.append(None)
                continue
            # An input is answered by the first frame that fully shows it; later frames may show it too.
            first_answer = seat.marks.pop(answers, None)  # type: ignore[arg-type]
            if first_answer is not None:
                seat.last_answered = first_answer
            last = seat.last_answered
            # Only inputs still inside the stream batch can be answered later; forget the rest.
            seat.marks = {number: mark for number, mark in seat.marks.items() if number > answers}  # type: ignore[operator]
            seat.frame_seq += 1
            deliveries.append(
                _Delivery(seat, job, first_answer, last if last is not None and last.number == answers else None, seat.frame_seq, seat.looks)
            )
        if not any(deliveries):
            return
        if self._decoding is not None:
            self._decoding.result()  # never raises: _send reports its own failures
            self._decoding = None
        if self._decoder is None or (self.overlap_decode == "auto" and not decoding.beside_denoising):
            self._send(decoding, deliveries)
            return
        self._decoding = self._decoder.submit(self._send, decoding, deliveries)

    def _send(self, decoding: Decoding, deliveries: list[_Delivery | None]) -> None:
        """Decode the frames and hand each to its client (the decode thread, or the worker's)."""
        try:
            results = decoding.decode()
        except Exception as error:  # noqa: BLE001 - a thread's entry point: report, never die
            results = [error] * len(deliveries)
        for delivery, result in zip(deliveries, results):
            if delivery is None:
                continue
            if isinstance(result, Exception):
                self._decode_failed(delivery, result)
                continue
            try:
                self._deliver(delivery, result)
            except Exception as error:  # noqa: BLE001 - reported to that client
                self._decode_failed(delivery, error)

    def _decode_failed(self, delivery: _Delivery, error: Exception) -> None:
        seat, job = delivery.seat, delivery.job
        logger.error(
            "slot %d: frame failed for session %s", self.index, seat.client.id, exc_info=(type(error), error, error.__traceback__)
        )
        seat.client.report_failure(f"{type(error).__name__}: {error}", job.newest.client_seq)
        if threading.current_thread() is self._thread:
            seat.reset()
        else:
            seat.broken = True  # the worker owns the stream: it starts it afresh before its next frame

    def _deliver(self, delivery: _Delivery, result: RenderResult) -> None:
        seat, job = delivery.seat, delivery.job
        assert result.image is not None
        encode_started = time.perf_counter()
        encoded = get_encoder(job.codec).encode(result.image, job.quality) if job.wants_message else None
        jpeg = None
        if job.wants_jpeg:
            reuse = encoded is not None and job.codec is ImageFormat.JPEG
            jpeg = encoded if reuse else self._jpeg.encode(result.image, VIEWER_JPEG_QUALITY)
        encode_ms = (time.perf_counter() - encode_started) * 1000
        timings = {
            "queue_ms": round((job.taken_at - job.newest.received_at) * 1000 if job.fresh else 0.0, 3),
            "inference_ms": round(result.inference_ms, 3),
            "encode_ms": round(encode_ms, 3),
        }
        payload = None
        if encoded is not None:
            message = Frame(
                seq=delivery.frame_seq,
                input_seq=delivery.answers.client_seq if delivery.answers else None,
                width=job.width,
                height=job.height,
                codec=job.codec.value,
                image=encoded,
                timings=timings,
            )
            payload = serialize(message)
        if job.recorder is not None:
            job.recorder.offer(result.image)
        viewer_frame = BroadcastFrame(delivery.frame_seq, result.image, job.width, job.height, jpeg)
        # Nothing new waiting as its frame goes out: the client waits for this frame (the drawing page
        # paces itself by frames), so its next input refills the stream batch rather than pipelines.
        # (Checked before the frame is handed over: a client that answers it at once must not count;
        # and not when the worker has looked for input since this frame was denoised: then it has
        # taken the input, or found none and said so itself.)
        nothing_waiting = not seat.client.has_input()
        if nothing_waiting and seat.looks == delivery.looks:
            seat.waited = True
        # Latency counts once per input: from its arrival to the first frame that fully shows it.
        seat.client.deliver(DeliveredFrame(payload, delivery.first_answer, timings), job.dropped, viewer_frame)


class SlotPool:
    """A fixed set of slots plus a bounded line of sessions waiting for a place. Event-loop only."""

    def __init__(
        self,
        models: ModelSet | LoadedModel,
        size: int,
        max_waiting: int,
        threads_per_slot: int | None = None,
        sessions_per_slot: int = 1,
        batching: bool = True,
        frame_target_ms: float | None = None,
        overlap_decode: OverlapPolicy = "off",
    ) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        self.slots = [
            Slot(index, models, threads_per_slot, sessions_per_slot, batching, frame_target_ms, overlap_decode)
            for index in range(size)
        ]
        self.sessions_per_slot = sessions_per_slot
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Admittable] = collections.deque()

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> int:
        """Sessions the pool renders at once: slots × sessions per slot."""
        return self.size * self.sessions_per_slot

    @property
    def free(self) -> int:
        """Slots with no session at all."""
        return sum(1 for slot in self.slots if slot.load == 0)

    @property
    def places_free(self) -> int:
        """Sessions that can still start rendering now."""
        return sum(slot.room for slot in self.slots)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def stop(self) -> None:
        for slot in self.slots:
            slot.stop()

    def acquire(self, client: RenderClient) -> bool:
        """Seat the client in the least loaded slot with room; False when every slot is full."""
        open_slots = [slot for slot in self.slots if slot.room > 0]
        if not open_slots:
            return False
        min(open_slots, key=lambda slot: slot.load).attach(client)
        return True

    def enqueue(self, client: Admittable) -> int | None:
        """Put the client in line; its 1-based position, or None when the line is full."""
        if len(self._waiting) >= self.max_waiting:
            return None
        self._waiting.append(client)
        return len(self._waiting)

    def release(self, client: RenderClient) -> None:
        """Free the client's place (or its place in line) at once and hand it to the next in line."""
        if client in self._waiting:
            self._waiting.remove(client)  # type: ignore[arg-type]
            self._announce_positions()
            return
        for slot in self.slots:
            if slot.detach(client):
                if self._waiting:
                    following = self._waiting.popleft()
                    slot.attach(following)
                    following.bind()
                    self._announce_positions()
                return

    def describe(self) -> dict[str, object]:
        return {
            "slots_total": self.size,
            "slots_free": self.free,
            "sessions_per_slot": self.sessions_per_slot,
            "session_capacity": self.capacity,
            "session_places_free": self.places_free,
            "queue_length": self.queue_length,
            "batched_frames": sum(slot.batched_frames for slot in self.slots),
            "overlap_decode": self.slots[0].overlap_decode,
            "slots": [slot.describe() for slot in self.slots],
        }

    def _announce_positions(self) -> None:
        for position, waiting in enumerate(self._waiting, start=1):
            waiting.queue_moved(position)
