"""The import rules of the code base, checked on the import graph read from the source (``ast``).

One installed namespace, ``room_ledger``: its top-level modules are the core, its folders
``bridge/``, ``projections/``, ``web/``, ``cli/`` and ``migrations/`` are the wings around it.

- the core imports no wing;
- the services (``bridge``, ``projections``, ``web``) never import each other;
- ``bench/`` imports no ``cli`` module (it measures the public APIs, or the ``ledger`` command as
  a subprocess);
- no import cycle among the modules of ``room_ledger``.

Every import counts, at module level or inside a function (a lazy import still runs), except those
under ``if TYPE_CHECKING:`` (never executed).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The folders inside the one installed namespace that are wings (services and the command line)
#: around the core; every other module of ``room_ledger`` is the core.
WINGS = ("bridge", "projections", "cli", "migrations", "web")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in ("room_ledger", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, *,
             type_checking: bool = False) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import that runs, resolved to a module of this repository
    where one exists (``from room_ledger import state`` is ``room_ledger.state``; ``from room_ledger import Ledger``
    is ``room_ledger``)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, list[tuple[str, int]]]:
    graph: dict[str, list[tuple[str, int]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = sorted(set(_imports(tree, module, path.name == "__init__.py")))
    return graph


GRAPH = _graph()


def _top(module: str) -> str:
    """The layer a module belongs to: ``core``, a wing's name, ``bench``, or a third-party package."""
    parts = module.split(".")
    if parts[0] != "room_ledger":
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else "core"


LAYERS = ("core", *WINGS)


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
        for module, targets in GRAPH.items() if _top(module) == source
        for target, line in targets if _top(target) in forbidden
    ]


def test_the_graph_is_read() -> None:
    assert "room_ledger.state" in {t for t, _ in GRAPH["room_ledger.hydrate"]}
    assert len(GRAPH) > 50


@pytest.mark.parametrize(("source", "forbidden"), [
    ("core", WINGS),
    ("bridge", ("projections", "web", "cli")),
    ("projections", ("bridge", "web", "cli")),
    ("web", ("bridge", "projections", "cli")),
    ("bench", ("cli",)),
])
def test_import_rules(source: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(source, forbidden) == [], f"{source} must not import {', '.join(forbidden)}"


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components over the packages' modules.
    nodes = [m for m in GRAPH if _top(m) in LAYERS]
    edges = {m: sorted({t for t, _ in GRAPH[m] if t in GRAPH and _top(t) in LAYERS and t != m}) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_a_violation_is_seen() -> None:
    # The checker itself: an import of projections from the core is reported, one under
    # TYPE_CHECKING is not.
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import room_ledger.cli.main\n"
                     "def f():\n    from room_ledger.projections import rows\n")
    assert sorted(_imports(tree, "room_ledger.x", False)) == [("room_ledger.projections.rows", 5), ("typing", 1)]


def _all_imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every import, ``TYPE_CHECKING`` ones included: a design's dependencies, not only the runtime's."""
    return (target for target, _ in _imports(tree, module, is_package, type_checking=True))


#: Circles left counting TYPE_CHECKING imports (issue "The house, second step"): none. ``Ledger`` is
#: composed of the log, stream, payload and room pieces over one connection, and hydration and
#: watching sit above it as free functions (``hydrate(ledger, room)``, ``watch(ledger, room)``):
#: they name ``Ledger`` in their types, and ``Ledger`` names neither.
KNOWN_CIRCLES: list[list[str]] = []


def test_no_import_cycles_counting_type_checking_imports() -> None:
    full = {m: sorted({t for t in _all_imports(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py")
                       if t in MODULES and _top(t) in LAYERS and t != m})
            for m, p in MODULES.items() if _top(m) in LAYERS}
    reach: dict[str, set[str]] = {}

    def reachable(start: str) -> set[str]:
        if start not in reach:
            seen: set[str] = set()
            todo = [start]
            while todo:
                for nxt in full.get(todo.pop(), []):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            reach[start] = seen
        return reach[start]

    circles = sorted({tuple(sorted({m} | {n for n in reachable(m) if m in reachable(n)}))
                      for m in full if m in reachable(m)})
    assert [list(c) for c in circles] == KNOWN_CIRCLES


@pytest.mark.parametrize(("package", "forbidden"), [("core", ("aiohttp", "typer"))])
def test_the_core_imports_no_web_server_and_no_command_line(package: str, forbidden: tuple[str, ...]) -> None:
    found = [f"{MODULES[m].relative_to(ROOT)} imports {t}"
             for m, p in MODULES.items() if _top(m) == package
             for t in _all_imports(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py")
             if _top(t) in forbidden]
    assert found == []


def test_services_never_import_each_other() -> None:
    """The services (bridge: ingest; projections; web: what is served over HTTP) use the core,
    never each other (checked with TYPE_CHECKING imports too)."""
    wings = ("bridge", "projections", "web")
    found = [f"{MODULES[m].relative_to(ROOT)} imports {t}"
             for m, p in MODULES.items() if _top(m) in wings
             for t in _all_imports(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py")
             if _top(t) in wings and _top(t) != _top(m)]
    assert found == []


def test_the_log_client_loads_nothing_of_the_agent_side() -> None:
    """Importing the log client (what a projector, the bridge and every command load) loads neither
    the agent helpers nor LiveKit: in a fresh interpreter, to see what an import really pulls in."""
    import subprocess
    import sys

    code = ("import sys, room_ledger.client; print(','.join(m for m in ('room_ledger.agents', "
            "'room_ledger.handoff', 'room_ledger.turns', 'livekit', 'livekit.agents') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_no_product_file_is_over_800_lines() -> None:
    """A module a newcomer can read: past 800 lines a file holds more than one idea."""
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / "room_ledger").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 800}
    assert long == {}
