"""Reading sources (txt, jsonl, csv, parquet, folders, builtin) and weighted interleaving."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import itertools
import json
import math
from collections import Counter

import pytest

from llmlab.data.reader import interleave
from llmlab.data.sources import DataSourceError, iter_rows, iter_texts


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_txt_paragraphs_are_documents(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("First paragraph,\nstill first.\n\n\n  \nSecond — ünïcode.\n\nThird", encoding="utf-8")
    assert list(iter_texts(str(path))) == ["First paragraph,\nstill first.", "Second — ünïcode.", "Third"]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"text": "a b", "n": 1}, {"text": "c", "n": 2}])
    assert [r["n"] for r in iter_rows(str(path))] == [1, 2]
    assert list(iter_texts(str(path))) == ["a b", "c"]


def test_csv_with_other_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('body,label\n"hello, world",1\nsecond,0\n', encoding="utf-8")
    assert list(iter_texts(str(path), column="body")) == ["hello, world", "second"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x1", "x2", "x3"]}), path)
    assert list(iter_texts(str(path))) == ["x1", "x2", "x3"]


def test_directory_reads_supported_files_sorted(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("from b", encoding="utf-8")
    write_jsonl(folder / "a.jsonl", [{"text": "from a1"}, {"text": "from a2"}])
    (folder / "sub" / "c.txt").write_text("from c", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_texts(str(folder))) == ["from a1", "from a2", "from b", "from c"]


def test_missing_column_names_source_and_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"content": "a", "id": 1}])
    with pytest.raises(ValueError, match=r"(?s)no column 'text'.*content.*id") as err:
        list(iter_texts(str(path)))
    assert "d.jsonl" in str(err.value)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        iter_rows(str(missing))


def test_unknown_builtin_lists_known_names():
    with pytest.raises(ValueError, match=r"builtin:nope.*builtin:pydocs.*builtin:stdlib"):
        iter_rows("builtin:nope")


def test_unloadable_hub_dataset_says_why():
    with pytest.raises(DataSourceError, match="could not load dataset.*HF_DATASETS_OFFLINE"):
        iter_rows("llmlab-no-such-org/no-such-dataset")


def test_builtin_stdlib_is_real_english_docstrings():
    texts = list(iter_texts("builtin:stdlib"))
    assert len(texts) > 1000
    assert all(len(t) >= 40 for t in texts)
    assert sum("Return" in t for t in texts) > 100
    assert any("JSON" in t and "JavaScript" in t for t in texts)
    # Cached: the second read streams the JSONL file and gives the same documents.
    assert list(iter_texts("builtin:stdlib")) == texts


def endless(tag):
    return (f"{tag}{i}" for i in itertools.count())


def test_interleave_follows_weights():
    weights = [1.0, 2.0, 7.0]
    n = 20_000
    draws = itertools.islice(interleave([(endless(i), w) for i, w in enumerate(weights)], seed=3), n)
    counts = Counter(index for index, _ in draws)
    for i, w in enumerate(weights):
        p = w / sum(weights)
        standard_error = math.sqrt(n * p * (1 - p))
        assert abs(counts[i] - n * p) < 4 * standard_error, (i, counts)


def test_interleave_is_seeded_and_keeps_source_order():
    def run(seed):
        return list(itertools.islice(interleave([(endless("a"), 1), (endless("b"), 1)], seed), 200))

    assert run(5) == run(5)
    assert run(5) != run(6)
    a_texts = [t for i, t in run(5) if i == 0]
    assert a_texts == [f"a{k}" for k in range(len(a_texts))]


def test_interleave_drops_exhausted_sources():
    short = iter(["s1", "s2", "s3"])
    long = iter([f"l{k}" for k in range(100)])
    out = list(interleave([(short, 1.0), (long, 1.0)], seed=0))
    assert len(out) == 103
    assert [t for i, t in out if i == 0] == ["s1", "s2", "s3"]
    assert [t for i, t in out if i == 1] == [f"l{k}" for k in range(100)]


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_interleave_rejects_a_weight_that_is_not_positive(weight):
    # the spec's rule too (DataSource.weight > 0): a source that can never be drawn is a mistake
    with pytest.raises(ValueError, match="weights must be > 0"):
        list(interleave([(iter(["x"]), weight)], seed=0))
