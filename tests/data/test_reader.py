"""The one reader: every data kind (SFT, preference, prompts, pretraining text) follows the same
policy for bad rows, empty and unreadable sources, and held-out shares."""

import json

import pytest

from llmlab.data.preference import prepare_preference_data
from llmlab.data.pretrain import prepare_pretrain_data
from llmlab.data.prompts import prepare_prompt_data
from llmlab.data.reader import read
from llmlab.data.formats import SFT
from llmlab.data.sft import prepare_sft_data
from llmlab.data.sources import DataSource, DataSourceError
from llmlab.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"what is {i}? the answer is {i + 1}, hello world" for i in range(300)]
    return train_tokenizer(texts, vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"))


GOOD = {
    "sft": lambda i: {"prompt": f"what is {i}?", "completion": f"{i + 1}"},
    "preference": lambda i: {"prompt": f"what is {i}?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"},
    "prompts": lambda i: {"prompt": f"what is {i}?", "answer": f"{i + 1}"},
    "text": lambda i: {"text": f"the answer is {i + 1} " * 8},
}
BAD = {  # rows that lack a column of their format, or whose values do not fit it
    "sft": {"prompt": "a prompt without its completion"},
    "preference": {"prompt": "p", "chosen": "same", "rejected": "  "},
    "prompts": {"prompt": 7},
    "text": {"body": "no text column"},
}


def prepare(kind, sources, tok, tmp_path):
    if kind == "sft":
        return prepare_sft_data(sources, tok, 64, seed=0, val_fraction=0.0)
    if kind == "preference":
        return prepare_preference_data(sources, tok, 64, seed=0, val_fraction=0.0)
    if kind == "prompts":
        return prepare_prompt_data(sources, tok, 64, seed=0, val_fraction=0.0)
    return prepare_pretrain_data(sources, str(tmp_path / "tok"), seq_len=8, seed=0, val_fraction=0.0, max_tokens=None)


def write(path, rows, broken_lines=()):
    lines = [json.dumps(r) for r in rows]
    for at in broken_lines:
        lines.insert(at, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["sft", "preference", "prompts", "text"])
def test_one_bad_row_policy_for_every_kind(kind, tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    rows = [GOOD[kind](i) for i in range(60)]
    rows.insert(10, BAD[kind])
    path = write(tmp_path / "data.jsonl", rows, broken_lines=[30])  # line 31 is not JSON
    # 2 bad rows of 62 (3%) is within the default max_bad_share (5%): counted, reported, skipped
    data = prepare(kind, [DataSource(path=path)], tok, tmp_path)
    if kind == "text":
        (source,) = data.meta["sources"]
        assert source["malformed"] == 2 and source["rows"] == 62 and source["train_docs"] == 60
        shown = source["malformed_examples"]
    else:
        assert data.stats["malformed"] == 2 and len(data.train) == 60
        shown = data.stats["malformed_examples"]
    assert [s.split(": ")[0] for s in shown] == [f"{path} line 11", f"{path} line 31"]
    assert "not valid JSON" in shown[1]
    # more than the allowed share: the source fails, naming the file, the counts and the first rows
    with pytest.raises(DataSourceError, match=r"data\.jsonl.*2 of 62 rows read are malformed.*line 11: .*line 31"):
        prepare(kind, [DataSource(path=path, max_bad_share=0.02)], tok, tmp_path)


@pytest.mark.parametrize("kind", ["sft", "preference", "prompts", "text"])
def test_an_empty_source_fails_with_its_path(kind, tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataSourceError, match=r"'.*empty\.jsonl' has no rows"):
        prepare(kind, [DataSource(path=str(empty))], tok, tmp_path)


@pytest.mark.parametrize("kind", ["sft", "text"])
def test_a_file_that_is_not_utf8_fails_with_its_name(kind, tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(GOOD[kind](1)).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataSourceError, match=r"latin1\.jsonl is not UTF-8 text"):
        prepare(kind, [DataSource(path=str(latin))], tok, tmp_path)


def test_a_source_whose_every_example_is_dropped_says_why(tok, tmp_path):
    path = write(tmp_path / "long.jsonl", [{"prompt": "word " * 80, "completion": "x"} for _ in range(5)])
    with pytest.raises(DataSourceError, match=r"long\.jsonl' gave no usable example: 5 rows read, 0 malformed, "
                                              r"5 dropped_no_target"):
        prepare_sft_data([DataSource(path=path)], tok, 16, seed=0, val_fraction=0.0)


def test_a_zero_held_out_share_holds_nothing_out_and_any_other_is_stable(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD["sft"](i) for i in range(100)])
    none = prepare_sft_data([DataSource(path=path)], tok, 64, seed=0, val_fraction=0.0)
    assert len(none.train) == 100 and none.val == []
    some = prepare_sft_data([DataSource(path=path)], tok, 64, seed=3, val_fraction=0.25)
    again = prepare_sft_data([DataSource(path=path)], tok, 64, seed=4, val_fraction=0.25)
    assert 10 < len(some.val) < 45 and sorted(some.val) == sorted(again.val)


def test_the_reader_takes_a_test_split_whole_when_asked(tok):
    examples = read([DataSource(path="builtin:tasks", split="test")], SFT, lambda item, report: item, seed=0,
                    val_fraction=0.5, max_train=30, hold_out=False)
    assert len(examples.train) == 30 and examples.val == []
    assert examples.reports[0].validation == "the whole test split"
