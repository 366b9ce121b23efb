"""The version of the code a stage runs: part of its cache key, so finished stages are reused until
code that could change their result changes, and only then.

    code_version("dpo")          # 12 hex digits for the code a dpo stage runs

A stage runs the orchestration (`flows/`, `tasks/`), the stage executor (`llmlab.execute`), its
kind's runner module and everything those import, however deep, inside functions too — but not
other kinds' runner modules (the registry lists them all; a pretrain stage never runs the dpo
runner), and not what no stage imports (the CLI, the wizard). Each module counts by its syntax
tree with docstrings dropped, so editing a comment or a docstring changes nothing, while editing a
line of code a stage runs gives its kind a new version.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds the llmlab, flows and tasks packages
PACKAGES = ("llmlab", "flows", "tasks")
RUNNERS = "llmlab.runners."  # a kind's runner module is llmlab.runners.<kind>


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> source file, for every module of the three packages under `root`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The project modules a module imports anywhere in its body (`a.b.c` imports `a.b` when c is a name)."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def _defines_kind(tree: ast.Module) -> bool:
    """A runner module: it assigns its kind's record, `KIND`, at the top level."""
    return any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KIND" for t in node.targets)
               for node in tree.body)


PARSED_CACHE = "code-parsed.json"  # under the state dir's cache: what each source file parsed to, by its mtime and size


@functools.lru_cache(maxsize=None)
def _parsed(root: Path) -> dict[str, tuple[str, set[str], bool]]:
    """Module -> (hash of its code without docstrings, the project modules it imports, whether it is
    a kind's runner module). A file parses again only when its modification time or size changed,
    or the set of modules did (parsing every file takes a noticeable part of a second)."""
    import json

    from llmlab.checkpoint import atomic_write_json
    from llmlab.paths import state_dir

    known = _modules(root)
    modules_key = hashlib.sha256("\n".join(known).encode()).hexdigest()[:16]
    cache = state_dir(create=False) / "cache" / PARSED_CACHE
    try:
        kept = json.loads(cache.read_text())
    except (OSError, ValueError):
        kept = {}
    out, fresh = {}, {}
    for module, path in known.items():
        stat = path.stat()
        key = f"{stat.st_mtime_ns}-{stat.st_size}-{modules_key}"
        entry = kept.get(str(path))
        if entry is None or entry["key"] != key:
            tree = _without_docstrings(ast.parse(path.read_text(), str(path)))
            entry = {"key": key, "digest": hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest(),
                     "imports": sorted(_imports(tree, module, path.name == "__init__.py", known)),
                     "kind": _defines_kind(tree)}
        fresh[str(path)] = entry
        out[module] = (entry["digest"], set(entry["imports"]), entry["kind"])
    if fresh != {k: v for k, v in kept.items() if k in fresh} or len(fresh) != len(kept):
        try:
            atomic_write_json(cache, fresh)
        except OSError:  # a read-only state dir: parse again next time
            pass
    return out


def stage_code(kind: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The modules a stage of `kind` runs, sorted: see the module docstring."""
    parsed = _parsed(root)
    own = f"{RUNNERS}{kind}"
    others = {m for m, (_, _, is_kind) in parsed.items() if is_kind and m != own}
    todo = [m for m in parsed if m.split(".")[0] in ("flows", "tasks")] + ["llmlab.execute", own]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in parsed:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a package's __init__ runs first
        todo += [m for m in parsed[module][1] if m not in others]
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_version(kind: str, root: Path = PROJECT_ROOT) -> str:
    """A hash of the code a stage of `kind` runs (docstrings and comments excluded)."""
    parsed = _parsed(root)
    h = hashlib.sha256()
    for module in stage_code(kind, root):
        h.update(module.encode())
        h.update(parsed[module][0].encode())
    return h.hexdigest()[:12]


def clear() -> None:
    """Forget parsed sources (after files changed in this process)."""
    _parsed.cache_clear()
    code_version.cache_clear()
