"""What a running server holds: settings, the loaded model, the session manager, and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time

import numpy as np

from streamcanvas.batch_fallback.errors import Forbidden, InvalidJob
from streamcanvas.batch_fallback.kinds import LiveCapture
from streamcanvas.batch_fallback.queues import check_redis
from streamcanvas.batch_fallback.service import BatchService
from streamcanvas.pipelines.backends import prepare_backend
from streamcanvas.pipelines.devices import in_short_lived_thread
from streamcanvas.pipelines.loading import inference_threads
from streamcanvas.pipelines.models import ModelSet, load_models
from streamcanvas.pipelines.sharing import Sharing, measure_sharing
from streamcanvas.pipelines.stream import StreamParams, StreamPipeline
from streamcanvas.pipelines.styles import StylePreset, load_styles
from streamcanvas.sessions.config import Catalog
from streamcanvas.sessions.manager import SessionManager, TokenRejected
from streamcanvas.sessions.session import SessionState

from .settings import Settings

logger = logging.getLogger(__name__)

LIVE_INPUT_WINDOW_S = 2.0
"""A live session counts as rendering (and batch jobs yield to it) for this long after its last input."""


class Readiness(enum.Enum):
    WARMING_UP = "warming_up"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class Runtime:
    def __init__(
        self,
        settings: Settings,
        models: ModelSet,
        threads: int,
        sharing: Sharing | None,
        styles: dict[str, StylePreset],
    ) -> None:
        self.settings = settings
        self.models = models
        self.model = models.default
        self.styles = styles
        self.sharing = sharing
        """What `--sessions-per-slot auto` measured at start-up (None for a given count)."""
        # On the CPU the slots share the cores: each worker gets its share of torch threads, so their
        # OpenMP pools together never outnumber the cores (see in_short_lived_thread).
        per_slot = max(1, threads // settings.slots) if self.model.placement.device.type == "cpu" else None
        choices = models.choices()
        catalog = Catalog(models=choices, styles=self.styles)
        defaults = choices[models.default_name].defaults
        assert defaults is not None
        # Overlapping the decode with the next frame's UNet takes a second core's work: on the CPU it is
        # there (see Slot); on CUDA both would queue on the same device stream, and it is off unless asked.
        overlap = "off" if settings.overlap_decode == "auto" and self.model.placement.device.type != "cpu" else settings.overlap_decode
        config = dataclasses.replace(
            settings.session_config(sharing), default_params=defaults, catalog=catalog, overlap_decode=overlap
        )
        self.manager = SessionManager(config, models, threads_per_slot=per_slot)
        self.readiness = Readiness.WARMING_UP
        self.warmup_ms: float | None = None
        self.failure: str | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self.peers: dict = {}  # WebRTC peer connections by resource id (realtime_server.webrtc)
        self.batch = BatchService(settings.batch_config(), models, self.capture_live, torch_threads=per_slot, styles=styles)
        self._live_task: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load the models and prepare their backends (raising ModelNotFound / ModelLoadError /
        BackendUnavailable), and check that the job queue's Redis answers (QueueUnavailable), before
        anything listens."""
        if settings.batch_queue == "redis" and settings.redis_url:
            check_redis(settings.redis_url)
        threads = inference_threads(settings.threads)
        specs = settings.model_specs()
        backend_config = settings.backend_config(threads)

        def load() -> tuple[ModelSet, Sharing | None, dict[str, StylePreset]]:
            models = load_models(specs, settings.memory_budget_bytes)
            model = models.default
            styles = load_styles(settings.styles, model.adapters.names, model.controlnets.names)
            for _, each in models:
                each.backend = prepare_backend(each, backend_config)
            if settings.sessions_per_slot != "auto":
                return models, None, styles
            width, height = settings.size
            sharing = measure_sharing(model, width, height, StreamParams().replace(**model.stream_defaults))
            logger.info("--sessions-per-slot auto: %d (%s)", sharing.sessions_per_slot, sharing.reason)
            return models, sharing, styles

        models, sharing, styles = in_short_lived_thread(load)
        return cls(settings, models, threads, sharing, styles)

    async def start(self) -> None:
        """Start the slot workers and warm up in the background; /healthz says ready when done."""
        self.manager.start()
        await asyncio.to_thread(self.batch.start)
        self._live_task = asyncio.create_task(self._report_live_sessions(), name="live-sessions")
        if not self.settings.warmup:
            self.readiness = Readiness.READY
            return
        self._warmup_task = asyncio.create_task(self._warm_up_in_background(), name="warm-up")

    async def _warm_up_in_background(self) -> None:
        try:
            self.warmup_ms = await asyncio.to_thread(in_short_lived_thread, self._warm_up)
        except Exception as error:  # noqa: BLE001 - reported through /healthz and the log
            logger.exception("warm-up failed")
            self.failure = f"{type(error).__name__}: {error}"
            self.readiness = Readiness.FAILED
            return
        self.readiness = Readiness.READY
        logger.info("warm-up done in %.0f ms; ready for sessions", self.warmup_ms)

    def _warm_up(self) -> float:
        width, height = self.settings.size
        started = time.perf_counter()
        stream = StreamPipeline(self.model, width, height)
        stream.configure(StreamParams(prompt="warm-up"), img2img=True)
        canvas = np.full((height, width, 3), 200, dtype=np.uint8)
        for index in range(2):
            stream.render(canvas, tag=index)
        return (time.perf_counter() - started) * 1000

    async def stop(self) -> None:
        self.readiness = Readiness.STOPPING
        if self._warmup_task is not None:
            await self._warmup_task
        for peer in list(self.peers.values()):
            await peer.close()
        await self.manager.stop()
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_task
        await asyncio.to_thread(self.batch.stop)

    async def _report_live_sessions(self) -> None:
        """Tell the batch queue, four times a second, how many live sessions are rendering (it yields
        the device to them). A session counts while inputs keep coming: within LIVE_INPUT_WINDOW_S
        of its last one, so an open but idle tab does not hold batch jobs back."""
        while True:
            active = 0
            for session in list(self.manager.sessions.values()):
                since = session.seconds_since_input()
                if session.state is SessionState.STREAMING and since is not None and since < LIVE_INPUT_WINDOW_S:
                    active += 1
            self.batch.set_live_sessions(active)
            await asyncio.sleep(0.25)

    def capture_live(self, session_id: str, token: str) -> LiveCapture:
        """A live session's canvas, prompt and seed, for a batch job; the session's control token is needed."""
        session = self.manager.sessions.get(session_id)
        if session is None:
            raise InvalidJob(f"no live session {session_id!r}", field="params.session_id")
        try:
            self.manager.tokens.verify(token, session_id, ("control",))
        except TokenRejected as error:
            raise Forbidden(f"session_token: {error}", field="params.session_token") from None
        canvas, params, layer = session.capture()
        return LiveCapture(
            canvas=canvas, params=params, width=session.width, height=session.height, control_layer=layer, model=session.model_name
        )

    @property
    def ready(self) -> bool:
        return self.readiness is Readiness.READY
