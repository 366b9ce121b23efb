"""SFT data: formats, assistant-only label masks, truncation, validation splits, batches, packing."""

import json
import random

import pytest
import torch

from llmlab.data.sources import DataSource
from llmlab.data import sft
from llmlab.data.formats import SFT_FORMATS as FORMATS
from llmlab.data.formats import detect_sft_format as detect_format
from llmlab.data.formats import to_messages
from llmlab.data.sft import SFTBatches, eval_batches, prepare_sft_data, tokenize_conversation
from llmlab.model import LlmlabConfig, build_model
from llmlab.tokenizer import CHAT_TEMPLATE, train_tokenizer
from llmlab.train.objectives import IGNORE_INDEX, LanguageModeling

IGNORE = IGNORE_INDEX


def tiny_texts():
    rng = random.Random(0)
    words = ["the", "answer", "is", "user", "assistant", "system", "hello", "world", "rev", "sort"]
    out = []
    for i in range(300):
        out.append(" ".join(rng.choice(words) for _ in range(6)) + f" {rng.randrange(1000)}+1="
                   + " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)))
    return out


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tiny_texts(), vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_no_markers(tmp_path_factory, tok):
    """The same tokenizer with a template that has no {% generation %} markers (like most hub
    templates): masks must come from the offsets fallback."""
    plain = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in plain and "endgeneration" not in plain
    out = tmp_path_factory.mktemp("tok2")
    tok.save_pretrained(str(out))
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(out))
    t.chat_template = plain
    return t


CONVERSATION = [{"role": "user", "content": "What is 7+5?"},
                {"role": "assistant", "content": "12"}]

ROWS = {
    "messages": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 7+5?"},
                                   {"from": "gpt", "value": "12"}]},
    "alpaca": {"instruction": "What is 7+5?", "input": "", "output": "12"},
    "instruction": {"instruction": "What is 7+5?", "response": "12"},
    "prompt_completion": {"prompt": "What is 7+5?", "completion": "12"},
    "question_answer": {"question": "What is 7+5?", "answer": "12"},
}


def test_every_format_detected_and_parsed_to_the_same_conversation():
    assert set(ROWS) == set(FORMATS) - {"text"}  # plain text: the next test
    for name, row in ROWS.items():
        assert detect_format([row], "x.jsonl") == name
        assert to_messages(row, name) == CONVERSATION


def test_plain_text_is_learnt_whole_beside_conversations(tok, tmp_path, caplog):
    """A `text` row is a document, not a conversation: its tokens and EOS, no chat template, a label on
    every token but the first; held out by the same hash of its text as pretraining's validation."""
    from llmlab.data.order import held_out
    from llmlab.data.pretrain import encode_documents

    assert detect_format([{"text": "a doc", "id": 3}], "docs.jsonl") == "text"
    assert detect_format([{"prompt": "p", "completion": "c", "text": "t"}], "x") == "prompt_completion"
    ids, labels, truncated = sft.tokenize_document(tok, "the answer is 42", max_seq_len=64)
    assert ids == encode_documents(tok, ["the answer is 42"])[0] + [tok.eos_token_id] and not truncated
    assert labels == [IGNORE] + ids[1:]
    cut, cut_labels, truncated = sft.tokenize_document(tok, "hello world " * 40, max_seq_len=16)
    assert truncated and len(cut) == len(cut_labels) == 16
    docs = tmp_path / "docs.jsonl"
    texts = [f"hello world {i} the answer is {i * 7}" for i in range(300)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(300)))
    data = prepare_sft_data([DataSource(path=str(chats)), DataSource(path=str(docs))], tok, max_seq_len=64, seed=0,
                            val_fraction=0.1)
    as_documents = {tuple(encode_documents(tok, [t])[0] + [tok.eos_token_id]): t for t in texts}
    learnt_whole = [ids for ids, labels in data.train if tuple(ids) in as_documents]
    assert 100 < len(learnt_whole) < 300 and all(labels == [IGNORE] + ids[1:] for ids, labels in data.train
                                                  if tuple(ids) in as_documents)
    held = {as_documents[tuple(ids)] for ids, _ in data.val if tuple(ids) in as_documents}
    assert held == {t for t in texts if held_out(t, 0.1)}  # the documents pretraining holds out at 0.1
    # a document longer than max_seq_len is learnt by its first window: counted, and not a warning
    docs.write_text("".join(json.dumps({"text": "hello world " * 40 + str(i)}) + "\n" for i in range(20)))
    with caplog.at_level("INFO"):
        cut = prepare_sft_data([DataSource(path=str(docs))], tok, max_seq_len=16, seed=0, val_fraction=0.0)
    assert cut.stats["documents cut to max_seq_len"] == 20 and "truncated" not in cut.stats
    assert "20 documents cut to max_seq_len" in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_alpaca_input_sharegpt_system_and_multiturn():
    row = {"instruction": "Add", "input": "7 and 5", "output": "12"}
    assert detect_format([row], "a") == "alpaca"
    assert to_messages(row, "alpaca")[0]["content"] == "Add\n\n7 and 5"
    conv = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "1+1?"},
                              {"from": "gpt", "value": "2"}]}
    assert [m["role"] for m in to_messages(conv, "sharegpt")] == [
        "system", "user", "assistant", "user", "assistant"]
    # format override: a row with both question/answer and prompt/completion columns
    both = {"prompt": "p", "completion": "c", "question": "q", "answer": "a"}
    assert to_messages(both, "question_answer")[0]["content"] == "q"


def test_undetectable_format_error_names_the_file_and_columns():
    with pytest.raises(ValueError) as e:
        detect_format([{"foo": 1, "bar": 2}], "data/my_chats.jsonl")
    msg = str(e.value)
    assert "data/my_chats.jsonl" in msg and "bar, foo" in msg
    for name, fmt in FORMATS.items():
        assert name in msg and all(c in msg for c in fmt.columns)
    assert "format:" in msg


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_pieces(tok, messages):
    """Token ids and expected labels built piece by piece, independently of the template engine."""
    ids, labels = [], []
    for m in messages:
        head = _ids(tok, f"<|im_start|>{m['role']}\n")
        ids += head
        labels += [IGNORE] * len(head)
        body = _ids(tok, m["content"] + "<|im_end|>")
        ids += body
        labels += body if m["role"] == "assistant" else [IGNORE] * len(body)
        nl = _ids(tok, "\n")
        ids += nl
        labels += [IGNORE] * len(nl)
    return ids, labels


MULTI = [{"role": "system", "content": "You add numbers."},
         {"role": "user", "content": "347+1="},
         {"role": "assistant", "content": "348"},
         {"role": "user", "content": "rev c a t"},
         {"role": "assistant", "content": "t a c"}]


@pytest.mark.parametrize("which", ["markers", "offsets"])
def test_mask_equals_expected_token_positions(tok, tok_no_markers, which):
    t = tok if which == "markers" else tok_no_markers
    assert sft.has_generation_markers(t) == (which == "markers")
    ids, labels, truncated = tokenize_conversation(t, MULTI, max_seq_len=512)
    exp_ids, exp_labels = expected_pieces(tok, MULTI)
    assert not truncated
    assert ids == exp_ids
    assert labels == exp_labels
    # Spelled out: exactly the assistant answers' tokens and their <|im_end|> are learned.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    learned = [i for i, l in enumerate(labels) if l != IGNORE]
    assert [tok.decode([ids[i]]) for i in learned] == (
        [tok.decode([x]) for x in _ids(tok, "348")] + ["<|im_end|>"]
        + [tok.decode([x]) for x in _ids(tok, "t a c")] + ["<|im_end|>"])
    assert sum(1 for i in learned if ids[i] == im_end) == 2
    assert ids[-1] == _ids(tok, "\n")[0] and labels[-1] == IGNORE


def test_truncation_is_counted_and_reported(tok, tmp_path, caplog):
    ids, labels, truncated = tokenize_conversation(tok, MULTI, max_seq_len=10)
    assert truncated and len(ids) == len(labels) == 10
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "word " * 30 + str(i), "completion": "ok"} for i in range(6)]
    rows += [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        data = prepare_sft_data([DataSource(path=str(path))], tok, max_seq_len=24, seed=0, val_fraction=0.0)
    assert data.stats["truncated"] == 6
    assert data.stats["dropped_no_target"] == 6  # the answer was cut off entirely
    assert len(data.train) == 30
    assert "truncated" in caplog.text


def test_local_file_held_out_fraction_never_in_training(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                            for i in range(200)))
    data = prepare_sft_data([DataSource(path=str(path))], tok, max_seq_len=64, seed=0, val_fraction=0.2)
    assert 15 <= len(data.val) <= 70 and len(data.train) + len(data.val) == 200
    train = {tuple(ids) for ids, _ in data.train}
    assert not any(tuple(ids) in train for ids, _ in data.val)
    assert data.stats["sources"][0]["validation"] == "held-out share 0.2"
    again = prepare_sft_data([DataSource(path=str(path))], tok, max_seq_len=64, seed=5, val_fraction=0.2)
    assert sorted(again.val) == sorted(data.val)  # the split does not depend on the seed


def test_builtin_tasks_use_their_validation_split(tok):
    data = prepare_sft_data([DataSource(path="builtin:tasks")], tok, max_seq_len=64, seed=0,
                            val_fraction=0.1, max_examples=300)
    assert len(data.train) == 300 and 150 < len(data.val) <= 300  # each held-out prompt once, so fewer may exist
    assert data.stats["sources"][0]["validation"] == "its validation split"
    from llmlab.data.tasks import iter_examples

    val_prompts = {p for _, p, _ in iter_examples("validation")}
    train_prompts = {p for _, p, _ in iter_examples("train", size=300)}
    assert not val_prompts & train_prompts


def test_weights_interleave_and_format_override(tok, tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": "a", "completion": f"{i}", "question": "x",
                                     "answer": "y"}) + "\n" for i in range(100)))
    b.write_text("".join(json.dumps({"instruction": "b", "response": f"{i}"}) + "\n" for i in range(100)))
    data = prepare_sft_data([DataSource(path=str(a), weight=3.0, format="prompt_completion"),
                             DataSource(path=str(b), weight=1.0)], tok, max_seq_len=64, seed=0,
                            val_fraction=0.0, max_examples=40)
    first_user = [tok.decode(ids) for ids, _ in data.train]
    from_a = sum("user\na<|im_end|>" in t for t in first_user)
    assert len(first_user) == 40 and 22 <= from_a <= 38
    with pytest.raises(ValueError, match="b.jsonl"):
        prepare_sft_data([DataSource(path=str(b), format="messages")], tok, 64, 0, 0.0)


def examples(n, seed=0, lo=3, hi=12):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, 300) for _ in range(rng.randint(lo, hi))]
        labels = [IGNORE] * (len(ids) // 2) + ids[len(ids) // 2:]
        out.append((ids, labels))
    return out


def test_padded_batches_and_objective():
    batches = SFTBatches(examples(10), batch_size=4, seed=0, packing=False, max_seq_len=16, pad_id=2)
    b = batches.next_batch()
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE)).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 2).all()
    model = build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                                     vocab_size=320, max_seq_len=64), seed=0)
    obj = LanguageModeling()
    loss, _ = obj(model, b)
    assert torch.isfinite(loss) and int(obj.count(b)) > 0


@pytest.mark.parametrize("packing", [False, True])
def test_batches_resume_exactly_and_cover_each_epoch(packing):
    exs = examples(23)
    run = SFTBatches(exs, batch_size=3, seed=7, packing=packing, max_seq_len=32, pad_id=2)
    full = [run.next_batch() for _ in range(12)]
    part = SFTBatches(exs, batch_size=3, seed=7, packing=packing, max_seq_len=32, pad_id=2)
    for _ in range(5):
        part.next_batch()
    state = part.state_dict()
    resumed = SFTBatches(exs, batch_size=3, seed=7, packing=packing, max_seq_len=32, pad_id=2)
    resumed.load_state_dict(state)
    for want in full[5:]:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # One epoch serves every example exactly once.
    fresh = SFTBatches(exs, batch_size=1, seed=7, packing=False, max_seq_len=32, pad_id=2)
    seen = []
    for _ in range(23):
        row = fresh.next_batch()
        seen.append(tuple(row["input_ids"][0][row["attention_mask"][0] == 1].tolist()))
    assert sorted(seen) == sorted(tuple(ids) for ids, _ in exs)


def test_packing_never_lets_an_example_attend_to_another():
    exs = examples(12, seed=3, lo=4, hi=10)
    batches = SFTBatches(exs, batch_size=2, seed=1, packing=True, max_seq_len=32, pad_id=2)
    b = batches.next_batch()
    assert b["input_ids"].shape == (2, 32)
    model = build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                                     vocab_size=320, max_seq_len=64), seed=0).eval()
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       segment_ids=b["segment_ids"]).logits
        checked = 0
        for r in range(2):
            seg = b["segment_ids"][r]
            pad_seg = int(seg[-1]) if b["attention_mask"][r, -1] == 0 else None
            for s in seg.unique().tolist():
                if s == pad_seg:
                    assert (b["labels"][r][seg == s] == IGNORE).all()
                    continue
                where = (seg == s).nonzero().flatten()
                ids = b["input_ids"][r, where][None]
                alone = model(input_ids=ids).logits[0]
                assert torch.allclose(packed[r, where], alone, atol=1e-5), (r, s)
                assert b["labels"][r, where[0]] == IGNORE
                checked += 1
    assert checked >= 4  # several examples per row really were packed together


def test_eval_batches_fixed_order():
    exs = examples(10)
    batches = eval_batches(exs, batch_size=4, pad_id=2)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert batches[0]["input_ids"][0, :len(exs[0][0])].tolist() == exs[0][0]
