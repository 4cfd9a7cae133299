"""The dependency direction: realtime_server → sessions → pipelines → trt_engines; codecs imports nothing
of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "codecs": set(),
    "trt_engines": set(),
    "pipelines": {"trt_engines"},
    "sessions": {"pipelines", "codecs"},
    "batch_fallback": {"pipelines", "codecs"},
    "realtime_server": {"sessions", "pipelines", "trt_engines", "codecs", "batch_fallback"},
    "benchmarks": {"realtime_server", "sessions", "pipelines", "trt_engines", "codecs", "batch_fallback"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "streamcanvas" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_dependency_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for path in files:
        wrong = imported_packages(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_inference_is_not_called_from_coroutines() -> None:
    """No coroutine in the server or session layer calls a pipeline's render/configure directly."""
    for package in ("realtime_server", "sessions", "batch_fallback"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.AsyncFunctionDef):
                    for call in ast.walk(node):
                        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                            assert call.func.attr not in {"render", "configure", "predict_x0_batch"}, (
                                f"{path.relative_to(ROOT)}:{call.lineno} runs inference inside {node.name}()"
                            )
