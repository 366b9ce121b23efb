"""The one reader every data kind goes through: open a source, detect its format, convert each row,
hold out a validation share by hash, encode, cap, and merge several sources by weight.

    examples = read(sources, SFT, encode, seed=1, val_fraction=0.05, max_train=5000)
    examples.train, examples.val, examples.reports      # what each source gave, skipped and dropped
    for index, held_out, text in stream(sources, TEXT, seed=1, val_fraction=0.01): ...   # pretraining

A data *kind* (`Kind`: SFT conversations, preference pairs, RL prompts, plain text) is a set of row
formats (`Format`: the columns it needs and a converter) plus how to detect one from a sample of
rows; the kinds differ only by their formats and by the encoder their stage passes in.

One policy for bad rows everywhere: a row that cannot be parsed or converted is counted, skipped,
and reported (the first few with file and row number); a source fails — with its path, the counts
and the first errors — when no row is usable, or when more than its `max_bad_share` of the rows
read is bad. An empty source fails with its path. Rows that are fine but give nothing to learn
(e.g. nothing left after truncation) are *dropped*, counted by reason, never silently.

Validation: a source's own "validation" split when it has one (built-in task generators, hub
datasets that publish one), else the `val_fraction` of its examples whose stable hash says so
(`llmlab.data.order.held_out`): the same example always lands on the same side, on every machine.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from llmlab.data.order import held_out
from llmlab.data.sources import BadRow, DataSource, DataSourceError, has_own_split, open_rows

log = logging.getLogger(__name__)
T = TypeVar("T")
DETECT_SAMPLE_ROWS = 20  # rows a format is detected from
BAD_ROWS_SHOWN = 5  # malformed rows quoted (file and row number) in logs and errors


@dataclass(frozen=True)
class Format:
    """A row format: the columns it needs and how a row becomes an item of its kind."""

    columns: tuple[str, ...]
    convert: Callable[[dict, DataSource], Any]  # raises KeyError/TypeError/ValueError on a malformed row

    def matches(self, keys: set[str]) -> bool:
        return set(self.columns) <= keys


def first_matching(formats: dict[str, Format]) -> Callable[[list[dict], DataSource], str | None]:
    """Detection by columns: the first format (in order) whose columns every sampled row has."""

    def detect(sample: list[dict], source: DataSource) -> str | None:
        keys = set.intersection(*(set(r) for r in sample))
        return next((name for name, fmt in formats.items() if fmt.matches(keys)), None)

    return detect


@dataclass(frozen=True)
class Kind:
    """What a stage reads: its row formats, how to detect one, and what the held-out hash reads."""

    name: str  # in messages: "SFT", "preference", "prompt", "text"
    formats: dict[str, Format]
    detect: Callable[[list[dict], DataSource], str | None]
    held_out_key: Callable[[Any], object] = lambda item: item
    help: str = ""  # what the formats need, shown when none fits

    def formats_help(self) -> str:
        return self.help or "; ".join(f"{name} ({', '.join(f.columns)})" for name, f in self.formats.items())


@dataclass
class SourceReport:
    """What one source gave: rows read, malformed rows (first few quoted), dropped examples by
    reason, and how many examples went to training and validation."""

    path: str
    format: str | None = None
    rows: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> examples
    notes: Counter = field(default_factory=Counter)  # e.g. "truncated" -> examples (kept)
    expected: Counter = field(default_factory=Counter)  # notes the data's kind makes normal (not a warning)
    train: int = 0
    val: int = 0
    validation: str = "held-out share"  # or "its validation split"

    def bad_row(self, where: str, error: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < BAD_ROWS_SHOWN:
            self.bad_examples.append(f"{where}: {error}")

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def note(self, what: str, expected: bool = False) -> None:
        (self.expected if expected else self.notes)[what] += 1

    def summary(self) -> str:
        parts = [f"{self.rows:,} rows read"]
        if self.train or self.val:
            parts[0] += f", {self.train:,} training and {self.val:,} validation examples ({self.validation})"
        if self.bad:
            parts.append(f"{self.bad} malformed rows skipped (first: {self.bad_examples[0]})")
        parts += [f"{n} {reason}" for reason, n in sorted(self.dropped.items())]
        parts += [f"{n} {what}" for what, n in sorted({**self.notes, **self.expected}.items())]
        return f"{self.path}: " + "; ".join(parts)

    def check(self, source: DataSource, kind: Kind) -> None:
        """Fail when the source was empty or more of its rows were malformed than it allows."""
        if self.rows == 0:
            raise DataSourceError(f"{kind.name} data source {source.path!r} has no rows: add rows, or remove it from the "
                                  f"stage's data")
        if self.bad > source.max_bad_share * self.rows:
            shown = "; ".join(self.bad_examples)
            what = "every row is" if self.bad == self.rows else f"{self.bad} of {self.rows} rows read are"
            raise DataSourceError(
                f"{kind.name} data source {source.path!r}: {what} malformed (more than max_bad_share "
                f"{source.max_bad_share:g}) — {shown}. Fix those rows, name the right `format:` ({kind.formats_help()}), "
                f"or raise max_bad_share on the data entry")


def detect_format(sample: list[dict], source: DataSource, kind: Kind) -> str:
    """The format of a source: the one it names (checked against the sample), else detected."""
    if not sample:
        raise DataSourceError(f"{kind.name} data source {source.path!r} has no rows to detect a format from")
    found = sorted(set().union(*(set(r) for r in sample)))
    if source.format is not None:
        if source.format not in kind.formats:
            raise DataSourceError(f"{source.path!r}: unknown {kind.name} format {source.format!r}; known: "
                                  f"{', '.join(kind.formats)}")
        missing = [c for c in kind.formats[source.format].columns if not all(c in r for r in sample)]
        if missing:
            raise DataSourceError(f"{source.path!r} is named format {source.format!r}, which needs the column(s) "
                                  f"{', '.join(missing)}; its rows have {', '.join(found) or '(none)'}")
        return source.format
    fmt = kind.detect(sample, source)
    if fmt is None:  # a malformed row in the sample must not hide the format the others share
        votes = Counter(f for f in (kind.detect([row], source) for row in sample) if f is not None)
        if votes and votes.most_common(1)[0][1] * 2 > len(sample):
            fmt = votes.most_common(1)[0][0]
    if fmt is None:
        raise DataSourceError(
            f"could not detect the {kind.name} format of {source.path!r}: its rows have columns "
            f"{', '.join(found) or '(none)'}. Known formats and the columns they need: {kind.formats_help()}. "
            f"Rename the columns, or set `format:` on the data entry.")
    return fmt


def items(source: DataSource, kind: Kind, split: str, report: SourceReport) -> Iterator[tuple[str, Any]]:
    """(where, item) for every usable row of one split of a source; bad rows are counted in
    `report` and skipped. Checks the bad-row policy when the rows run out (a caller that stops
    early calls `report.check` itself)."""
    rows = open_rows(source, split)
    sample: list[tuple[str, dict]] = []
    for where, row in rows:
        report.rows += 1
        if isinstance(row, BadRow):
            report.bad_row(where, row.error)
            continue
        sample.append((where, row))
        if len(sample) >= DETECT_SAMPLE_ROWS:
            break
    if not sample:
        report.check(source, kind)  # empty, or nothing but bad rows
    fmt = detect_format([r for _, r in sample], source, kind)
    report.format = fmt
    convert = kind.formats[fmt].convert

    def converted(where: str, row: dict) -> Iterator[tuple[str, Any]]:
        try:
            item = convert(row, source)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.bad_row(where, f"{type(e).__name__}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
            return
        if item is None:
            report.drop("empty rows")
        else:
            yield where, item

    for where, row in sample:
        yield from converted(where, row)
    for where, row in rows:
        report.rows += 1
        if isinstance(row, BadRow):
            report.bad_row(where, row.error)
        else:
            yield from converted(where, row)
    report.check(source, kind)


def interleave(sources: list[tuple[Iterable[T], float]], seed: int) -> Iterator[tuple[int, T]]:
    """Mix several streams: each next item comes from stream i with probability w_i / sum(w) (weights
    are relative), drawn with `random.Random(seed)`. A stream that runs out is dropped and the others'
    weights renormalised. Yields (index of the stream, item); each stream keeps its own order."""
    for i, (_, weight) in enumerate(sources):
        if not weight > 0:
            raise ValueError(f"source {i} has weight {weight}; weights must be > 0")
    rng = random.Random(seed)
    live = [(i, iter(it), float(w)) for i, (it, w) in enumerate(sources)]
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
            item = next(it)
        except StopIteration:
            del live[pick]
            continue
        yield index, item


@dataclass
class Examples(Generic[T]):
    """Encoded examples of a stage's sources: training and validation, and per-source reports."""

    train: list[T]
    val: list[T]
    reports: list[SourceReport]

    @property
    def stats(self) -> dict:
        """Totals over the sources: malformed rows (and the first few), dropped and noted counts."""
        out: dict = {"malformed": sum(r.bad for r in self.reports),
                     "malformed_examples": [e for r in self.reports for e in r.bad_examples][:BAD_ROWS_SHOWN],
                     "sources": [{"path": r.path, "format": r.format, "train": r.train, "val": r.val,
                                  "rows": r.rows, "malformed": r.bad, "validation": r.validation} for r in self.reports]}
        for r in self.reports:
            for key, n in {**r.dropped, **r.notes, **r.expected}.items():
                out[key] = out.get(key, 0) + n
        return out

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports)


Encoder = Callable[[Any, SourceReport], Any]  # item -> example, or None after report.drop(reason)


def read(sources: list[DataSource], kind: Kind, encode: Encoder, seed: int, val_fraction: float,
         max_train: int | None = None, max_val: int | None = None, hold_out: bool = True) -> Examples:
    """Every source read, converted, split, encoded and capped; training examples interleaved by
    weight (seeded), validation examples concatenated in source order. `max_train` / `max_val` cap
    each source and the merged result. `hold_out=False` takes the named split whole (into `train`):
    an evaluation reading a test split it never trains on."""
    if not sources:
        raise ValueError(f"no {kind.name} data sources given")
    per_train: list[list] = []
    per_val: list[list] = []
    reports: list[SourceReport] = []
    for source in sources:
        report = SourceReport(source.path)
        own_val = hold_out and source.split != "validation" and has_own_split(source, "validation")
        report.validation = ("its validation split" if own_val else f"held-out share {val_fraction:g}" if hold_out
                             else f"the whole {source.split} split")
        train: list = []
        val: list = []
        for _, item in items(source, kind, source.split, report):
            if hold_out and not own_val and held_out(kind.held_out_key(item), val_fraction):
                if max_val is not None and len(val) >= max_val:
                    continue
                bucket = val
            else:
                bucket = train
            example = encode(item, report)
            if example is not None:
                bucket.append(example)
            if max_train is not None and len(train) >= max_train:
                break
        report.check(source, kind)  # also when a cap stopped the reading early
        if own_val and max_val != 0:
            for _, item in items(source, kind, "validation", report):
                if max_val is not None and len(val) >= max_val:
                    break
                example = encode(item, report)
                if example is not None:
                    val.append(example)
        if not train and not val:
            raise DataSourceError(f"{kind.name} data source {source.path!r} gave no usable example: {report.rows} rows "
                                  f"read, {report.bad} malformed, "
                                  + (", ".join(f"{n} {why}" for why, n in report.dropped.items()) or "none dropped"))
        report.train, report.val = len(train), len(val)
        log.log(logging.WARNING if report.bad or report.dropped or report.notes else logging.INFO, report.summary())
        per_train.append(train)
        per_val.append(val)
        reports.append(report)
    train = [ex for _, ex in interleave([(t, s.weight) for t, s in zip(per_train, sources)], seed)][:max_train]
    val = [ex for v in per_val for ex in v][:max_val]
    if not train:
        raise DataSourceError(f"no {kind.name} training examples in {[s.path for s in sources]}: every usable "
                              f"example went to validation; lower val_fraction or add data")
    return Examples(train, val, reports)


def stream(sources: list[DataSource], kind: Kind, seed: int, val_fraction: float,
           reports: list[SourceReport] | None = None) -> Iterator[tuple[int, bool, Any]]:
    """(source index, held out?, item) for the sources' items interleaved by weight, without
    holding them in memory (pretraining corpora). Pass `reports` to see what each source gave; a
    caller that stops early calls `report.check` on them."""
    reports = reports if reports is not None else []
    reports[:] = [SourceReport(s.path) for s in sources]
    streams = [((item for _, item in items(s, kind, s.split, r)), s.weight) for s, r in zip(sources, reports)]
    for index, item in interleave(streams, seed):
        yield index, held_out(kind.held_out_key(item), val_fraction), item
