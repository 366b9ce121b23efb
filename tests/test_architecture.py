"""The layering rules of docs/architecture.md, read from the source: imports point one way.

Every `import` statement counts, including those inside functions (a deferred import still couples
two modules, and a cycle through one is a design error all the same). Runner registrations are
plain imports too, so nothing hides an edge from this test.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for f in (ROOT / package).rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module `name` starts with (`a.b.c` imports `a.b` when c is a symbol)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(packages=("llmlab", "tasks", "flows")) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    known = {m: f for p in packages for m, f in _modules(p).items()}
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {r for r in (_resolve(n, known) for n in names) if r and r != module}
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_counts_imports_inside_functions(tmp_path):
    graph = import_graph()
    # llmlab.cli starts a flow from inside its `run` command
    assert "flows.pipeline" in graph["llmlab.cli"]


def test_no_import_cycle_among_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_llmlab_never_imports_prefect_except_the_cli_starting_a_flow():
    for module, path in _modules("llmlab").items():
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name == "prefect" or name.startswith("prefect.") for name in imported), module
    graph = import_graph()
    reaching_flows = {m for m, deps in graph.items() if m.startswith("llmlab") and deps & {"flows.pipeline", "tasks.stage_tasks"}}
    assert reaching_flows == {"llmlab.cli"}


def test_layers_point_one_way():
    """cli -> flows/tasks -> stages/runners -> train/data/generate -> model/optim/checkpoint."""
    graph = import_graph()
    lower = {"llmlab.model", "llmlab.optim", "llmlab.checkpoint", "llmlab.parallel"}
    for module, deps in graph.items():
        if any(module == m or module.startswith(m + ".") for m in lower):
            upward = {d for d in deps if d.startswith(("llmlab.runners", "llmlab.execute", "llmlab.train",
                                                         "llmlab.launch", "llmlab.data", "tasks", "flows"))}
            assert not upward, f"{module} imports the layer above it: {sorted(upward)}"
    for module, deps in graph.items():
        if module.startswith(("llmlab.train", "llmlab.data", "llmlab.generate")):
            upward = {d for d in deps if d.startswith(("llmlab.runners", "llmlab.execute", "llmlab.launch", "tasks", "flows"))}
            assert not upward, f"{module} imports the layer above it: {sorted(upward)}"
    flows_deps = graph["flows.pipeline"]
    assert all(d.startswith(("tasks", "llmlab.spec", "llmlab.paths", "llmlab.serve", "llmlab.plan", "llmlab.selection"))
               for d in flows_deps), sorted(flows_deps)
