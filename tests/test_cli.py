"""The `streamcanvas` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline

from helpers import ServerProcess, free_port, server_env


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamcanvas.realtime_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_explains_the_commands_and_options() -> None:
    top = run("--help")
    assert top.returncode == 0 and "serve" in top.stdout and "make-tiny-model" in top.stdout
    serve = run("serve", "--help")
    assert serve.returncode == 0
    for option in ("--host", "--port", "--model", "--resolution", "--slots", "--device", "--log-level", "--api-key"):
        assert option in serve.stdout, option
    assert "loopback" in serve.stdout and "STREAMCANVAS_" in serve.stdout
    assert "--batch-queue" in serve.stdout and "--redis-url" in serve.stdout
    worker = run("worker", "--help")
    assert worker.returncode == 0 and "--redis-url" in worker.stdout and "--database-url" in worker.stdout


def test_make_tiny_model_writes_a_loadable_diffusers_directory(tmp_path: Path) -> None:
    result = run("make-tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert pipe.vae_scale_factor == 8
    assert (tmp_path / "tiny" / "taesd" / "config.json").is_file()


def test_train_keeps_a_model_trained_by_the_same_plan(tmp_path: Path, toy_model_dir: Path) -> None:
    import shutil

    from streamcanvas.pipelines.tiny import weights_fingerprint

    copy = tmp_path / "toy"
    shutil.copytree(toy_model_dir, copy)
    before = weights_fingerprint(copy)
    result = run("make-tiny-model", "--train", str(copy))
    assert result.returncode == 0, result.stderr
    assert "kept it" in result.stdout and weights_fingerprint(copy) == before
    alone = run("make-tiny-model", "--retrain", str(tmp_path / "x"))
    assert alone.returncode == 2 and "--retrain goes with --train" in alone.stderr


def test_a_missing_model_fails_before_listening(tmp_path: Path, cache_dir: Path) -> None:
    port = free_port()
    result = run("serve", "--port", str(port), "--model", str(tmp_path / "nowhere"), env=server_env(cache_dir))
    assert result.returncode == 2
    assert "cannot start" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout
    uncached = run("serve", "--port", str(port), "--model", "someone/not-cached", env=server_env(cache_dir))
    assert uncached.returncode == 2 and "Hugging Face cache" in uncached.stderr


def test_an_unreachable_redis_stops_the_worker_and_the_server_before_they_start(cache_dir: Path) -> None:
    """Both say where they looked (without the password) and stop, instead of loading the models and
    saying "ready" (the worker then logged Dramatiq's connection errors every few seconds)."""
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    for command in (["worker", "--redis-url", url], ["serve", "--port", str(free_port()), "--batch-queue", "redis", "--redis-url", url]):
        result = run(*command, env=server_env(cache_dir), timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert f"cannot start: no Redis answers at redis://:***@127.0.0.1:{port}/0" in result.stderr
        assert "start redis-server there" in result.stderr
        assert "hunter2" not in output and "ready" not in result.stdout and "Uvicorn running" not in output


def test_bad_settings_are_usage_errors(cache_dir: Path) -> None:
    """The commands themselves, in this process (click's runner): each refusal comes before anything is
    loaded or bound, so it needs no process of its own (test_a_missing_model_fails_before_listening
    checks the installed entry point's exit status)."""
    from click.testing import CliRunner

    from streamcanvas.realtime_server.cli import main

    env = server_env(cache_dir)
    cases = [
        (["serve", "--resolution", "100x100"], "not a multiple of 8"),
        # A default size sessions could not ask for is refused, not quietly made the maximum.
        (["serve", "--resolution", "2048x2048"], "--resolution 2048x2048 is over --max-resolution 1024x1024"),
        (["serve", "--device", "cuda", "--port", str(free_port())], "CUDA"),
        (["serve", "--batch-queue", "redis"], "--redis-url"),
        (["worker"], "--redis-url"),
        (["serve", "--batch-live-share", "2"], "--batch-live-share (STREAMCANVAS_BATCH_LIVE_SHARE)"),
        (["serve", "--frame-target", "100"], "--sessions-per-slot 2 or more"),
        (["serve", "--sessions-per-slot", "0"], "--sessions-per-slot (STREAMCANVAS_SESSIONS_PER_SLOT)"),
        (["serve", "--sessions-per-slot", "auto", "--no-batching"], "cannot go with --no-batching"),
        (["serve", "--upscaler", "x=/a", "--upscaler", "x=/b"], "--upscaler: the name 'x' is given twice"),
        # A bad value is named as the user gave it: the option, and the variable that sets it too.
        (["serve", "--idle-timeout", "-1"], "--idle-timeout (STREAMCANVAS_IDLE_TIMEOUT_S): Input should be greater than 0"),
    ]
    environment_cases = [
        # A misspelt variable was ignored without a word: here it would have left the server without keys.
        ({"STREAMCANVAS_API_KEY": "secret"}, "STREAMCANVAS_API_KEY is not a setting (did you mean STREAMCANVAS_API_KEYS?)"),
        ({"STREAMCANVAS_IDLE_TIMEOUT_S": "-1"}, "STREAMCANVAS_IDLE_TIMEOUT_S): Input should be greater than 0"),
        ({"STREAMCANVAS_LOG_LEVEL": "loud"}, "STREAMCANVAS_LOG_LEVEL): Input should be"),  # was a traceback
    ]
    for arguments, message, extra in [(arguments, message, {}) for arguments, message in cases] + [
        (["serve", "--port", str(free_port())], message, extra) for extra, message in environment_cases
    ]:
        result = CliRunner().invoke(main, arguments, env={**env, **extra})
        assert result.exit_code == 2 and message in result.stderr, (arguments, extra, result.exit_code, result.stderr[-2000:])


def test_the_server_says_it_runs_the_trained_toy_model(server: ServerProcess) -> None:
    log = server.log()
    assert "no --model given" in log and "trained TOY model" in log and "--model stabilityai/sd-turbo" in log
