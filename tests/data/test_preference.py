"""Preference data: formats, hh-rlhf transcript split, response-only labels, malformed rows,
validation, batches of 2B rows, exact resume."""

import json
import random

import pytest
import torch

from llmlab.data.formats import PREFERENCE_FORMATS, detect_preference_format, parse_hh_transcript, to_pair
from llmlab.data.preference import PreferenceBatches, collate_pairs, eval_batches, prepare_preference_data, tokenize_pair
from llmlab.data.sources import DataSource
from llmlab.tokenizer import train_tokenizer
from llmlab.train.objectives import IGNORE_INDEX

IGNORE = IGNORE_INDEX


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "answer", "is", "Human", "Assistant", "hello", "world", "what", "capital",
             "France", "Paris", "Lyon", "sure", "thanks"]
    texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randrange(100)}"
             for _ in range(300)]
    return train_tokenizer(texts, vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_sequence(tok, prompt, response):
    """(ids, labels) computed independently: the prompt rendered with the generation prompt, then
    the response and its end-of-turn token (labelled), then the template's trailing newline."""
    head = encode(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    body = encode(tok, response + "<|im_end|>")
    tail = encode(tok, "\n")
    return head + body + tail, [IGNORE] * len(head) + body + [IGNORE] * len(tail)


HH_CHOSEN = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\n"
             "Human: And its second city?\n\nAssistant: Lyon, by most measures.")
HH_REJECTED = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\n"
               "Human: And its second city?\n\nAssistant: I don't know, sorry.")
HH_PROMPT = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And its second city?"}]

UF_ROW = {
    "prompt": "What is 2+3?",
    "chosen": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    "rejected": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "6"}],
    "score_chosen": 9.0,
}


# ------------------------------------------------------------------------------------- formats


def test_detect_formats():
    assert detect_preference_format([{"prompt": "q", "chosen": "a", "rejected": "b"}], "s") == "plain"
    assert detect_preference_format([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "s") == "hh_rlhf"
    assert detect_preference_format([UF_ROW], "s") == "ultrafeedback"
    uf_no_prompt = {k: v for k, v in UF_ROW.items() if k != "prompt"}
    assert detect_preference_format([uf_no_prompt], "s") == "ultrafeedback"
    trl_explicit = {"prompt": [{"role": "user", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}
    assert detect_preference_format([trl_explicit], "s") == "plain"
    assert set(PREFERENCE_FORMATS) == {"plain", "hh_rlhf", "ultrafeedback"}


def test_detect_error_names_source_and_columns():
    with pytest.raises(ValueError, match=r"'my/data'.*columns answer, question"):
        detect_preference_format([{"question": "q", "answer": "a"}], "my/data")
    with pytest.raises(ValueError, match="no rows"):
        detect_preference_format([], "my/data")


def test_hh_rlhf_split_real_looking_transcript():
    prompt, chosen, rejected = to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "hh_rlhf")
    assert prompt == HH_PROMPT
    assert chosen == "Lyon, by most measures."
    assert rejected == "I don't know, sorry."


def test_parse_hh_transcript():
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: bye") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"}]
    with pytest.raises(ValueError, match="does not start"):
        parse_hh_transcript("preamble\n\nHuman: hi")


@pytest.mark.parametrize("row, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
     "do not share"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "no '\\\\n\\\\nAssistant:' turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},
     "ends with a Human turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:  ", "rejected": "\n\nHuman: a\n\nAssistant: d"},
     "chosen response is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": None}, "lacks the column"),
])
def test_hh_rlhf_malformed(row, message):
    with pytest.raises(ValueError, match=message):
        to_pair(row, "hh_rlhf")


def test_plain_and_ultrafeedback_pairs():
    user = [{"role": "user", "content": "What is 2+3?"}]
    assert to_pair({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}, "plain") == (user, "5", "6")
    sys_prompt = [{"role": "system", "content": "Be brief."}, *user]
    assert to_pair({"prompt": sys_prompt, "chosen": [{"role": "assistant", "content": "5"}],
                    "rejected": "6"}, "plain") == (sys_prompt, "5", "6")
    assert to_pair(UF_ROW, "ultrafeedback") == (user, "5", "6")
    bad = {**UF_ROW, "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "6"}]}
    with pytest.raises(ValueError, match="differ before"):
        to_pair(bad, "ultrafeedback")
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        to_pair({"prompt": [*user, {"role": "assistant", "content": "x"}], "chosen": "5",
                 "rejected": "6"}, "plain")
    with pytest.raises(ValueError, match="role"):
        to_pair({"prompt": [{"role": "robot", "content": "x"}], "chosen": "5", "rejected": "6"}, "plain")


# ---------------------------------------------------------------------------------- tokenizing


@pytest.mark.parametrize("fmt, row, prompt, chosen, rejected", [
    ("plain", {"prompt": "what is the capital of France?", "chosen": "Paris", "rejected": "Lyon"},
     [{"role": "user", "content": "what is the capital of France?"}], "Paris", "Lyon"),
    ("ultrafeedback", UF_ROW, [{"role": "user", "content": "What is 2+3?"}], "5", "6"),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, HH_PROMPT,
     "Lyon, by most measures.", "I don't know, sorry."),
])
def test_formats_give_expected_token_ids(tok, fmt, row, prompt, chosen, rejected):
    pair = tokenize_pair(tok, *to_pair(row, fmt), max_seq_len=512)
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = expected_sequence(tok, prompt, response)
        assert pair[f"{side}_ids"] == ids
        assert pair[f"{side}_labels"] == labels
        # the whole conversation, rendered in one go, tokenizes to the same ids
        full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}],
                                       tokenize=False)
        assert encode(tok, full) == ids
    assert pair["truncated"] is False


def test_multi_turn_prompt_assistant_turns_are_not_labelled(tok):
    pair = tokenize_pair(tok, HH_PROMPT, "Lyon.", "No.", max_seq_len=512)
    labelled = [t for t in pair["chosen_labels"] if t != IGNORE]
    assert labelled == encode(tok, "Lyon.<|im_end|>")  # not "Paris.<|im_end|>" from the prompt


def test_truncation_keeps_the_response_prefix(tok):
    full = tokenize_pair(tok, HH_PROMPT, "Lyon, by most measures.", "No.", max_seq_len=512)
    n_prompt = full["chosen_labels"].index(next(t for t in full["chosen_labels"] if t != IGNORE))
    cut = tokenize_pair(tok, HH_PROMPT, "Lyon, by most measures.", "No.", max_seq_len=n_prompt + 2)
    assert cut["truncated"] is True
    assert cut["chosen_ids"] == full["chosen_ids"][:n_prompt + 2]
    assert cut["chosen_labels"] == full["chosen_labels"][:n_prompt + 2]
    assert sum(t != IGNORE for t in cut["chosen_labels"]) == 2


# ------------------------------------------------------------------------------------ datasets


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hh_row(i, bad=None):
    prompt = f"\n\nHuman: what is {i} and {i + 1}?"
    row = {"chosen": prompt + f"\n\nAssistant: the answer is {2 * i + 1}",
           "rejected": prompt + f"\n\nAssistant: the answer is {2 * i + 2}"}
    if bad == "prefix":
        row["rejected"] = "\n\nHuman: hello world\n\nAssistant: sure"
    elif bad == "no_assistant":
        row["chosen"] = row["rejected"] = prompt
    elif bad == "empty":
        row["rejected"] = prompt + "\n\nAssistant: "
    return row


def test_malformed_rows_counted_with_row_numbers(tok, tmp_path):
    bad = {3: "prefix", 5: "no_assistant", 8: "empty", 11: "prefix", 12: "prefix", 14: "empty"}
    rows = [hh_row(i, bad.get(i)) for i in range(20)]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    # 6 of 20 rows are bad: more than the default max_bad_share (5%), so the source fails, naming
    # the file, the count and the first rows
    with pytest.raises(ValueError, match=r"hh\.jsonl.*6 of 20 rows read are malformed.*line 4: ValueError: chosen and rejected"):
        prepare_preference_data([DataSource(path=path)], tok, max_seq_len=128, seed=0, val_fraction=0.0)
    data = prepare_preference_data([DataSource(path=path, max_bad_share=0.5)], tok, max_seq_len=128, seed=0,
                                   val_fraction=0.0)
    st = data.stats
    assert st["malformed"] == 6
    # the first five, by file and line (1-based: row i of the list is line i + 1)
    assert [m.split(": ")[0] for m in st["malformed_examples"]] == [f"{path} line {i + 1}" for i in (3, 5, 8, 11, 12)]
    assert "do not share" in st["malformed_examples"][0]
    assert "rejected response is empty" in st["malformed_examples"][2]
    assert len(data.train) == 14 and data.val == []
    assert st["sources"][0]["format"] == "hh_rlhf"


def test_no_usable_row_fails_clearly(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [hh_row(i, "prefix") for i in range(4)])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*every row is malformed.*line 1: ValueError: chosen and rejected"):
        prepare_preference_data([DataSource(path=path)], tok, max_seq_len=128, seed=0, val_fraction=0.0)


def test_format_override_and_unknown_format(tok, tmp_path):
    rows = [{"prompt": "ignored", **hh_row(i)} for i in range(6)]
    path = write_jsonl(tmp_path / "hh_with_prompt.jsonl", rows)
    detected = prepare_preference_data([DataSource(path=path)], tok, 128, 0, 0.0)
    assert detected.stats["sources"][0]["format"] == "plain"
    forced = prepare_preference_data([DataSource(path=path, format="hh_rlhf")], tok, 128, 0, 0.0)
    assert forced.stats["sources"][0]["format"] == "hh_rlhf"
    expected = tokenize_pair(tok, *to_pair(rows[0], "hh_rlhf"), 128)
    del expected["truncated"]
    assert forced.train[0] == expected  # one source: the file's order
    with pytest.raises(ValueError, match="unknown preference format 'nope'"):
        prepare_preference_data([DataSource(path=path, format="nope")], tok, 128, 0, 0.0)


def test_identical_and_too_long_pairs_are_dropped(tok, tmp_path):
    rows = [{"prompt": f"what is {i}?", "chosen": f"the answer is {i}", "rejected": f"the answer is {i + 1}"}
            for i in range(5)]
    rows.append({"prompt": "what is 9?", "chosen": "same", "rejected": "same"})
    rows.append({"prompt": "the answer " * 60, "chosen": "a", "rejected": "b"})
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    data = prepare_preference_data([DataSource(path=path)], tok, max_seq_len=48, seed=0, val_fraction=0.0)
    assert data.stats["dropped_identical"] == 1
    assert data.stats["dropped_no_target"] == 1
    assert data.stats["truncated"] >= 1
    assert len(data.train) == 5


def test_held_out_fraction_is_stable_and_disjoint(tok, tmp_path):
    rows = [{"prompt": f"what is {i}?", "chosen": f"the answer is {i}", "rejected": "hello"}
            for i in range(40)]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    a = prepare_preference_data([DataSource(path=path)], tok, 64, seed=0, val_fraction=0.3)
    b = prepare_preference_data([DataSource(path=path)], tok, 64, seed=1, val_fraction=0.3)
    key = lambda p: tuple(p["chosen_ids"])
    assert 0 < len(a.val) < 40 and len(a.train) + len(a.val) == 40
    assert {key(p) for p in a.val} == {key(p) for p in b.val}
    assert not {key(p) for p in a.val} & {key(p) for p in a.train}
    assert a.stats["sources"][0]["validation"] == "held-out share 0.3"


def test_pairs_carry_their_task_family_and_the_split_ignores_it(tok, tmp_path):
    """A row's `task` column rides along as the pair's "family" (for per-family preference
    accuracy); the held-out hash reads only prompt, chosen and rejected, so adding or changing the
    column moves no pair across the split."""
    rows = [{"prompt": f"what is {i}?", "chosen": f"the answer is {i}", "rejected": "hello"} for i in range(40)]
    tagged = [{**r, "task": "plus" if i % 2 else "sort"} for i, r in enumerate(rows)]
    plain = prepare_preference_data([DataSource(path=write_jsonl(tmp_path / "a.jsonl", rows))], tok, 64, 0, 0.3)
    fam = prepare_preference_data([DataSource(path=write_jsonl(tmp_path / "b.jsonl", tagged))], tok, 64, 0, 0.3)
    key = lambda p: tuple(p["chosen_ids"])
    assert [key(p) for p in fam.val] == [key(p) for p in plain.val] and 0 < len(fam.val) < 40
    assert all("family" not in p for p in plain.train + plain.val)
    by_key = {key(p): p["family"] for p in fam.train + fam.val}
    want = {tuple(encode_pair_chosen(tok, r)): r["task"] for r in tagged}
    assert len(by_key) == 40 and by_key == {k: want[k] for k in by_key}
    from llmlab.data.tasks import TASKS

    builtin = prepare_preference_data([DataSource(path="builtin:tasks-preference")], tok, 96, 0, 0.0, max_examples=40)
    assert {p["family"] for p in builtin.train} <= set(TASKS)
    assert len({p["family"] for p in builtin.train}) >= 2


def encode_pair_chosen(tok, row):
    return tokenize_pair(tok, [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"], 64)["chosen_ids"]


def test_builtin_task_source_uses_its_validation_split(tok):
    data = prepare_preference_data([DataSource(path="builtin:tasks-preference")], tok, 96, seed=0,
                                   val_fraction=0.5, max_examples=6)
    assert len(data.train) == 6 and len(data.val) == 6
    assert data.stats["sources"][0]["validation"] == "its validation split"
    assert data.stats["sources"][0]["format"] == "plain"
    assert data.stats["malformed"] == 0


# ------------------------------------------------------------------------------------- batches


def fake_pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(5, 50) for _ in range(rng.randrange(2, 5))]
        c = [rng.randrange(5, 50) for _ in range(rng.randrange(1, 4))]
        r = [rng.randrange(5, 50) for _ in range(rng.randrange(1, 4))]
        out.append({"chosen_ids": p + c, "chosen_labels": [IGNORE] * len(p) + c,
                    "rejected_ids": p + r, "rejected_labels": [IGNORE] * len(p) + r, "i": i})
    return out


def test_collate_stacks_chosen_then_rejected():
    pairs = fake_pairs(3)
    batch = collate_pairs(pairs, pad_id=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    width = max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    assert batch["input_ids"].shape == (6, width)
    for k, p in enumerate(pairs):
        for row, side in ((k, "chosen"), (3 + k, "rejected")):
            n = len(p[f"{side}_ids"])
            assert batch["input_ids"][row, :n].tolist() == p[f"{side}_ids"]
            assert batch["labels"][row, :n].tolist() == p[f"{side}_labels"]
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert (batch["input_ids"][row, n:] == 2).all() and (batch["labels"][row, n:] == IGNORE).all()
    with_ref = [dict(p, ref_logps=(-1.0 - k, -2.0 - k)) for k, p in enumerate(pairs)]
    assert collate_pairs(with_ref, 2)["ref_logps"].tolist() == [-1.0, -2.0, -3.0, -2.0, -3.0, -4.0]


def test_batches_cover_each_epoch_and_resume_exactly():
    pairs = fake_pairs(7)
    full = PreferenceBatches(pairs, batch_size=3, seed=4, pad_id=0)
    uninterrupted = [full.next_batch() for _ in range(8)]

    first = PreferenceBatches(pairs, batch_size=3, seed=4, pad_id=0)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PreferenceBatches(pairs, batch_size=3, seed=4, pad_id=0)
    resumed.load_state_dict(state)
    for expected in uninterrupted[3:]:
        got = resumed.next_batch()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)

    # every pair once per epoch: the first 7 picks of a fresh source are a permutation
    seen = PreferenceBatches(pairs, batch_size=7, seed=4, pad_id=0).next_batch()["input_ids"][:7]
    firsts = sorted(tuple(r[r != 0].tolist()) for r in seen)
    assert firsts == sorted(tuple(p["chosen_ids"]) for p in pairs)
    with pytest.raises(ValueError, match="outside"):
        resumed.load_state_dict({"epoch": 0, "position": 99})


def test_eval_batches_fixed_order():
    pairs = fake_pairs(5)
    batches = eval_batches(pairs, batch_size=2, pad_id=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[2]["input_ids"][0, :len(pairs[4]["chosen_ids"])].tolist() == pairs[4]["chosen_ids"]
