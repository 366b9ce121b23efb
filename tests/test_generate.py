"""Batched KV-cached sampling: padding-invariant, equal to uncached decoding, stops at EOS."""

import pytest
import torch

from llmlab.generate import _filter_logits, sample
from llmlab.model import LlmlabConfig, build_model

V = 48


@pytest.fixture(scope="module")
def model():
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=V, max_seq_len=64)
    return build_model(cfg, seed=3).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_batched_left_padded_greedy_equals_one_by_one_without_cache(model):
    prompts = [[5, 6, 7, 8, 9, 10], [3], [11, 12, 13]]
    ids, mask = left_pad(prompts)
    out = sample(model, ids, mask, max_new_tokens=8, eos_token_id=None, temperature=0.0)
    for row, prompt in zip(out.tokens.tolist(), prompts):
        assert row == greedy_without_cache(model, prompt, 8)
    assert out.lengths.tolist() == [8, 8, 8]


def test_eos_stops_a_row_and_pads_after_it(model):
    prompt = [5, 6, 7]
    free = greedy_without_cache(model, prompt, 6)
    eos = free[2]  # make the third generated token the EOS
    ids, mask = left_pad([prompt, [9, 9, 9]])
    out = sample(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0, temperature=0.0)
    first = out.tokens[0].tolist()
    stop = free.index(eos) + 1
    assert first[:stop] == free[:stop] and all(t == 0 for t in first[stop:])
    assert out.lengths[0] == stop


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    a = sample(model, ids, mask, 6, None, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, ids, mask, 6, None, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)
    g = sample(model, ids, mask, 6, None, temperature=0.0)
    k1 = sample(model, ids, mask, 6, None, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g.tokens, k1.tokens)


def test_filter_logits_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]
