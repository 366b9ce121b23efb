"""Data sources: what a spec's `data:` entry names, and reading its rows.

A source is a typed `DataSource` (from the spec) whose `path` is one of:
- `builtin:<name>` — an entry of `llmlab.data.builtin.BUILTIN_SOURCES` (e.g. `builtin:stdlib`, or a
  task generator with train/validation/test splits such as `builtin:tasks`);
- a local file — `.txt` (one document per blank-line-separated paragraph), `.jsonl` / `.json` (one
  JSON object per line, or a JSON array of objects), `.parquet`, `.csv`;
- a local folder — every supported file in it (recursively, sorted, hidden files skipped);
- anything else — a hub dataset, `datasets.load_dataset(path, subset, split=..., streaming=True)`.

    rows = open_rows(source)                   # (where, row) pairs; None when the split does not exist
    for where, row in rows: ...                # where = "data/train.jsonl line 12"; row = dict or BadRow
    list(iter_rows("data/train.jsonl"))        # plain dicts (a bad line raises, naming it)

A row that cannot even be parsed (a line that is not JSON, a value that is not an object) comes back
as a `BadRow` with its location, so the reader (`llmlab.data.reader`) can count it, report it and go
on. A file that is not UTF-8, a missing path or an unloadable hub dataset raise `DataSourceError`
naming the path and the fix. `datasets` is imported only for parquet/csv files and hub datasets.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from llmlab.data.builtin import BUILTIN_SOURCES, environment_fingerprint
from llmlab.data.tasks import SPLITS as TASK_SPLITS
from llmlab.data.tasks import TASK_SOURCES
from llmlab.errors import UserError
from llmlab.paths import cache_dir
from llmlab.spec.base import Loc, StrictModel

BUILTIN_PREFIX = "builtin:"
# File extension -> `datasets` builder name, for the formats we do not parse ourselves.
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
SUPPORTED_SUFFIXES = frozenset({".txt", ".jsonl", ".json", *DATASETS_BUILDERS})


class DataSourceError(UserError):
    """A data source cannot be read as asked; the message names it and says what to do."""


class SourceMissing(DataSourceError, FileNotFoundError):
    """A local data path that does not exist or holds no data files."""


class DataSource(StrictModel):
    """One data source of a stage; several interleave by relative weight."""

    path: str = Field(description="builtin:<name>, a local file or folder, or a hub dataset name")
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="which split to read (hub datasets and built-in task generators)")
    weight: float = Field(1.0, gt=0, description="relative share of examples drawn from this source")
    column: str = Field("text", description="the text column of plain-text data (pretraining, tokenizer)")
    format: str | None = Field(None, description="row format of SFT / preference / prompt data; None = detect from the "
                                                 "columns")
    max_bad_share: float = Field(0.05, ge=0, le=1, description="share of malformed rows skipped (and reported) before "
                                                               "the source fails")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.path.startswith(BUILTIN_PREFIX):
            name = self.path[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_SOURCES:
                near = difflib.get_close_matches(name, list(BUILTIN_SOURCES), n=1)
                hint = f"did you mean '{BUILTIN_PREFIX}{near[0]}'? " if near else ""
                yield ("path",), (f"unknown built-in source '{name}': {hint}available: "
                                  f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_SOURCES)}")
        elif self.path.startswith(("/", "./", "../", "~")) and not Path(self.path).expanduser().exists():
            yield ("path",), f"no such file or folder: {self.path} (paths are relative to the folder you run llmlab from)"

    @property
    def is_local(self) -> bool:
        return is_local(self.path)


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed at all (the reader counts and reports it)."""

    error: str


Located = tuple[str, "dict | BadRow"]  # (where the row is, the row)


def is_local(path: str) -> bool:
    """Whether a source path names a local file or folder (rather than a hub dataset)."""
    p = Path(path).expanduser()
    return (p.exists() or p.suffix.lower() in SUPPORTED_SUFFIXES
            or path.startswith(("/", "./", "../", "~", ".")) or path.count("/") > 1)


def local_files(path: str | Path) -> list[Path]:
    """The supported files a local source stands for (the file itself, or a folder's, sorted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceMissing(f"data source {str(path)!r} does not exist (paths are relative to the folder you run "
                                f"llmlab from)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise SourceMissing(f"data folder {str(path)!r} has no supported files "
                                    f"({', '.join(sorted(SUPPORTED_SUFFIXES))})")
        return files
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataSourceError(f"data file {str(path)!r} has an unsupported extension; supported: "
                              f"{', '.join(sorted(SUPPORTED_SUFFIXES))}")
    return [p]


# ----------------------------------------------------------------------------------- local files


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file; a file that is not UTF-8 fails with its name."""
    try:
        with path.open(encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): save it as UTF-8") from None


def _read_txt(path: Path) -> Iterator[Located]:
    """One row {"text": paragraph} per blank-line-separated paragraph: a line is rarely a document."""
    lines: list[str] = []
    first = 0
    for number, line in _text_lines(path):
        if line.strip():
            if not lines:
                first = number
            lines.append(line.rstrip("\n"))
        elif lines:
            yield f"{path} line {first}", {"text": "\n".join(lines).strip()}
            lines = []
    if lines:
        yield f"{path} line {first}", {"text": "\n".join(lines).strip()}


def _parsed(value: object) -> dict | BadRow:
    return value if isinstance(value, dict) else BadRow(f"a JSON {type(value).__name__}, not an object of columns")


def _read_json(path: Path) -> Iterator[Located]:
    """JSON lines (one object per line), or one JSON array of objects (a `.json` file)."""
    if path.suffix.lower() == ".json":
        with path.open("rb") as f:
            head = f.read(64).lstrip()
        if head.startswith(b"["):
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataSourceError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): save it as UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix it, or write one "
                                      f"object per line (JSON lines)") from None
            for i, item in enumerate(items):
                yield f"{path} item {i}", _parsed(item)
            return
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path} line {number}", _parsed(json.loads(line))
        except json.JSONDecodeError as e:
            yield f"{path} line {number}", BadRow(f"not valid JSON ({e.msg} at column {e.colno})")


def _read_with_datasets(path: Path) -> Iterator[Located]:
    import datasets  # deferred: a heavy import only parquet/csv files need

    # A cache folder of our own keeps `datasets`' lock and Arrow files for local files out of the
    # user's Hugging Face cache.
    try:
        ds = datasets.load_dataset(DATASETS_BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                   streaming=True, cache_dir=str(cache_dir("hf-datasets")))
        for i, row in enumerate(ds):
            yield f"{path} row {i + 1}", row
    except Exception as e:  # datasets raises many types for a broken file (ArrowInvalid, ValueError, ...)
        if isinstance(e, DataSourceError):
            raise
        raise DataSourceError(f"{path} cannot be read as {path.suffix.lower()[1:]}: {type(e).__name__}: {e}") from e


def _read_file(path: Path) -> Iterator[Located]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    return _read_with_datasets(path)


# ------------------------------------------------------------------------------------- opening


def _hub_rows(source: DataSource, split: str) -> Iterator[Located]:
    import datasets  # deferred: heavy, and only hub datasets need it

    try:
        ds = datasets.load_dataset(source.path, source.subset, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise DataSourceError(
            f"could not load dataset {source.path!r} (subset={source.subset!r}, split={split!r}) from the Hugging "
            f"Face hub; no local file or folder has that name. If you are offline, HF_DATASETS_OFFLINE may be set "
            f"and only cached datasets load. Cause: {type(e).__name__}: {e}") from e
    return ((f"{source.path} ({split}) row {i + 1}", row) for i, row in enumerate(ds))


def has_own_split(source: DataSource, split: str) -> bool:
    """Whether the source itself has `split` (task generators: train/validation/test; hub datasets:
    what they publish). Local files and text corpora are one split only."""
    if source.path.startswith(BUILTIN_PREFIX):
        return source.path[len(BUILTIN_PREFIX):] in TASK_SOURCES and split in TASK_SPLITS
    if source.is_local:
        return False
    try:
        _hub_rows(source, split)
    except DataSourceError:
        return False
    return True


def open_rows(source: DataSource, split: str | None = None) -> Iterator[Located]:
    """(where, row) pairs of one split of a source (default: its `split`). Local files and text
    corpora are one split: they are read whatever the split. Path problems raise here, not at the
    first `next()`."""
    split = split or source.split
    if source.path.startswith(BUILTIN_PREFIX):
        name = source.path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SOURCES:
            raise DataSourceError(f"unknown built-in source {source.path!r}; known: "
                                  f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_SOURCES))}")
        return ((f"{source.path} ({split}) row {i + 1}", row) for i, row in enumerate(BUILTIN_SOURCES[name](split)))
    if source.is_local:
        files = local_files(source.path)
        return (located for f in files for located in _read_file(f))
    return _hub_rows(source, split)


def iter_rows(path: str, subset: str | None = None, split: str = "train") -> Iterator[dict]:
    """Plain row dicts of a source (a convenience for scripts and tests; stages read through
    `llmlab.data.reader`, which counts and skips bad rows instead). A bad row raises, naming it;
    path problems raise at the call, not at the first `next()`."""
    rows = open_rows(DataSource(path=path, subset=subset, split=split))

    def plain() -> Iterator[dict]:
        for where, row in rows:
            if isinstance(row, BadRow):
                raise DataSourceError(f"{where}: {row.error}")
            yield row

    return plain()


def iter_texts(path: str, subset: str | None = None, split: str = "train", column: str = "text") -> Iterator[str]:
    """The `column` of every row of a source, as strings; empty and null values are skipped."""
    for row in iter_rows(path, subset, split):
        if column not in row:
            raise DataSourceError(f"data source {path!r} has no column {column!r}; its rows have: {', '.join(map(str, row))}")
        value = row[column]
        if value is not None and str(value):
            yield value if isinstance(value, str) else str(value)


def source_fingerprint(path: str) -> str:
    """A short hash that changes when a source's content may have changed: file sizes and
    modification times for local sources, the Python environment for built-in ones, the name for
    hub datasets (their revision cannot be checked offline)."""
    if path.startswith(BUILTIN_PREFIX):
        state: object = [path, environment_fingerprint()]
    elif is_local(path):
        state = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in local_files(path)]
    else:
        state = ["hub", path]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]
