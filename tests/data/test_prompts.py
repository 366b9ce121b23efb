"""RL prompt data: extraction from each format, detection, rendering, truncation, splits."""

import copy
import json

import pytest

from llmlab.data.sources import DataSource
from llmlab.data.formats import detect_prompt_format, extract_prompt
from llmlab.data.prompts import prepare_prompt_data, render_prompt
from llmlab.tokenizer import train_tokenizer

HH = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{i}+1={i + 1} What is 2+2? And 3+3? Human Assistant rev a b c" for i in range(200)]
    return train_tokenizer(texts, 320, tmp_path_factory.mktemp("tok"))


def test_prompt_column_string_is_one_user_turn_and_keeps_other_columns():
    messages, text, extras = extract_prompt({"prompt": "347+1=", "answer": "348", "task": "successor"}, "prompt")
    assert messages == [{"role": "user", "content": "347+1="}] and text == "347+1="
    assert extras == {"answer": "348", "task": "successor"}


def test_prompt_column_conversation_and_messages_stop_before_the_last_assistant_turn():
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    messages, text, _ = extract_prompt({"messages": conv}, "messages")
    assert messages == conv[:4] and text is None
    messages, _, _ = extract_prompt({"prompt": conv[:4]}, "prompt")
    assert messages == conv[:4]  # a conversation ending with a user turn is taken whole
    with pytest.raises(ValueError, match="no user turn"):
        extract_prompt({"messages": [{"role": "assistant", "content": "x"}]}, "messages")


def test_hh_rlhf_prompt_is_everything_up_to_the_last_assistant_marker():
    messages, text, extras = extract_prompt({"chosen": HH, "rejected": HH[:-2] + "7."}, "hh-rlhf")
    assert text == "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "And 3+3?" and extras == {}


def test_format_detection_and_a_clear_error_for_unknown_columns():
    assert detect_prompt_format([{"prompt": "a", "answer": "b"}], "x") == "prompt"
    assert detect_prompt_format([{"messages": []}], "x") == "messages"
    assert detect_prompt_format([{"chosen": HH, "rejected": HH}], "x") == "hh-rlhf"
    assert detect_prompt_format([{"question": "a", "answer": "#### 1"}], "x") == "question"  # GSM8K
    with pytest.raises(ValueError, match=r"columns instruction.*prompt \(prompt\).*question \(question\).*format:"):
        detect_prompt_format([{"instruction": "a"}], "data.jsonl")


def test_rendering_uses_the_chat_template_else_the_plain_text(tok):
    rendered = render_prompt(tok, [{"role": "user", "content": "347+1="}], "347+1=")
    assert rendered == "<|im_start|>user\n347+1=<|im_end|>\n<|im_start|>assistant\n"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert render_prompt(plain, [{"role": "user", "content": "hi"}], HH) == HH


def test_builtin_task_prompts_use_their_validation_split_with_answers(tok):
    data = prepare_prompt_data([DataSource(path="builtin:tasks-prompts")], tok, 64, seed=0, val_fraction=0.1,
                               max_prompts=50, max_val_prompts=20)
    assert len(data.train) == 50 and len(data.val) == 20
    assert data.stats["sources"][0]["validation"] == "its validation split"
    train_texts = {p.text for p in data.train}
    assert not train_texts & {p.text for p in data.val}
    p = data.train[0]
    assert {"answer", "task"} <= set(p.extras)
    assert tok.decode(p.ids, skip_special_tokens=False) == p.text
    assert p.text.endswith("<|im_start|>assistant\n")


def test_local_file_holds_out_a_hashed_fraction_and_cuts_long_prompts_from_the_left(tok, tmp_path):
    rows = [{"prompt": f"What is {i}+1? " * (6 if i == 0 else 1), "answer": str(i + 1)} for i in range(200)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_prompt_data([DataSource(path=str(path))], tok, 24, seed=0, val_fraction=0.2)
    assert 200 == len(data.train) + len(data.val) and 15 < len(data.val) < 70
    assert not {p.text for p in data.train} & {p.text for p in data.val}
    assert all(len(p.ids) <= 24 for p in data.train + data.val)
    assert data.stats["truncated"] >= 1
    long = next(p for p in data.train + data.val if p.extras["answer"] == "1")
    assert long.text.endswith("<|im_start|>assistant\n")  # the end (what the completion answers) is kept


def test_a_bad_row_is_named_with_its_file_and_line(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    # one bad row of two is more than the default max_bad_share (5%): the source fails, naming it
    with pytest.raises(ValueError, match=r"p\.jsonl line 2: TypeError: `prompt` must be a string"):
        prepare_prompt_data([DataSource(path=str(path))], tok, 24, seed=0, val_fraction=0.01)
    # allowed a larger share, the bad row is counted, reported and skipped
    data = prepare_prompt_data([DataSource(path=str(path), max_bad_share=0.5)], tok, 24, seed=0, val_fraction=0.0)
    assert len(data.train) == 1 and data.stats["malformed"] == 1
    assert data.stats["malformed_examples"][0].startswith(f"{path} line 2: TypeError")
