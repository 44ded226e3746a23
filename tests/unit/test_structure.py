"""The package's shape as docs/architecture.md draws it, checked from the code's own imports.

- no import cycle between the packages of otel_envoy (a package: a subpackage, or a top-level module);
- the pipeline's direction holds: spans/ never imports export/, lower rooms never import upper ones;
- no module imports a private name of another module of the project;
- every module stays small enough to hold (Python <= 600 lines, the kernel program's C files <= 700);
- one file name per role: no two modules of the package share a file name;
- tests mirror the package: each folder under tests/unit/ names a package of otel_envoy.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "otel_envoy"
MAX_PY_LINES = 600
MAX_C_LINES = 700

# The floors of docs/architecture.md: a room may import only rooms on lower floors.
LEVELS: dict[str, int] = {
    "envoy": 0, "protocols": 1, "stacks": 0, "sampling": 0, "accounting": 0, "shared_attributes": 0,
    "thread_names": 0,
    "events": 1,
    "correlate": 2,
    "spans": 3, "probes": 3,
    "export": 4, "run_summary": 4,
    "event_pipeline": 5, "lab": 5, "features": 5, "status": 5, "budget_loop": 5,
    "daemon": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    """The dotted module name of a file under the project root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of otel_envoy, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for each import of a module, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.append((target, [alias.name for alias in node.names]))
    return out


def room_of(module: str) -> str | None:
    """The package (room) a module of otel_envoy belongs to: its first name below otel_envoy."""
    parts = module.split(".")
    if parts[0] != "otel_envoy" or len(parts) < 2:
        return None
    return parts[1]


def room_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Arrows between rooms: room -> the other rooms it imports from."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        src = room_of(name)
        if src is None:
            continue
        graph[src]
        for target, names in imports_of(name, path):
            candidates = [target] + [f"{target}.{n}" for n in names]
            for cand in candidates:
                dst = room_of(cand)
                if dst is not None and dst != src and (cand in modules or cand == target):
                    graph[src].add(dst)
                    break
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of a directed graph as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_packages() -> None:
    graph = room_graph(package_modules())
    assert len(graph) >= 8, graph  # the walk found the rooms
    assert find_cycle(graph) is None, find_cycle(graph)


def test_arrows_run_down_the_pipeline() -> None:
    graph = room_graph(package_modules())
    assert set(graph) == set(LEVELS), "a room was added or removed: give it its floor here and in the docs"
    not_down = [(src, dst) for src, dsts in graph.items() for dst in dsts if LEVELS[dst] >= LEVELS[src]]
    assert "export" not in graph["spans"]
    assert not_down == []


def test_no_module_imports_a_private_name_of_another() -> None:
    modules = package_modules()
    offenders = []
    for name, path in modules.items():
        for target, names in imports_of(name, path):
            if not target.startswith("otel_envoy"):
                continue
            offenders += [f"{name} imports {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
            if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__"):
                offenders.append(f"{name} imports private module {target}")
    assert offenders == []


def test_modules_stay_small() -> None:
    too_long = [f"{p.relative_to(ROOT)}: {n}" for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_PY_LINES]
    too_long += [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")
                 and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_C_LINES]
    assert too_long == []


def test_one_file_name_per_role() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in PACKAGE.rglob("*.py"):
        if p.name != "__init__.py":
            by_name[p.name].append(str(p.relative_to(ROOT)))
    assert {n: ps for n, ps in by_name.items() if len(ps) > 1} == {}


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "tests" / "unit").iterdir()
                                          if p.is_dir() and not p.name.startswith(("_", "."))))
def test_unit_test_folders_mirror_packages(folder: str) -> None:
    assert (PACKAGE / folder / "__init__.py").exists(), f"tests/unit/{folder}/ names no package of otel_envoy"


def documented_arrows() -> dict[str, set[str]]:
    """The arrows docs/architecture.md lists under its floors ("room ──► room room ..." lines)."""
    arrows: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        if "──►" not in line or line.startswith(("bpf/", " ")):
            continue
        left, right = line.split("──►", 1)
        targets = {w.rstrip("/").removesuffix(".py") for w in right.split() if w.endswith(("/", ".py"))}
        for room in left.replace(",", " ").split():
            arrows[room.rstrip("/").removesuffix(".py")] = targets
    return arrows


def test_the_documented_arrows_are_the_code_s() -> None:
    graph = room_graph(package_modules())
    assert documented_arrows() == {room: set(dsts) for room, dsts in graph.items()}
