"""Built-in text sources: English text that exists wherever llmlab is installed.

No third-party text is shipped with llmlab; instead the docstrings of the Python that runs it are
extracted at run time (each carries its own package's licence):

- `builtin:stdlib` — docstrings of the standard library's modules, classes and functions plus the
  text of `pydoc_data.topics` (the language reference snippets behind `help()`).
- `builtin:pydocs` — the stdlib documents followed by the docstrings of every installed package in
  site-packages (torch, transformers, numpy, ...).

Docstrings are read with `ast` — nothing is imported, so no module's import-time side effects run.
Files are visited in sorted path order, so the document order is deterministic. One row
(`{"text": ...}`) per docstring; docstrings shorter than `MIN_DOC_CHARS` are skipped.

Measured on the 2-core dev machine (Python 3.11, the project venv):
- stdlib: ~6,500 documents, ~2.1 MB of text, ~1.8 s to extract on the first call.
- pydocs: ~123,000 documents, ~59 MB (torch, transformers, sympy, pandas, mlflow, ...), ~46 s to
  extract on the first call.
Later calls stream the JSONL cache (`cache_dir("builtin")`, keyed by the Python version and the
installed distributions): ~0.1 s for stdlib, ~0.35 s for pydocs.

Usage:
    from llmlab.data.builtin import BUILTIN_SOURCES
    for row in BUILTIN_SOURCES["stdlib"]():
        print(row["text"])

`BUILTIN_SOURCES` maps a name to a zero-argument callable returning an iterator of row dicts; other
modules (e.g. task generators) add their own entries to it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from llmlab.data.tasks import TASK_SOURCES
from llmlab.paths import cache_dir

MIN_DOC_CHARS = 40
# Files this big are generated tables (e.g. unicode data), not prose; parsing them costs seconds.
MAX_FILE_BYTES = 2_000_000
# Folders whose docstrings are test scaffolding or tooling, not library documentation.
SKIP_DIR_NAMES = frozenset({
    "__pycache__", "site-packages", "dist-packages", "test", "tests", "testing", "idle_test",
    "idlelib", "lib2to3", "turtledemo", "ensurepip", "_vendor", "vendored",
})
# Bumped when the extraction rules change, so old caches are not reused.
EXTRACTION_VERSION = "1"


@functools.lru_cache(maxsize=1)
def environment_fingerprint() -> str:
    """A short hash of the Python version and the installed distributions (names and versions).
    Computed once per process (~0.3 s: it reads every distribution's metadata)."""
    from importlib import metadata

    dists = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
        if d.metadata['Name']
    )
    payload = json.dumps([EXTRACTION_VERSION, sys.version, sys.base_prefix, dists])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _walk_py_files(root: Path) -> list[Path]:
    """Sorted .py files under `root`, pruning the folders in SKIP_DIR_NAMES."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIR_NAMES and not d.startswith(".")
                       and not d.startswith("config-")]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def docstrings_of_file(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order; [] if unreadable."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old files trigger SyntaxWarning (invalid escapes) that would flood the console.
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.strip()) >= MIN_DOC_CHARS:
                docs.append(doc.strip())
    return docs


def _pydoc_topics() -> list[str]:
    """The texts of `pydoc_data.topics` (a plain data module, safe to import), by sorted key."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[key].strip() for key in sorted(topics) if len(topics[key].strip()) >= MIN_DOC_CHARS]


def _stdlib_texts() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk_py_files(stdlib):
        yield from docstrings_of_file(path)
    yield from _pydoc_topics()


def _site_packages_texts() -> Iterator[str]:
    purelib = Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not purelib.is_dir() or purelib == stdlib:
        return
    # Walk site-packages itself (its name is in SKIP_DIR_NAMES only to keep stdlib walks out of it).
    for entry in sorted(purelib.iterdir()):
        if entry.is_dir() and entry.name not in SKIP_DIR_NAMES and not entry.name.startswith("."):
            for path in _walk_py_files(entry):
                yield from docstrings_of_file(path)
        elif entry.suffix == ".py":
            yield from docstrings_of_file(entry)


def _pydocs_texts() -> Iterator[str]:
    yield from _stdlib_texts()
    yield from _site_packages_texts()


def _write_jsonl_atomically(path: Path, texts: Iterator[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False))
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extracted(name: str) -> bool:
    """Whether a docstring corpus (`stdlib`, `pydocs`) was extracted into the cache already, for
    this Python (any environment: a quick look, for time estimates)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return any(cache_dir("builtin").glob(f"{name}-{version}-*.jsonl"))


def cached_rows(name: str, extract: Callable[[], Iterator[str]]) -> Iterator[dict]:
    """Rows of a docstring corpus: extracted once into a JSONL cache, then streamed from it."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = cache_dir("builtin") / f"{name}-{version}-{environment_fingerprint()}.jsonl"
    if not path.exists():
        _write_jsonl_atomically(path, extract())
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def stdlib_rows(split: str = "train") -> Iterator[dict]:
    """`builtin:stdlib`: standard-library docstrings and pydoc topics, one row per document. Text
    sources have one split; held-out documents are carved out by hash downstream."""
    return cached_rows("stdlib", _stdlib_texts)


def pydocs_rows(split: str = "train") -> Iterator[dict]:
    """`builtin:pydocs`: the stdlib documents followed by the installed packages' docstrings."""
    return cached_rows("pydocs", _pydocs_texts)


BUILTIN_SOURCES: dict[str, Callable[[str], Iterator[dict]]] = {  # name -> fn(split) -> rows
    "stdlib": stdlib_rows,
    "pydocs": pydocs_rows,
    **TASK_SOURCES,  # tasks, tasks-preference, tasks-prompts, tasks-<task>: train/validation/test
}
