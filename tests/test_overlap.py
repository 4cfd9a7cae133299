"""A slot that decodes one frame while its worker denoises the next (`--overlap-decode`): the same
frames, in the same order, answering the same inputs as a slot that does one thing at a time, and the
decode really runs beside the next frame's denoising; with `auto`, only for streams on ONNX Runtime.
Driven through a real `Slot` with the trained toy model (on eager torch and on ONNX Runtime) and a
render client of the test's own, which never drops an input (so the frames are deterministic and can
be compared with the stream rendering the same inputs alone)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import make_canvas
from streamcanvas.codecs.images import ImageFormat
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
from streamcanvas.sessions.broadcast import BroadcastFrame
from streamcanvas.sessions.jobs import DeliveredFrame, InputMark, RenderJob
from streamcanvas.sessions.slots import Slot

SIDE = 128
PARAMS = StreamParams(prompt="a red house", seed=3, strength=0.6, steps=2)


class Camera:
    """A render client with a line of canvases that it hands over one per job, as fast as the slot
    takes them: like a camera whose frames all matter. Safe from the slot's two threads."""

    id = "camera"
    closed = False

    def __init__(self, canvases: list[np.ndarray]) -> None:
        self._lock = threading.Lock()
        self._line = collections.deque(enumerate(canvases, start=1))
        self._last: tuple[int, np.ndarray] | None = None
        self.taken: list[tuple[int, float]] = []
        """(input number, when the worker took it)."""
        self.frames: list[tuple[DeliveredFrame, np.ndarray, str, float]] = []
        """(frame, its image, the thread that delivered it, when)."""
        self.failures: list[str] = []
        self.arrived = threading.Condition(self._lock)

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        pass

    def take_job(self, settled: bool, flush: bool) -> RenderJob | None:
        with self._lock:
            if self._line:
                self._last, fresh = self._line.popleft(), True
                self.taken.append((self._last[0], time.perf_counter()))
            elif flush and not settled and self._last is not None:
                fresh = False
            else:
                return None
            number, canvas = self._last
        mark = InputMark(number, number, time.monotonic())
        return RenderJob(
            image=canvas, newest=mark, taken_at=time.monotonic(), params=PARAMS, img2img=True, width=SIDE, height=SIDE,
            dropped=0, fresh=fresh, codec=ImageFormat.PNG,
        )  # fmt: skip

    def has_input(self) -> bool:
        with self._lock:
            return bool(self._line)

    def deliver(self, frame: DeliveredFrame, dropped_inputs: int, viewer_frame: BroadcastFrame) -> None:
        with self._lock:
            self.frames.append((frame, viewer_frame.rgb, threading.current_thread().name, time.perf_counter()))
            self.arrived.notify_all()

    def report_skipped(self, dropped_inputs: int) -> None:
        pass

    def report_failure(self, description: str, ref_seq: int | None) -> None:
        with self._lock:
            self.failures.append(description)
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        with self._lock:
            assert self.arrived.wait_for(lambda: len(self.frames) >= count or self.failures, timeout), len(self.frames)
            assert not self.failures, self.failures


def rendered_alone(model: object, canvases: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """What the stream gives for these inputs rendered one by one on this thread: (image, the input
    each frame answers). The first refills the stream batch, as a slot's first input does."""
    stream = StreamPipeline(model, SIDE, SIDE)  # type: ignore[arg-type]
    stream.configure(PARAMS, img2img=True)
    assert stream.backend == model.backend.name  # type: ignore[attr-defined]
    results = [stream.render(canvas, tag=number, refill=number == 1) for number, canvas in enumerate(canvases, start=1)]
    return [(result.image, result.answers) for result in results]  # type: ignore[misc]


@pytest.fixture(scope="module")
def models(toy_model: object, toy_model_dir: Path, cache_dir: Path) -> dict[str, object]:
    """The trained toy model on eager torch, and loaded again with ONNX Runtime's graphs."""
    from streamcanvas.pipelines.backends import BackendConfig, prepare_backend
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    compiled = load_model(ModelSpec(model=str(toy_model_dir)))
    compiled.backend = prepare_backend(compiled, BackendConfig(name="onnxruntime", engine_dir=cache_dir / "engines", threads=2, measure_side=SIDE))
    return {"torch": toy_model, "onnxruntime": compiled}


@pytest.mark.parametrize(
    ("policy", "backend", "overlap"),
    [("off", "torch", False), ("on", "torch", True), ("auto", "torch", False), ("auto", "onnxruntime", True)],
)
def test_a_slot_that_overlaps_decoding_sends_the_same_frames_in_order(
    models: dict[str, object], policy: str, backend: str, overlap: bool
) -> None:
    model = models[backend]
    canvases = [make_canvas(SIDE, 10 + index) for index in range(6)]
    expected = rendered_alone(model, canvases)
    camera = Camera(canvases)
    slot = Slot(0, model, overlap_decode=policy)  # type: ignore[arg-type]
    slot.start()
    try:
        slot.attach(camera)
        camera.wait_for(len(canvases))
    finally:
        slot.stop()
    frames = camera.frames[: len(canvases)]
    assert [frame.payload is not None for frame, _, _, _ in frames] == [True] * len(canvases)
    # In order, one per input, each the frame the stream renders alone, answering the same input.
    for index, ((frame, image, _, _), (wanted, answers)) in enumerate(zip(frames, expected)):
        assert int(np.abs(image.astype(int) - wanted.astype(int)).max()) <= 1, index
        assert (frame.answers.number if frame.answers else None) in (answers, None)
    first_answers = [frame.answers.number for frame, _, _, _ in frames if frame.answers is not None]
    assert first_answers == sorted(set(first_answers)) and first_answers, first_answers
    threads = {thread for _, _, thread, _ in frames}
    if not overlap:
        assert threads == {"slot-0"}
        # One thing at a time: the next input is taken only after the last frame went out.
        for (_, taken_at), (_, _, _, sent_at) in zip(camera.taken[1:], frames):
            assert taken_at > sent_at
        return
    assert all(thread.startswith("slot-0-decode") for thread in threads), threads
    # The worker takes (and denoises) the next input while the decode thread still finishes the last.
    overlapped = [taken_at < sent_at for (_, taken_at), (_, _, _, sent_at) in zip(camera.taken[1:], frames)]
    assert any(overlapped), overlapped
