"""Tokenizer training, round trips, the ChatML template and its assistant mask, loading."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest

from llmlab.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)


def corpus():
    # Seeded pseudo-words give BPE enough distinct pairs to fill a 400-token vocabulary.
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 7)))
             for _ in range(300)]
    texts = []
    for i in range(400):
        texts.append(" ".join(rng.choice(words) for _ in range(12))
                     + f" is {i * 37 % 1000}. Return {2024 + i % 5} values, then 1234567890.")
    texts.append("Unicode: héllo wörld 世界 😀 naïve café")
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


MESSAGES = [
    {"role": "user", "content": "What is 7+5?"},
    {"role": "assistant", "content": "The answer is 12."},
    {"role": "user", "content": "And 2024+1?"},
    {"role": "assistant", "content": "2025"},
]


def test_vocab_size_counts_special_tokens(tok):
    assert len(tok) == 400
    for special in (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
        assert special in tok.get_vocab()
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.padding_side == "left"


@pytest.mark.parametrize("text", [
    "Return the value 1234567890.",
    "héllo wörld 世界 😀 naïve café — ∑ x² ≠ ∞",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
    "unseen characters: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_each_digit_is_its_own_token(tok):
    text = "1234567890 and 2024, 99 red balloons"
    tokens = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), digit_tokens
    assert "".join(digit_tokens) == "1234567890202499"


def test_chat_template_renders_chatml(tok):
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat is 7+5?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 12.<|im_end|>\n"
        "<|im_start|>user\nAnd 2024+1?<|im_end|>\n"
        "<|im_start|>assistant\n2025<|im_end|>\n"
    )


def test_generation_prompt(tok):
    rendered = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 7+5?<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_exactly_assistant_content_and_end_token(tok):
    out = tok.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])

    # Expected independently: encode the rendered pieces one by one, marking assistant pieces.
    pieces = [
        ("<|im_start|>user\nWhat is 7+5?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("The answer is 12.<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd 2024+1?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("2025<|im_end|>", 1),
        ("\n", 0),
    ]
    expected_ids, expected_mask = [], []
    for text, flag in pieces:
        piece_ids = tok.encode(text, add_special_tokens=False)
        expected_ids += piece_ids
        expected_mask += [flag] * len(piece_ids)
    assert ids == expected_ids
    assert mask == expected_mask
    im_end = tok.convert_tokens_to_ids(IM_END_TOKEN)
    assert [i for i, m in zip(ids, mask) if m].count(im_end) == 2


def test_save_and_load(tok_dir, tok):
    again = load_tokenizer(str(tok_dir))
    text = "Return 42 values — ünïcode"
    assert again.encode(text) == tok.encode(text)
    assert again.chat_template == CHAT_TEMPLATE
    assert len(again) == len(tok)


def test_training_is_deterministic(tmp_path, tok_dir):
    train_tokenizer(corpus(), vocab_size=400, out_dir=tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert tokenizer_fingerprint(tmp_path / "again") == tokenizer_fingerprint(tok_dir)


def test_fingerprint_changes_with_content(tmp_path, tok_dir):
    train_tokenizer(corpus()[:200], vocab_size=300, out_dir=tmp_path / "other")
    assert tokenizer_fingerprint(tmp_path / "other") != tokenizer_fingerprint(tok_dir)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))


def test_load_sets_template_only_for_our_special_tokens(tmp_path, tok_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Ours without a template: the template comes back because the ChatML tokens are there.
    ours = load_tokenizer(str(tok_dir))
    ours.chat_template = None
    ours.save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "chat_template.jinja").unlink(missing_ok=True)
    assert load_tokenizer(str(tmp_path / "ours")).chat_template == CHAT_TEMPLATE

    # A foreign tokenizer with only an EOS token: pad falls back to EOS, no template is invented.
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    foreign.save_pretrained(tmp_path / "foreign")
    loaded = load_tokenizer(str(tmp_path / "foreign"))
    assert loaded.pad_token == "</s>"
    assert loaded.padding_side == "left"
    assert not loaded.chat_template
