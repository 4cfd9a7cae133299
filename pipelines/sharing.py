"""How many sessions one slot should serve: measured, for `--sessions-per-slot auto`.

Sharing a slot pays where a batch of frames costs little more than one frame (a GPU) and costs latency
where it does not (a CPU, whose convolutions cost nearly the same per image in a batch). The policy:
the most sessions whose shared round, all of them rendered together (`render_together`), takes at most
`LATENCY_FACTOR` times one session's frame. Measured at start-up on this device, this model and the
default session size, within a time budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .loading import LoadedModel
from .stream import StreamParams, StreamPipeline, render_together

LATENCY_FACTOR = 1.5
"""A shared round may take this many times one session's frame (the issue's latency bound)."""
CANDIDATES = (1, 2, 4, 8)
ROUNDS = 3
BUDGET_S = 10.0


@dataclass(frozen=True)
class Sharing:
    sessions_per_slot: int
    round_ms: dict[int, float] = field(default_factory=dict)
    """Median round time (every stream one frame) for each count measured."""
    reason: str = ""

    @property
    def frame_target_ms(self) -> float | None:
        """The round time the slot keeps to once sessions share it: the bound the count was chosen by."""
        if self.sessions_per_slot == 1 or 1 not in self.round_ms:
            return None
        return round(self.round_ms[1] * LATENCY_FACTOR, 1)

    def describe(self) -> dict[str, object]:
        return {
            "policy": "auto",
            "sessions_per_slot": self.sessions_per_slot,
            "round_ms": {str(count): ms for count, ms in self.round_ms.items()},
            "latency_factor": LATENCY_FACTOR,
            "reason": self.reason,
        }


def streams_for(model: LoadedModel, width: int, height: int, params: StreamParams, count: int) -> list[StreamPipeline]:
    """`count` img2img streams with these parameters, seeds 0, 1, …: sessions as a slot would hold them."""
    streams = []
    for index in range(count):
        stream = StreamPipeline(model, width, height)
        stream.configure(params.replace(seed=index), img2img=True)
        streams.append(stream)
    return streams


def sample_canvases(width: int, height: int, count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def round_ms(
    streams: list[StreamPipeline], canvases: list[np.ndarray], rounds: int, together: bool = True, first_tag: int = 0
) -> list[float]:
    """The time of each of `rounds` rounds in which every stream renders one frame (of the next canvas):
    together, in shared calls (`render_together`), or one after another (`StreamPipeline.render`)."""
    times = []
    for tag in range(first_tag, first_tag + rounds):
        canvas = canvases[tag % len(canvases)]
        started = time.perf_counter()
        if together:
            for result in render_together([(stream, canvas, tag, False) for stream in streams]):
                if isinstance(result, Exception):
                    raise result
        else:
            for stream in streams:
                stream.render(canvas, tag=tag)
        times.append((time.perf_counter() - started) * 1000)
    return times


def measure_sharing(
    model: LoadedModel, width: int, height: int, params: StreamParams, budget_s: float = BUDGET_S
) -> Sharing:
    """Time rounds of 1, 2, 4, 8 streams rendered together and pick the count (see the module)."""
    canvases = sample_canvases(width, height)
    started = time.perf_counter()
    measured: dict[int, float] = {}
    chosen = 1
    for count in CANDIDATES:
        streams = streams_for(model, width, height, params, count)
        if not all(stream.batchable for stream in streams):
            return Sharing(1, measured, "the default stream parameters run several UNet calls a frame: nothing to share")
        times = round_ms(streams, canvases, ROUNDS + 1)[1:]  # the first round primes the streams
        measured[count] = round(float(np.median(times)), 1)
        if measured[count] > LATENCY_FACTOR * measured[1]:
            break
        chosen = count
        if time.perf_counter() - started > budget_s:
            break
    over = [count for count in measured if count > chosen]
    if chosen == 1:
        reason = f"one session's frame takes {measured[1]:.0f} ms"
    else:
        reason = (
            f"{chosen} sessions rendered together take {measured[chosen]:.0f} ms a round, within "
            f"{LATENCY_FACTOR}x one session's {measured[1]:.0f} ms"
        )
    if over:
        reason += f"; {over[0]} together take {measured[over[0]]:.0f} ms, over {LATENCY_FACTOR}x"
    elif chosen < CANDIDATES[-1]:
        reason += f"; the {budget_s:g} s measuring budget ran out"
    return Sharing(chosen, measured, reason)
