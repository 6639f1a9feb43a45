"""The package's imports run one way: no cycles, no borrowed private names, layers point down.

Every ``import`` and ``from ... import`` anywhere in a module counts -- at module level, inside a
function ("imported here because X imports this module"), or under ``if TYPE_CHECKING:`` -- because
each of them says the two modules need each other, whichever runs first.  The layers and their allowed
arrows are described in docs/design.md; :data:`ALLOWED` is that table.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import cowbackup

PACKAGE_DIR = Path(cowbackup.__file__).parent
ROOT = "cowbackup"

#: The modules of nbd/ that serve block nodes over NBD (the server's asyncio shell): they import block.
#: The rest of nbd/ -- the sans-I/O protocol cores, the client, URIs, TLS -- imports nothing of ours
#: outside nbd/, which is what lets the block layer's ``nbd`` driver be a client of ours.
NBD_SERVING = frozenset({"handlers", "contexts", "transmission", "connection", "listener"})

#: Helpers that import nothing of ours; anyone may use them (``cowbackup`` itself holds ``__version__``).
_BASE = frozenset({"eager", "ids", "cowbackup"})

#: layer -> the other layers it may import (docs/design.md draws the same table).  A module's layer is
#: its first package under ``cowbackup`` (``cowbackup.block.copy`` is in ``block``), except that nbd/ is
#: two layers (see :data:`NBD_SERVING`); the top-level modules are their own layers.
ALLOWED: dict[str, frozenset[str]] = {
    "eager": frozenset(),
    "ids": frozenset(),
    "nbd": _BASE,
    "block": _BASE | {"nbd"},
    "jobs": _BASE | {"block"},
    "nbd-serving": _BASE | {"nbd", "block"},
    "repo": _BASE | {"block"},
    "daemon": _BASE | {"nbd", "block", "jobs", "nbd-serving", "repo"},
    "qmp": _BASE | {"nbd", "block", "jobs", "nbd-serving", "repo", "daemon"},
    "cli": _BASE | {"nbd", "block", "jobs", "nbd-serving", "repo", "daemon", "qmp"},
    "__main__": frozenset({"cli"}),
    "cowbackup": frozenset(),
}


def module_name(path: Path) -> str:
    """``.../cowbackup/block/node.py`` -> ``cowbackup.block.node`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imported_names(name: str, modules: dict[str, Path]) -> Iterator[tuple[str, str | None, int]]:
    """Yield ``(module, name_or_None, line)`` for every import of ours anywhere in module *name*.

    ``from a.b import c`` yields ``(a.b.c, None)`` when ``c`` is a module, else ``(a.b, "c")``.
    """
    path = modules[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == ROOT:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    yield submodule, None, node.lineno
                else:
                    yield source, alias.name, node.lineno


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in its text)."""
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name in modules:
        for target, _, _ in imported_names(name, modules):
            if target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "nbd" and parts[2] in NBD_SERVING:
        return "nbd-serving"
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_walk_sees_the_package() -> None:
    graph = import_graph()
    assert "cowbackup.block.node" in graph
    assert "cowbackup.block.errors" in graph["cowbackup.block.node"]
    # A function-local import counts: the one-shot backup imports the file driver where it creates one.
    assert "cowbackup.block.drivers.file" in graph["cowbackup.cli.targets"]


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_names_from_other_modules() -> None:
    """Nobody imports another module's ``_name``; a ``_module`` only from inside its own package."""
    modules = all_modules()
    offences = []
    for name in modules:
        for target, imported, line in imported_names(name, modules):
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                offences.append(f"{name}:{line} imports {imported} from {target}")
            parts = target.split(".")
            for depth, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:depth])
                    if not (name == owner or name.startswith(owner + ".")):
                        offences.append(f"{name}:{line} imports the private module {target}")
    assert offences == [], "\n".join(offences)


def test_layers_point_down() -> None:
    offences = []
    for name, targets in import_graph().items():
        allowed = ALLOWED.get(layer(name))
        assert allowed is not None, f"{name}: its layer {layer(name)} is not in ALLOWED (docs/design.md)"
        offences += [
            f"{name} ({layer(name)}) imports {t} ({layer(t)})"
            for t in sorted(targets)
            if layer(t) != layer(name) and layer(t) not in allowed
        ]
    assert offences == [], "imports against the layers:\n" + "\n".join(offences)


def test_the_layer_table_has_no_cycles() -> None:
    """The allowed arrows themselves run one way: no two layers may import each other."""
    assert cycles({name: set(allowed) for name, allowed in ALLOWED.items()}) == []


if __name__ == "__main__":  # a map for the one reading: python tests/unit/test_import_layers.py
    for component in cycles(import_graph()):
        print("cycle:", " <-> ".join(component))
