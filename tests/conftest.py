from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import ServerProcess, server_env
from transport_clients import LOOPBACK_ARGS, TRANSPORTS, use_loopback_ice

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEST_RESOLUTION = 128


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The toy model's retraining runs beside the rest of the suite (BackgroundRetraining): its test goes last.
    items.sort(key=lambda item: item.get_closest_marker("background_retraining") is not None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not any test or id named "cuda"
            item.add_marker(skip)


class BackgroundRetraining:
    """`streamcanvas make-tiny-model --train DIR` (what `make toy-weights` runs), the whole plan from
    scratch, started when the tests are collected and run at the lowest CPU priority beside them.

    It takes about ten minutes of both cores; most tests spend much of their time waiting on servers
    and sockets, so run beside them it mostly takes time they leave idle, and its test (the last one)
    waits only for what is left. Training is deterministic whatever else runs (it uses a fixed number
    of threads), and the run is checked exactly as it would be in the foreground."""

    KEY = pytest.StashKey["BackgroundRetraining"]()

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="streamcanvas-retraining-"))
        self.model = self.root / "toy"
        self.log = (self.root / "output.log").open("w")
        self.process = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "streamcanvas.realtime_server.cli", "make-tiny-model", "--train", str(self.model)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "STREAMCANVAS_CACHE_DIR": str(self.root)},
        )

    def wait(self, timeout: float) -> tuple[int, str]:
        """The command's exit status and the end of its output, once it has finished."""
        returncode = self.process.wait(timeout)
        self.log.flush()
        return returncode, (self.root / "output.log").read_text()[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("background_retraining") is not None for item in session.items):
        session.config.stash[BackgroundRetraining.KEY] = BackgroundRetraining()


def pytest_sessionfinish(session: pytest.Session) -> None:
    retraining = session.config.stash.get(BackgroundRetraining.KEY, None)
    if retraining is not None:
        retraining.close()


@pytest.fixture
def background_retraining(request: pytest.FixtureRequest) -> BackgroundRetraining:
    return request.config.stash[BackgroundRetraining.KEY]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh streamcanvas cache for this test run: the tiny model is built into it on first use."""
    return tmp_path_factory.mktemp("streamcanvas-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    """The UNTRAINED tiny model (built in under a second): for tests that need the shapes, not the pictures."""
    from streamcanvas.pipelines.tiny import make_tiny_model

    return make_tiny_model(cache_dir / "tiny-model")


def ensure_toy_model_in(cache_dir: Path) -> Path:
    """The TRAINED toy model that a server whose cache is `cache_dir` takes as its default model.

    That is the shipped one (pipelines/toy_weights). Only while the recipe has changed and the shipped
    weights have not been retrained yet (`make toy-weights`) is it trained into the cache, once per test
    run (minutes, longer than one test's timeout allows), or copied from STREAMCANVAS_TEST_TOY_MODEL, a
    directory trained by the current plan (`streamcanvas make-tiny-model --train DIR`)."""
    from streamcanvas.pipelines.toy_model import (
        SHIPPED_TOY_MODEL,
        TrainingPlan,
        default_toy_model_dir,
        ensure_toy_model,
        shipped_for,
        trained_by,
    )

    if shipped_for(TrainingPlan()):
        return SHIPPED_TOY_MODEL
    target = cache_dir / default_toy_model_dir().name
    prebuilt = os.environ.get("STREAMCANVAS_TEST_TOY_MODEL")
    if prebuilt and not target.exists():
        if not trained_by(Path(prebuilt), TrainingPlan()):
            pytest.fail(
                f"STREAMCANVAS_TEST_TOY_MODEL={prebuilt} holds no toy model trained by the current plan: "
                f"run `streamcanvas make-tiny-model --train {prebuilt}` (or `make test`, which does)",
                pytrace=False,
            )
        shutil.copytree(prebuilt, target)
    return ensure_toy_model(target, progress=False)


@pytest.fixture(scope="session")
def toy_model_dir(cache_dir: Path) -> Path:
    return ensure_toy_model_in(cache_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    return load_model(ModelSpec(model=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def toy_model(toy_model_dir: Path):  # type: ignore[no-untyped-def]
    """The TRAINED toy model, loaded: for tests whose frames must show their input and prompt."""
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    return load_model(ModelSpec(model=str(toy_model_dir)))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(cache_dir: Path) -> Path:
    """An untrained, SDXL-shaped tiny model (two text encoders, added conditioning): for plumbing."""
    from streamcanvas.pipelines.tiny import make_tiny_sdxl_model

    return make_tiny_sdxl_model(cache_dir / "tiny-sdxl")


@pytest.fixture(scope="session")
def live_extras(cache_dir: Path, toy_model_dir: Path) -> dict[str, Path]:
    """Two LoRAs and a ControlNet for the trained toy model, built offline like the model itself."""
    from streamcanvas.pipelines.depth import make_tiny_depth_model
    from streamcanvas.pipelines.tiny import make_tiny_controlnet, make_tiny_lora

    root = cache_dir / "live-extras"
    return {
        "depth": make_tiny_depth_model(root / "depth"),
        "ink": make_tiny_lora(root / "lora-ink", toy_model_dir, seed=1),
        "glow": make_tiny_lora(root / "lora-glow", toy_model_dir, seed=2),
        "scribble": make_tiny_controlnet(root / "controlnet-scribble", toy_model_dir, seed=3),
        "edges": make_tiny_controlnet(root / "controlnet-edges", toy_model_dir, seed=4),
    }


@pytest.fixture(scope="session")
def upscaler_dirs(cache_dir: Path) -> dict[str, Path]:
    """Two tiny super-resolution networks (Swin2SR with random weights, x2 and x4), built offline."""
    from streamcanvas.pipelines.super_resolution import make_tiny_super_resolution_model

    root = cache_dir / "upscalers"
    return {"sr2": make_tiny_super_resolution_model(root / "sr2", 2), "sr4": make_tiny_super_resolution_model(root / "sr4", 4, seed=1)}


@pytest.fixture(scope="session")
def controlled_model(toy_model_dir: Path, live_extras: dict[str, Path]):  # type: ignore[no-untyped-def]
    """The trained toy model with the LoRAs `ink` and `glow` as adapters, the ControlNets `scribble`
    and `edges`, and a (tiny, random) depth network."""
    from streamcanvas.pipelines.loading import ModelSpec, load_model

    return load_model(
        ModelSpec(
            model=str(toy_model_dir),
            adapters=(("ink", str(live_extras["ink"])), ("glow", str(live_extras["glow"]))),
            controlnets=(("scribble", str(live_extras["scribble"])), ("edges", str(live_extras["edges"]))),
            depth_model=str(live_extras["depth"]),
        )
    )


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "artifacts"
    path.mkdir(exist_ok=True)
    return path


def start_server(
    cache_dir: Path, artifacts_dir: Path, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> ServerProcess:
    # Each named server has its own job database and results, so servers running at once do not
    # share batch jobs (a restarted server of the same name finds its jobs again).
    batch = ["--database-url", f"sqlite:///{cache_dir / f'jobs-{name}.db'}", "--results-dir", str(cache_dir / f"results-{name}")]
    if "--database-url" in args:
        batch = []
    arguments = ["--resolution", f"{TEST_RESOLUTION}x{TEST_RESOLUTION}", "--threads", "2", *batch, *args]
    ensure_toy_model_in(cache_dir)  # the server's default model: if it must be trained, here, not inside its start-up timeout
    log_path = artifacts_dir / f"server-{name}.log"
    log_path.unlink(missing_ok=True)
    return ServerProcess(arguments, {**server_env(cache_dir), **(env or {})}, log_path).start(timeout)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The transport a protocol test runs over: each such test runs over a WebSocket and over WebRTC's
    data channel (`transport_clients.open_session`), against a server started with LOOPBACK_ARGS."""
    if request.param == "webrtc":
        use_loopback_ice()
    return str(request.param)


@pytest.fixture(scope="session")
def server(cache_dir: Path, artifacts_dir: Path, upscaler_dirs: dict[str, Path]) -> Iterator[ServerProcess]:
    """The shared server: two slots, default settings, the trained toy model (and WebRTC's ICE on
    loopback, for the tests that run over both transports), and the tiny upscalers `sr2` and `sr4`."""
    upscalers = [f"--upscaler={name}={path}" for name, path in upscaler_dirs.items()]
    process = start_server(cache_dir, artifacts_dir, "shared", "--slots", "2", *LOOPBACK_ARGS, *upscalers)
    yield process
    process.stop()
