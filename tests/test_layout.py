"""The house rules of the code layout: no import cycle between modules, and the layers only look down
(launch -> eval / teacher_serving -> distil). Read from the source with ast, function-level imports
included; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("distil", "teacher_serving", "eval", "launch")
# what each package may import from the project (itself always)
ALLOWED = {"distil": set(), "teacher_serving": {"distil"}, "eval": {"distil"},
           "launch": {"distil", "teacher_serving", "eval"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (an imported name that is a module counts as that module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {name: project_imports(path, set(files)) - {name} for name, path in files.items()}
    for name in graph:  # importing another package's module runs that package's __init__ first
        own = name.split(".")[0]
        graph[name] |= {m.split(".")[0] for m in graph[name] if m.split(".")[0] != own and m.split(".")[0] in files}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None


def test_layers_only_import_downwards():
    wrong = sorted(f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert not wrong
