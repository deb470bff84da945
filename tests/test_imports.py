"""The package's import graph has no cycle, and importing a module never fills a registry elsewhere."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "easylm_align"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (at any level of the file: a function-level import is
    still an edge), resolved to module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = _module_name(path).split(".")
                package = package[:len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `from a.b import c`: c may be a function
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = _imports(path, modules) - {name} - parents  # importing a package runs its __init__
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "easylm_align.train" in graph and "easylm_align.model" in graph["easylm_align.train"]
    assert find_cycle(graph) == []


def entry_points() -> set[str]:
    """The command-line programs: modules run with `python -m` (a `__main__` guard or `__main__.py`)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name for name, path in files.items()
            if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")}


def test_no_library_module_imports_a_command_line_program():
    graph, programs = import_graph(), entry_points()
    assert {"easylm_align.train", "easylm_align.convert_to_hf", "easylm_align.evaluate"} <= programs
    offenders = {name: sorted(graph[name] & programs) for name in graph if name not in programs and graph[name] & programs}
    assert offenders == {}
