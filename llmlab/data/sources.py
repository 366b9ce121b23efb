"""Reading data sources: built-in corpora, local files and folders, Hugging Face hub datasets.

A source is named by one string:
- `builtin:<name>` — an entry of `llmlab.data.builtin.BUILTIN_SOURCES` (e.g. `builtin:stdlib`);
- a local file — `.txt` (one document per blank-line-separated paragraph), `.jsonl`/`.json`,
  `.parquet`, `.csv` (read with `datasets`' builders);
- a local folder — every supported file in it (recursively), in sorted path order;
- anything else — a hub dataset, `datasets.load_dataset(path, subset, split=..., streaming=...)`.

Usage:
    from llmlab.data.sources import iter_rows, iter_texts, interleave
    for row in iter_rows("data/train.jsonl"): ...
    texts = iter_texts("builtin:stdlib", column="text")
    for source_index, text in interleave([(texts_a, 1.0), (texts_b, 3.0)], seed=0): ...

Path errors (missing file, unknown builtin, hub dataset that cannot be loaded) are raised when
`iter_rows`/`iter_texts` is called, not at the first `next()`. `datasets` is imported only when a
file other than `.txt`, or a hub dataset, is read.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from llmlab.data.builtin import BUILTIN_SOURCES, environment_fingerprint
from llmlab.paths import cache_dir

BUILTIN_PREFIX = "builtin:"
# File extension -> `datasets` builder name; ".txt" is read by `_iter_txt` instead.
DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED_SUFFIXES = frozenset({".txt", *DATASETS_BUILDERS})


class DataSourceError(ValueError):
    """A data source could not be read (unloadable hub dataset, missing column, ...)."""


def _is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return (p.exists() or p.suffix.lower() in SUPPORTED_SUFFIXES
            or path.startswith(("/", "./", "../", "~", ".")) or path.count("/") > 1)


def _iter_txt(path: Path) -> Iterator[dict]:
    """One row per paragraph: `datasets`' text builder would give one row per line, but a line is
    rarely a whole document."""
    lines: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield {"text": "\n".join(lines).strip()}
                lines = []
    if lines:
        yield {"text": "\n".join(lines).strip()}


def _iter_file(path: Path, streaming: bool) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _iter_txt(path)
        return
    import datasets

    # A cache folder of our own keeps `datasets`' lock and Arrow files for local files out of the
    # user's Hugging Face cache.
    ds = datasets.load_dataset(DATASETS_BUILDERS[suffix], data_files=str(path), split="train",
                               streaming=streaming, cache_dir=str(cache_dir("hf-datasets")))
    yield from ds


def local_files(path: str | Path) -> list[Path]:
    """The supported files a local source stands for (the file itself, or a folder's, sorted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise FileNotFoundError(f"data folder {str(path)!r} has no supported files "
                                    f"({', '.join(sorted(SUPPORTED_SUFFIXES))})")
        return files
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"data file {str(path)!r} has an unsupported extension; supported: "
                         f"{', '.join(sorted(SUPPORTED_SUFFIXES))}")
    return [p]


def iter_rows(path: str, subset: str | None = None, split: str = "train",
              streaming: bool = True) -> Iterator[dict]:
    """Rows (dicts) of a data source; see the module docstring for what `path` may name.

    `subset` and `split` apply to hub datasets only (a local source is all one split)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in source {path!r}; known: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_SOURCES))}")
        return BUILTIN_SOURCES[name](split)
    if _is_local(path):
        files = local_files(path)
        return chain.from_iterable(_iter_file(f, streaming) for f in files)
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataSourceError(
            f"could not load dataset {path!r} (subset={subset!r}, split={split!r}) from the Hugging "
            f"Face hub; no local file or folder has that name. If you are offline, "
            f"HF_DATASETS_OFFLINE may be set and only cached datasets load. Cause: "
            f"{type(e).__name__}: {e}") from e
    return iter(ds)


def iter_texts(path: str, subset: str | None = None, split: str = "train",
               column: str = "text") -> Iterator[str]:
    """The `column` of every row of a source, as strings; empty and null values are skipped."""
    rows = iter_rows(path, subset, split)
    return _texts_of(rows, path, column)


def _texts_of(rows: Iterator[dict], path: str, column: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise DataSourceError(f"data source {path!r} has no column {column!r}; "
                                  f"its rows have: {', '.join(map(str, row))}")
        value = row[column]
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        if text:
            yield text


def source_fingerprint(path: str) -> str:
    """A short hash that changes when a source's content may have changed: file sizes and
    modification times for local sources, the Python environment for built-in ones, the name for
    hub datasets (their revision cannot be checked offline)."""
    if path.startswith(BUILTIN_PREFIX):
        state: object = [path, environment_fingerprint()]
    elif _is_local(path):
        state = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in local_files(path)]
    else:
        state = ["hub", path]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]


def interleave(sources: list[tuple[Iterator[str], float]], seed: int) -> Iterator[tuple[int, str]]:
    """Mix documents from several sources: each next document comes from source i with probability
    w_i / sum(w) (weights are relative), drawn with `random.Random(seed)`. A source that runs out
    is dropped and the others' weights renormalised. Yields (index of the source in `sources`,
    text); a source of weight 0 is never read."""
    for i, (_, weight) in enumerate(sources):
        if not weight >= 0:
            raise ValueError(f"source {i} has weight {weight}; weights must be >= 0")
    rng = random.Random(seed)
    live = [(i, iter(it), float(w)) for i, (it, w) in enumerate(sources) if w > 0]
    while live:
        total = sum(w for _, _, w in live)
        r = rng.random() * total
        pick = len(live) - 1  # floating-point slack lands on the last source
        acc = 0.0
        for k, (_, _, w) in enumerate(live):
            acc += w
            if r < acc:
                pick = k
                break
        index, it, _ = live[pick]
        try:
            text = next(it)
        except StopIteration:
            del live[pick]
            continue
        yield index, text
