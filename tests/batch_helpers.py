"""Helpers for the batch queue tests: a real redis-server, `streamcanvas worker` processes, a job client."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from helpers import free_port

TERMINAL = {"finished", "failed", "cancelled"}


class RedisServer:
    """redis-server on 127.0.0.1 and a free port, with no persistence, in its own directory."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: `make test` installs it (apt-get install redis-server)"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return self
            time.sleep(0.1)
        raise RuntimeError("redis-server did not answer in 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class WorkerProcess:
    """`streamcanvas worker` in a child process; `ready` once it consumes."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        command = [sys.executable, "-m", "streamcanvas.realtime_server.cli", "worker", *self.args]
        offset = len(self.log())
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if re.search(r"streamcanvas worker \S+ ready", self.log()[offset:]):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Jobs:
    """A small client of /v1/jobs."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def create(self, kind: str, params: dict[str, Any], expect: int = 201, **fields: Any) -> dict[str, Any]:
        headers = {}
        if "idempotency_key" in fields:
            headers["Idempotency-Key"] = fields.pop("idempotency_key")
        response = self.http.post("/v1/jobs", json={"kind": kind, "params": params, **fields}, headers=headers)
        assert response.status_code == expect, response.text
        return response.json()

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def cancel(self, job_id: str) -> httpx.Response:
        return self.http.post(f"/v1/jobs/{job_id}/cancel")

    def wait(self, job_id: str, statuses: set[str] = TERMINAL, timeout: float = 120.0, step: int = 0) -> dict[str, Any]:
        """Poll until the job's status is one of `statuses` (and, if given, it reached `step`)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in statuses and job["progress"]["step"] >= step:
                return job
            if job["status"] in TERMINAL and job["status"] not in statuses:
                raise AssertionError(f"job ended {job['status']} while waiting for {statuses}: {job}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job still {job['status']} after {timeout} s: {job}")
            time.sleep(0.1)

    def events(self, job_id: str, timeout: float = 120.0) -> list[tuple[str, dict[str, Any]]]:
        """Read the job's SSE stream to its end."""
        found: list[tuple[str, dict[str, Any]]] = []
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    assert name is not None
                    found.append((name, json.loads(line[6:])))
        return found

    def image(self, url: str) -> Image.Image:
        response = self.http.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
        image = Image.open(io.BytesIO(response.content))
        image.load()
        return image

    def close(self) -> None:
        self.http.close()


def png_base64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port (run as `postgres` when we are root,
    since PostgreSQL refuses to run as root). Its directory is directly under the system's temporary
    directory, which that user can reach (pytest's own temporary directories are private to us)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="streamcanvas-pg-"))
        self.bin = self._find_bin()

    @staticmethod
    def _find_bin() -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        assert found, "PostgreSQL is missing: `make test` installs it (apt-get install postgresql)"
        return found[-1].parent

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.directory} -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.directory / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
