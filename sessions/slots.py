"""Slots: the fixed number of sessions a device renders at once, each with its own worker thread.

The pool lives on the event loop (acquire, enqueue, release are plain calls there). Each slot's worker
thread owns the per-session `StreamPipeline` of whichever session is attached, pulls the newest input
with `Session.take_job()`, renders and encodes it, and hands the frame back. Inference therefore never
runs on the event loop, and a slot never works through a backlog: it always takes the newest canvas.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from streamcanvas.codecs.images import ImageFormat, get_encoder
from streamcanvas.codecs.messages import Frame, serialize
from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline

from .broadcast import BroadcastFrame
from .session import DeliveredFrame, InputMark

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger(__name__)

_POLL_S = 0.25
"""How often an idle worker re-checks whether its session is still attached."""
_MAX_GRACE_S = 0.5
VIEWER_JPEG_QUALITY = 85


class Slot:
    def __init__(self, index: int, model: LoadedModel, torch_threads: int | None = None) -> None:
        self.index = index
        self.model = model
        self.torch_threads = torch_threads
        self._jpeg = get_encoder(ImageFormat.JPEG)
        self._condition = threading.Condition()
        self._session: Session | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)

    @property
    def session(self) -> Session | None:
        return self._session

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def attach(self, session: Session) -> None:
        with self._condition:
            self._session = session
            self._condition.notify_all()

    def detach(self, session: Session) -> None:
        with self._condition:
            if self._session is session:
                self._session = None

    # Worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # OpenMP's thread count is per calling thread
        while True:
            with self._condition:
                while self._session is None and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                session = self._session
            assert session is not None
            self._serve(session)

    def _attached(self, session: Session) -> bool:
        return self._session is session and not self._stopping and not session.closed

    def _serve(self, session: Session) -> None:
        stream = StreamPipeline(self.model, session.width, session.height)
        configured: tuple[StreamParams, bool] | None = None
        encoder = get_encoder(session.codec)
        marks: dict[int, InputMark] = {}
        last_answered: InputMark | None = None
        settled = True
        frame_seq = 0
        idle = True
        grace = 0.0
        while self._attached(session):
            job = session.take_job(settled, _POLL_S, grace)
            if job is None:
                idle = True
                continue
            refill, idle = idle or job.waited, False
            marks[job.newest.number] = job.newest
            try:
                if configured != (job.params, job.img2img):
                    stream.configure(job.params, job.img2img)
                    configured = (job.params, job.img2img)
                result = stream.render(job.image, tag=job.newest.number, refill=refill)
                settled = stream.settled
                # Wait about one frame for the next input before flushing this one through the batch.
                grace = min(result.inference_ms / 1000, _MAX_GRACE_S)
                if result.image is None:
                    session.report_skipped(job.dropped)
                    continue
                encode_started = time.perf_counter()
                payload = encoder.encode(result.image, session.quality)
                encode_ms = (time.perf_counter() - encode_started) * 1000
            except Exception as error:  # noqa: BLE001 - the worker is an entry point: report, reset, go on
                logger.exception("slot %d: frame failed for session %s", self.index, session.id)
                session.report_failure(f"{type(error).__name__}: {error}", job.newest.client_seq)
                stream = StreamPipeline(self.model, session.width, session.height)
                configured = None
                settled = True
                marks.clear()
                continue
            # An input is answered by the first frame that fully shows it; later frames may show it too.
            first_answer = marks.pop(result.answers, None)
            if first_answer is not None:
                last_answered = first_answer
            answers = last_answered if last_answered and last_answered.number == result.answers else None
            # Only inputs still inside the stream batch can be answered later; forget the rest.
            marks = {number: mark for number, mark in marks.items() if number > result.answers}
            frame_seq += 1
            timings = {
                "queue_ms": round((job.taken_at - job.newest.received_at) * 1000 if job.fresh else 0.0, 3),
                "inference_ms": round(result.inference_ms, 3),
                "encode_ms": round(encode_ms, 3),
            }
            message = Frame(
                seq=frame_seq,
                input_seq=answers.client_seq if answers else None,
                width=stream.width,
                height=stream.height,
                codec=encoder.format.value,
                image=payload,
                timings=timings,
            )
            recorder = session.recorder
            if recorder is not None:
                recorder.offer(result.image)
            # The newest frame is kept for viewers who join later; while anyone watches, it is also encoded
            # once, as JPEG (MJPEG, OBS), however many watch.
            jpeg = None
            if session.broadcast.wanted:
                jpeg = payload if encoder.format is ImageFormat.JPEG else self._jpeg.encode(result.image, VIEWER_JPEG_QUALITY)
            viewer_frame = BroadcastFrame(frame_seq, result.image, stream.width, stream.height, jpeg)
            # Latency counts once per input: from its arrival to the first frame that fully shows it.
            session.deliver(DeliveredFrame(serialize(message), first_answer, timings), job.dropped, viewer_frame)


class SlotPool:
    """A fixed set of slots plus a bounded line of sessions waiting for one. Event-loop only."""

    def __init__(self, model: LoadedModel, size: int, max_waiting: int, threads_per_slot: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        self.slots = [Slot(index, model, threads_per_slot) for index in range(size)]
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Session] = collections.deque()

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return sum(1 for slot in self.slots if slot.session is None)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def stop(self) -> None:
        for slot in self.slots:
            slot.stop()

    def acquire(self, session: Session) -> Slot | None:
        for slot in self.slots:
            if slot.session is None:
                slot.attach(session)
                return slot
        return None

    def enqueue(self, session: Session) -> int | None:
        """Put the session in line; its 1-based position, or None when the line is full."""
        if len(self._waiting) >= self.max_waiting:
            return None
        self._waiting.append(session)
        return len(self._waiting)

    def release(self, session: Session) -> None:
        """Free the session's slot (or its place in line) at once and hand the slot to the next in line."""
        if session in self._waiting:
            self._waiting.remove(session)
            self._announce_positions()
            return
        for slot in self.slots:
            if slot.session is session:
                slot.detach(session)
                if self._waiting:
                    following = self._waiting.popleft()
                    slot.attach(following)
                    following.bind(slot)
                    self._announce_positions()
                return

    def _announce_positions(self) -> None:
        for position, waiting in enumerate(self._waiting, start=1):
            waiting.queue_moved(position)
