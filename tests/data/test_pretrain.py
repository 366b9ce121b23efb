"""Tokenized pretraining data: packing, train/val split, caching, sampling and resuming."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json
import random

import numpy as np
import pytest
import torch

from llmlab.data import pretrain
from llmlab.data.sources import DataSource
from llmlab.data.pretrain import BlockSampler, eval_batches, is_validation, prepare_pretrain_data
from llmlab.tokenizer import train_tokenizer


def make_docs(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "list", "ünï", "世界"]
    return [f"Doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            for i in range(n)]


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(make_docs(300, seed=1), vocab_size=350, out_dir=out)
    return str(out)


@pytest.fixture
def docs_file(tmp_path):
    docs = make_docs(500)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, docs


def source(path, weight=1.0):
    return DataSource(path=str(path), weight=weight)


def split_on_eos(path, dtype, eos_id):
    tokens = np.fromfile(path, dtype=dtype).tolist()
    docs, current = [], []
    for t in tokens:
        if t == eos_id:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert current == []  # the stream ends with EOS
    return docs


def test_documents_are_separated_by_eos(tok_dir, docs_file):
    from llmlab.tokenizer import load_tokenizer

    path, docs = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=16, seed=0, val_fraction=0.0,
                                 max_tokens=None)
    tok = load_tokenizer(tok_dir)
    assert data.meta["dtype"] == "uint16"
    assert data.meta["eos_id"] == tok.eos_token_id
    pieces = split_on_eos(data.train_path, np.uint16, tok.eos_token_id)
    assert [tok.decode(p) for p in pieces] == docs
    assert data.meta["train_docs"] == len(docs) and data.meta["val_docs"] == 0
    assert data.meta["train_tokens"] == sum(len(p) + 1 for p in pieces)


def test_special_token_text_inside_documents_stays_text(tok_dir, tmp_path):
    from llmlab.tokenizer import load_tokenizer

    path = tmp_path / "quotes.jsonl"
    docs = ["The template emits <|im_start|>user and ends with <|eos|> here.", "second doc"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=4, seed=0, val_fraction=0.0,
                                 max_tokens=None)
    tok = load_tokenizer(tok_dir)
    tokens = np.fromfile(data.train_path, dtype=np.uint16).tolist()
    assert tokens.count(tok.eos_token_id) == 2
    assert tok.convert_tokens_to_ids("<|im_start|>") not in tokens
    assert [tok.decode(p) for p in split_on_eos(data.train_path, np.uint16, tok.eos_token_id)] == docs


def test_train_and_val_are_disjoint_by_document(tok_dir, docs_file):
    from llmlab.tokenizer import load_tokenizer

    path, docs = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=16, seed=0, val_fraction=0.2,
                                 max_tokens=None)
    tok = load_tokenizer(tok_dir)
    train = {tok.decode(p) for p in split_on_eos(data.train_path, np.uint16, tok.eos_token_id)}
    val = {tok.decode(p) for p in split_on_eos(data.val_path, np.uint16, tok.eos_token_id)}
    assert train.isdisjoint(val)
    assert train | val == set(docs)
    assert 40 < len(val) < 160  # ~20% of 500
    assert all(is_validation(d, 0.2) for d in val)


def test_is_validation_is_stable():
    docs = make_docs(2000)
    first = [is_validation(d, 0.1) for d in docs]
    assert first == [is_validation(d, 0.1) for d in docs]
    assert 120 < sum(first) < 280
    assert not any(is_validation(d, 0.0) for d in docs)


def test_second_call_reads_the_cache(tok_dir, docs_file, monkeypatch):
    path, _ = docs_file
    args = dict(tokenizer_dir=tok_dir, seq_len=16, seed=0, val_fraction=0.1, max_tokens=None)
    first = prepare_pretrain_data([source(path)], **args)
    assert not first.from_cache
    assert not prepare_pretrain_data([source(path)], **{**args, "seed": 1}).from_cache

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(pretrain, "encode_documents", no_tokenizing)
    # seq_len is not part of the key: the same files serve any context length.
    second = prepare_pretrain_data([source(path)], **{**args, "seq_len": 64})
    assert second.from_cache
    assert second.train_path == first.train_path
    assert second.meta == first.meta


def test_max_tokens_and_source_shares(tok_dir, tmp_path, docs_file):
    path, _ = docs_file
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(make_docs(500, seed=7)), encoding="utf-8")
    data = prepare_pretrain_data([source(path, 1.0), source(other, 3.0)], tok_dir, seq_len=16,
                                 seed=0, val_fraction=0.0, max_tokens=3000)
    assert data.meta["train_tokens"] == 3000
    assert data.train_path.stat().st_size == 3000 * 2
    shares = [s["share"] for s in data.meta["sources"]]
    assert abs(sum(shares) - 1) < 1e-9
    assert 0.1 < shares[0] < 0.4  # expected 0.25


def test_sampler_resume_equals_uninterrupted(tok_dir, docs_file):
    path, _ = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=16, seed=0, val_fraction=0.0,
                                 max_tokens=None)
    reference = BlockSampler(data.train_path, seq_len=16, batch_size=5, seed=3)
    # Enough batches to cross several epoch boundaries.
    epochs_worth = 3 * reference.num_blocks // 5 + 2
    expected = [reference.next_batch() for _ in range(epochs_worth)]

    first = BlockSampler(data.train_path, seq_len=16, batch_size=5, seed=3)
    cut = epochs_worth // 2 + 1
    got = [first.next_batch() for _ in range(cut)]
    resumed = BlockSampler(data.train_path, seq_len=16, batch_size=5, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch() for _ in range(epochs_worth - cut)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert expected[0].dtype == torch.int64 and expected[0].shape == (5, 16)
    assert reference.state_dict()["epoch"] >= 2


def test_sampler_serves_every_block_once_per_epoch(tok_dir, docs_file):
    path, _ = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=8, seed=0, val_fraction=0.0,
                                 max_tokens=None)
    tokens = np.fromfile(data.train_path, dtype=np.uint16).astype(np.int64)
    sampler = BlockSampler(data.train_path, seq_len=8, batch_size=1, seed=0)
    blocks = tokens[: sampler.num_blocks * 8].reshape(-1, 8)
    served = torch.cat([sampler.next_batch() for _ in range(sampler.num_blocks)]).numpy()
    assert sorted(map(tuple, served)) == sorted(map(tuple, blocks))
    assert not np.array_equal(served, blocks)  # shuffled
    assert sampler.next_batch().shape == (1, 8) and sampler.state_dict()["epoch"] == 1


def test_eval_batches_are_consecutive_and_deterministic(tok_dir, docs_file):
    path, _ = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=8, seed=0, val_fraction=0.3,
                                 max_tokens=None)
    a = eval_batches(data.val_path, seq_len=8, batch_size=4, max_batches=3)
    b = eval_batches(data.val_path, seq_len=8, batch_size=4, max_batches=3)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    tokens = np.fromfile(data.val_path, dtype=np.uint16).astype(np.int64)
    assert torch.equal(torch.cat(a), torch.from_numpy(tokens[: 12 * 8].reshape(12, 8)))


def test_too_little_data_says_how_much(tok_dir, docs_file):
    path, _ = docs_file
    data = prepare_pretrain_data([source(path)], tok_dir, seq_len=8, seed=0, val_fraction=0.0,
                                 max_tokens=100)
    with pytest.raises(ValueError, match=r"has 100 tokens.*4 x 64 needs 256"):
        BlockSampler(data.train_path, seq_len=64, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"has 100 tokens.*seq_len=128"):
        eval_batches(data.train_path, seq_len=128, batch_size=1, max_batches=1)
    with pytest.raises(ValueError, match=r"training stream has 100 tokens"):
        prepare_pretrain_data([source(path)], tok_dir, seq_len=128, seed=1, val_fraction=0.0,
                              max_tokens=100)


def test_document_masks_give_each_packed_document_the_losses_it_has_alone():
    import torch.nn.functional as F

    from llmlab.data.pretrain import document_segments
    from llmlab.model import LlmlabConfig, build_model

    EOS = 1
    torch.manual_seed(0)
    model = build_model(LlmlabConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                                     max_seq_len=32, positional_encoding="rope"), seed=0).eval()
    docs = [torch.randint(2, 50, (n,)).tolist() + [EOS] for n in (6, 9, 4)]  # three documents, each ending in EOS
    row = torch.tensor([sum(docs, [])])
    segments, labels = document_segments(row, EOS)
    assert segments.tolist() == [[0] * 7 + [1] * 10 + [2] * 5]
    starts = [0, 7, 17]
    assert [labels[0, s].item() for s in starts[1:]] == [-100, -100] and labels[0, 0].item() == row[0, 0].item()
    with torch.no_grad():
        packed = model(input_ids=row, segment_ids=segments).logits[0]
        target = F.pad(labels[0, 1:], (0, 1), value=-100)
        packed_loss = F.cross_entropy(packed, target, ignore_index=-100, reduction="none")
        plain = model(input_ids=row).logits[0]  # without the masks, later documents see earlier ones
        for start, doc in zip(starts, docs):
            ids = torch.tensor([doc])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
            alone_loss = F.cross_entropy(alone[:-1], ids[0, 1:], reduction="none")
            torch.testing.assert_close(packed_loss[start:start + len(doc) - 1], alone_loss, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain[7:17], packed[7:17], atol=1e-3)
        assert packed_loss[6].item() == 0.0 and packed_loss[16].item() == 0.0  # EOS -> next document's first token


def test_pretrain_batches_carry_document_segments_when_asked():
    from llmlab.data.pretrain import LMBatches

    class Fixed:
        batch_size = 1

        def next_batch(self):
            return torch.tensor([[5, 6, 1, 7, 8, 1, 9]])

    plain, masked = LMBatches(Fixed()).next_batch(), LMBatches(Fixed(), eos_id=1).next_batch()
    assert "segment_ids" not in plain and torch.equal(plain["labels"], plain["input_ids"])
    assert masked["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    assert masked["labels"].tolist() == [[5, 6, 1, -100, 8, 1, -100]]
