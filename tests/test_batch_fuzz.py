"""The batch API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends — valid or
not — the server answers with a documented status and content type, in the documented shape, and never
with a 5xx. Requests go only to the test server on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import start_server

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
]


def test_the_batch_api_answers_anything_as_its_schema_says(cache_dir: Path, artifacts_dir: Path, tmp_path: Path) -> None:
    # Jobs the fuzzer creates may be big; a one-second timeout keeps the worker moving.
    server = start_server(cache_dir, artifacts_dir, "batch-fuzz", env={"STREAMCANVAS_JOB_TIMEOUT_S": "1"})
    try:
        result = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{server.base_url}/v1/openapi.json",
                "--url", server.base_url,
                "--checks", ",".join(CHECKS),
                "--max-examples", "40",
                "--generation-deterministic",  # the same cases every run; drop it locally to explore
                "--request-timeout", "30",
                "--max-response-time", "30",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # schemathesis keeps a cache in the working directory
        )
        (artifacts_dir / "schemathesis.txt").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-6000:]
        assert "Traceback" not in server.log()
    finally:
        server.stop()
