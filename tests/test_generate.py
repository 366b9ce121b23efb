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


# ----------------------------------------------------------------------- stock transformers models


def stock(family: str):
    """A tiny random stock transformers causal LM of `family`, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":  # learned absolute positions, fused qkv
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=64, **{
            k: v for k, v in common.items() if k != "max_position_embeddings"})).eval()
    llama_like = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      num_hidden_layers=2, **common)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    return cls[1](cls[0](**llama_like)).eval()


FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [3], [11, 12, 13]]  # unequal lengths: rows 1 and 2 are left-padded


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_on_a_stock_model_equals_its_own_generate(family):
    model = stock(family)
    model.generation_config.eos_token_id = None  # run the full length in both
    ids, mask = left_pad(PROMPTS)
    ours = sample(model, ids, mask, max_new_tokens=10, eos_token_id=None, temperature=0.0)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                min_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours.tokens, theirs[:, ids.size(1):])
    for row, prompt in enumerate(PROMPTS):  # and each row equals itself alone, unpadded
        alone = sample(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 10, None,
                       temperature=0.0)
        assert alone.tokens[0].tolist() == ours.tokens[row].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_log_probs_equal_a_full_forward_pass(family):
    from llmlab.train.rollout import policy_logps

    model = stock(family)
    ids, mask = left_pad(PROMPTS)
    out = sample(model, ids, mask, max_new_tokens=8, eos_token_id=[2], temperature=0.8,
                 generator=torch.Generator().manual_seed(3))
    completion_mask = (torch.arange(out.tokens.size(1))[None] < out.lengths[:, None]).long()
    full_ids = torch.cat([ids, out.tokens], dim=1)
    full_mask = torch.cat([mask, completion_mask], dim=1)
    with torch.no_grad():
        _, logps, _, _ = policy_logps(model, full_ids, full_mask, ids.size(1), 0.8)
    torch.testing.assert_close(out.logprobs * completion_mask, logps * completion_mask, atol=1e-4, rtol=0)


def test_our_model_speaks_the_same_cache_protocol(model):
    ids, mask = left_pad(PROMPTS)
    ours = sample(model, ids, mask, max_new_tokens=6, eos_token_id=None, temperature=0.0)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                min_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.tokens, theirs[:, ids.size(1):])


@pytest.mark.parametrize("pe", ["rope", "sinusoidal", "yarn"])
def test_the_static_cache_decoder_gives_the_dynamic_paths_tokens_and_log_probs(pe):
    from llmlab.generate import decode_mode

    extra = {"yarn_scale": 2.0, "yarn_original_max_seq_len": 32} if pe == "yarn" else {}
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=V, max_seq_len=64,
                       positional_encoding=pe, **extra)
    model = build_model(cfg, seed=5).eval()
    assert decode_mode(model, "auto") == "dynamic"  # CPU: the dynamic path unless asked
    ids, mask = left_pad([[5, 9, 2, 7], [3], [11, 4, 8, 1, 6, 2], [7, 7]])
    greedy = {m: sample(model, ids, mask, 12, eos_token_id=2, temperature=0.0, decode=m) for m in ("dynamic", "static")}
    assert torch.equal(greedy["static"].tokens, greedy["dynamic"].tokens)
    assert torch.equal(greedy["static"].lengths, greedy["dynamic"].lengths)
    torch.testing.assert_close(greedy["static"].logprobs, greedy["dynamic"].logprobs, rtol=1e-5, atol=1e-5)
    for row, prompt in enumerate([[5, 9, 2, 7], [3], [11, 4, 8, 1, 6, 2], [7, 7]]):  # and each row's output alone
        n = int(greedy["static"].lengths[row])
        assert greedy["static"].tokens[row, :n].tolist() == greedy_without_cache(model, prompt, 12)[:n]
    drawn = {m: sample(model, ids, mask, 10, eos_token_id=None, temperature=1.0, decode=m,
                       generator=torch.Generator().manual_seed(0)).tokens for m in ("dynamic", "static")}
    assert torch.equal(drawn["static"], drawn["dynamic"])


def test_models_the_static_decoder_cannot_serve_take_the_dynamic_path():
    from llmlab.generate import decode_mode

    alibi = build_model(LlmlabConfig(d_model=32, n_heads=4, d_ff=64, n_layers=1, vocab_size=V, max_seq_len=32,
                                     positional_encoding="alibi"), seed=0)
    window = build_model(LlmlabConfig(d_model=32, n_heads=4, d_ff=64, n_layers=1, vocab_size=V, max_seq_len=32,
                                      sliding_window=8), seed=0)
    assert decode_mode(alibi, "static") == "dynamic" and decode_mode(window, "static") == "dynamic"
    with pytest.raises(ValueError, match="auto, static or dynamic"):
        decode_mode(window, "fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_graph_captured_static_step_gives_the_eager_tokens():
    cfg = LlmlabConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=V, max_seq_len=64)
    model = build_model(cfg, seed=5).eval().cuda()
    ids, mask = left_pad([[5, 9, 2, 7], [3], [11, 4, 8, 1, 6, 2], [7, 7]])
    ids, mask = ids.cuda(), mask.cuda()
    dynamic = sample(model, ids, mask, 16, eos_token_id=None, temperature=0.0, decode="dynamic")
    static = sample(model, ids, mask, 16, eos_token_id=None, temperature=0.0, decode="static")  # compiled, CUDA graph
    assert torch.equal(static.tokens, dynamic.tokens)
