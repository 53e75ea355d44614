"""The package's import rules, read from the source with `ast`: no cycles, no import up a layer.

Every import counts, also one inside a function (a lazy import) or under TYPE_CHECKING: a
cycle hidden in a function is still a cycle in the design. docs/architecture.md draws the same
layers; a new room must be placed in LAYERS and there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vittune"

# Lowest first. A module may import from its own room and from rooms of lower layers only;
# rooms on one layer do not import each other.
LAYERS: list[set[str]] = [
    {"errors"},  # the root modules every layer may use: user-facing errors,
    {"files", "netprobe"},  # atomic writes and fresh folders, the bounded network probe
    {"recipe"},
    {"data", "models"},
    {"evaluation", "optim"},
    {"tasks"},
    {"inference"},
    {"deploy"},
    {"training"},
    {"search"},
    {"cli"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
MAX_ROOT_MODULES = 5  # __init__, cli, errors and what every layer uses


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path, modules: set[str]) -> set[str]:
    """The package's own modules that `path` imports anywhere in its body."""
    name = module_name(path, package)
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c` imports module a.b.c when there is one, else names of a.b
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` reaches the deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    modules = {module_name(f, package) for f in files}
    return {module_name(f, package): imports_of(f, package, modules) for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in sorted(graph.items()):
        here = room(source)
        for target in sorted(targets):
            there = room(target)
            if here == there or here == "__init__":
                continue
            if here not in RANK or there not in RANK:
                found.append(f"{source} -> {target}: room not in LAYERS")
            elif RANK[there] >= RANK[here]:
                found.append(f"{source} -> {target}: {here} may not import {there}")
    return found


def test_package_has_no_import_cycles() -> None:
    assert find_cycles(import_graph(PACKAGE)) == []


def test_imports_only_go_down_the_layers() -> None:
    assert layer_violations(import_graph(PACKAGE)) == []


def test_root_holds_few_modules_and_every_room_is_placed() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    rooms = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
    }
    assert rooms - {"__init__"} <= set(RANK), rooms - set(RANK)
    architecture = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert [r for r in sorted(rooms - {"__init__"}) if f"`{r}" not in architecture] == []


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small package with a lazy cycle (data.a <-> data.b) and an upward import (models -> tasks)."""
    package = tmp_path / "vittune"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from vittune.data import b  # noqa\n",
        "data/b.py": "from .a import f\n",
        "models/__init__.py": "",
        "models/m.py": "from vittune.tasks.t import run\nfrom vittune.errors import x\n",
        "tasks/__init__.py": "",
        "tasks/t.py": "import vittune.models.m\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_checker_finds_a_planted_lazy_cycle_and_an_upward_import(planted: Path) -> None:
    graph = import_graph(planted)
    assert graph["vittune.data.b"] == {"vittune.data.a"}
    assert find_cycles(graph) == [
        ["vittune.data.a", "vittune.data.b"],
        ["vittune.models.m", "vittune.tasks.t"],
    ]
    assert layer_violations(graph) == [
        "vittune.models.m -> vittune.tasks.t: models may not import tasks"
    ]
