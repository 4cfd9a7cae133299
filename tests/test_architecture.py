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


def relative_imports(path: Path, with_type_checking: bool) -> set[str]:
    """The sibling modules a module imports relatively (`from .x import y`, `from . import x`)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if not with_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
                skipped.update(id(inner) for inner in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported] if imported in path else [*path, imported]
            if imported not in state and (found := visit(imported, [*path, imported])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_cycle_among_a_packages_modules(package: str) -> None:
    """Relative imports form no cycle. In sessions/ not even through `if TYPE_CHECKING:` imports: slots
    know RenderClient, not Session; a session knows its broker, not the manager."""
    strict = package == "sessions"
    graph = {path.stem: relative_imports(path, strict) for path in (ROOT / package).glob("*.py")}
    assert cycle_in(graph) is None, f"{package}/: {' → '.join(cycle_in(graph) or [])}"


def test_the_slots_never_see_a_session() -> None:
    assert "session" not in relative_imports(ROOT / "sessions" / "slots.py", with_type_checking=True)
    assert "manager" not in relative_imports(ROOT / "sessions" / "session.py", with_type_checking=True)
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker finds cycles
