"""The shape ARCHITECTURE.md describes, checked on the source (every import, deferred ones inside functions too):
no import cycle in service/, training/ or bench/; no service module over 500 lines; data flows one way (the
protocols know no ONNX Runtime, the engine knows no protocol, the service never imports torch or training); each
protocol depends on the neutral core and the shared kit, never on another protocol.

That an API process really runs without ONNX Runtime loaded is checked on a running server in
tests/integration/test_frontend.py."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "training", "bench")
MAX_SERVICE_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path) -> Iterator[str]:
    """Every module `path` imports, absolute names; relative imports resolved; `from a import b` yields a.b when
    that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}"
                yield base


def graph() -> dict[str, set[str]]:
    modules = sources()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = {target for target in imports_of(name, path) if target in modules and target != name}
        # importing a.b.c also runs a and a.b: an edge to each package on the way
        for target in list(found):
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
        edges[name] = found - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def external_imports(name: str) -> set[str]:
    return {target.split(".")[0] for target in imports_of(name, sources()[name])}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_anywhere() -> None:
    found = cycles(graph())
    assert not found, "import cycles (deferred imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_service_module_over_500_lines() -> None:
    long = {
        name: n
        for name, path in sources().items()
        if name.startswith("service") and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_SERVICE_LINES
    }
    assert not long, long


def test_the_service_never_imports_torch_or_training() -> None:
    edges = graph()
    for name in [m for m in edges if m.startswith("service")]:
        assert not {"torch", "training", "transformers"} & external_imports(name), name
        assert not any(t.startswith("training") for t in edges[name]), name


# Modules whose import (with everything they import) must not load ONNX Runtime: the neutral core and every
# protocol run in API processes, which send token ids to the engine process and never run a session.
API_SIDE = ("service.core", "service.frontend.app", "service.ipc.client", "service.ipc.api")


@pytest.mark.parametrize("start", API_SIDE)
def test_the_api_side_never_reaches_onnx_runtime_or_the_engine(start: str) -> None:
    edges = graph()
    closure = reachable(edges, start) | {start}
    assert not {"service.engine", "service.runtime", "service.batching"} & closure, sorted(closure)
    assert not [m for m in closure if "onnxruntime" in external_imports(m)], sorted(closure)


def protocol_modules() -> list[str]:
    return sorted(m for m in sources() if m.startswith("service.frontend.protocols.") and not m.endswith("__init__"))


def test_protocols_depend_on_the_core_and_the_kit_never_on_each_other() -> None:
    protocols = protocol_modules()
    assert len(protocols) >= 5, protocols  # native, v2 HTTP, v2 gRPC, TEI, vLLM
    edges = graph()
    for name in protocols:
        others = edges[name] & (set(protocols) | {"service.frontend.app"})
        assert not others, f"{name} imports {sorted(others)}"
