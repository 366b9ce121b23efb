"""Evaluation numbers against independent computations."""

import math

import numpy as np
import pytest
import torch

from llmlab.evaluate import perplexity, unigram_perplexity
from llmlab.report import render_report
from llmlab.model import LlmlabConfig, build_model


def test_perplexity_equals_mean_cross_entropy_computed_by_hand():
    model = build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=40, max_seq_len=16), seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 40, (3, 12), generator=g), torch.randint(0, 40, (2, 12), generator=g)]
    nll, n = 0.0, 0
    with torch.no_grad():
        for x in batches:
            logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)
            for b in range(x.shape[0]):
                for t in range(x.shape[1] - 1):
                    nll -= float(logp[b, t, x[b, t + 1]])
                    n += 1
    got = perplexity(model, batches)
    assert got["eval/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["eval/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_unigram_perplexity_by_hand():
    train = np.array([0, 0, 0, 1])  # counts +1 smoothing over vocab 3: [4, 2, 1] / 7
    batches = [torch.tensor([[2, 0, 1]])]  # targets 0 and 1
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2)
    assert unigram_perplexity(train, batches, 3) == pytest.approx(expected)


def test_report_lists_every_model_and_sample():
    results = {"pipeline": "p", "stage": "eval", "val_tokens": 100, "batches": 1, "batch_sequences": 1, "seq_len": 8,
               "temperature": 0.0, "prompts": ["Hi"], "model_order": ["a", "b"],
               "models": {"a": {"eval/loss": 1.0, "eval/ppl": 2.7, "unigram_ppl": 9.0, "samples": ["x\ny"]},
                          "b": {"eval/loss": 2.0, "eval/ppl": 7.4, "unigram_ppl": 9.0, "samples": ["z"]}}}
    text = render_report(results)
    assert "| a | 1.0000 | 2.70 | 9.00 |" in text and "| b | 2.0000 | 7.40 | 9.00 |" in text
    assert "- a: `x⏎y`" in text and "- b: `z`" in text
    assert "Warning" not in text  # both beat the unigram baseline


def test_report_says_what_each_metric_was_measured_on_and_flags_a_model_worse_than_unigram():
    results = {"pipeline": "p", "stage": "eval", "val_tokens": 100, "batches": 1, "batch_sequences": 1, "seq_len": 8,
               "temperature": 0.0, "prompts": [], "model_order": ["pre", "sft"], "text_sources": ["builtin:stdlib"],
               "preference_sources": ["pairs.jsonl"], "tasks": {"prompts": 8, "sources": [{"path": "builtin:tasks"}]},
               "preferences": {"pairs": 4},
               "models": {"pre": {"eval/loss": 4.8, "eval/ppl": 120.0, "unigram_ppl": 591.0, "samples": []},
                          "sft": {"eval/loss": 13.3, "eval/ppl": 616001.0, "unigram_ppl": 591.0, "samples": []}}}
    text = render_report(results)
    assert "held-out share of `builtin:stdlib`" in text and "8 held-out task prompts from `builtin:tasks`" in text
    assert "4 held-out pairs from `pairs.jsonl`" in text
    warning = next(line for line in text.splitlines() if line.startswith("**Warning:**"))
    assert warning.startswith("**Warning:** sft has a text perplexity above the unigram baseline")  # sft alone
    assert "| sft | 13.3000 | 616,001.00 | 591.00 |" in text


def test_the_html_report_renders_tables_and_carries_its_plots():
    from llmlab.report import markdown_to_html

    page = markdown_to_html("# T\n\nsome `code` and **bold**\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n- item\n\n"
                            "![plot](p.png)\n", {"p.png": b"\x89PNG"})
    assert "<h1>T</h1>" in page and "<code>code</code>" in page and "<strong>bold</strong>" in page
    assert "<thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>&lt;2&gt;</td></tr></tbody>" in page
    assert "|---|" not in page and "<li>item</li>" in page
    assert '<img alt="plot" src="data:image/png;base64,iVBORw==">' in page and "![plot]" not in page


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from llmlab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("evalmodel")
    tok = train_tokenizer([f"{i}+1={i + 1} sort 321 rev a b" for i in range(300)], 320, d)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return build_model(cfg, seed=1).eval(), tok


def test_preference_accuracy_against_log_probs_summed_by_hand(chat_model):
    from llmlab.data.preference import tokenize_pair
    from llmlab.evaluate import preference_accuracy

    model, tok = chat_model
    raw = [("3+1=", "4", "5"), ("sort 321", "123", "132"), ("7+1=", "8", "9"), ("rev a b", "b a", "a b")]
    pairs = [tokenize_pair(tok, [{"role": "user", "content": p}], c, r, 64) for p, c, r in raw]

    def logp(ids, labels):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100)

    expected = sum(logp(p["chosen_ids"], p["chosen_labels"]) > logp(p["rejected_ids"], p["rejected_labels"]) for p in pairs)
    assert preference_accuracy(model, pairs, tok.pad_token_id, batch_size=3) == pytest.approx(expected / len(pairs))


def test_exact_match_accuracy_against_greedy_decoding_by_hand(chat_model):
    from llmlab.data.tasks import exact_match
    from llmlab.evaluate import exact_match_accuracy

    model, tok = chat_model
    prompts = ["3+1=", "sort 321", "rev a b"]
    completions = []
    for p in prompts:  # uncached greedy decoding, one prompt at a time
        ids = tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
                break
            new.append(nxt)
        completions.append(tok.decode(new))
    answers = [completions[0], "nope", completions[2]]  # two answers equal what greedy decoding gives
    acc, got = exact_match_accuracy(model, tok, list(zip(prompts, answers)), max_new_tokens=6)
    assert got == completions
    assert acc == pytest.approx(sum(exact_match(c, a) for c, a in zip(completions, answers)) / 3)


@pytest.mark.parametrize("hits,n", [(0, 10), (3, 10), (10, 10), (57, 200)])
def test_wilson_bounds_are_where_the_score_test_statistic_equals_z(hits, n):
    from llmlab.evaluate import wilson_interval

    # independent check: a Wilson bound p0 solves |p_hat - p0| / sqrt(p0 (1 - p0) / n) = z (the score test)
    low, high = wilson_interval(hits, n)
    p_hat = hits / n
    for bound in (low, high):
        if 0 < bound < 1:
            assert abs(p_hat - bound) / math.sqrt(bound * (1 - bound) / n) == pytest.approx(1.96, rel=1e-9)
    assert low <= p_hat <= high and (low == 0) == (hits == 0) and (high == 1) == (hits == n)


def test_report_shows_intervals_and_a_row_per_task_family():
    from llmlab.evaluate import proportion

    em = proportion([True] * 6 + [False] * 4)
    results = {"pipeline": "p", "stage": "eval", "val_tokens": 10, "batches": 1, "batch_sequences": 1, "seq_len": 10,
               "temperature": 0.0, "prompts": [], "model_order": ["m"], "tasks": {"prompts": 10},
               "models": {"m": {"eval/loss": 1.0, "eval/ppl": 2.7, "unigram_ppl": 9.0, "samples": [],
                                "exact_match": em["value"], "exact_match_ci": em["ci"],
                                "exact_match_by_family": {"add": {"value": 0.75, "n": 4}, "sort": {"value": 0.5, "n": 6}},
                                "preference_accuracy_by_family": {"plus": {"value": 0.25, "n": 8}}}}}
    text = render_report(results)
    low, high = em["ci"]
    assert f"0.600 ({low:.2f}-{high:.2f})" in text, text
    assert "| model | add | sort |" in text and "| m | 0.750 (n=4) | 0.500 (n=6) |" in text
    pa = text.split("## Preference accuracy per task family", 1)[1]
    assert "| model | plus |" in pa and "| m | 0.250 (n=8) |" in pa


def test_by_family_groups_hits_in_sorted_families_and_skips_unnamed_ones():
    from llmlab.evaluate import by_family

    by = by_family(["sort", None, "add", "sort", "add", "add"], [True, True, False, False, True, True])
    assert list(by) == ["add", "sort"]
    assert (by["add"]["value"], by["add"]["n"]) == (pytest.approx(2 / 3), 3)
    assert (by["sort"]["value"], by["sort"]["n"]) == (pytest.approx(1 / 2), 2)
    assert by_family([None, None], [True, False]) == {}


def test_preference_accuracy_per_family_counts_each_pair_in_its_family():
    from llmlab.evaluate import score_preferences

    wins = [True, False, True, True, False]
    pairs = [{"family": "plus"}, {"family": "plus"}, {"family": "sort"}, {"family": "plus"}, {"family": "sort"}]
    scores: dict = {}
    score_preferences(wins, pairs, scores)
    assert scores["preference_accuracy"] == pytest.approx(3 / 5)
    by = scores["preference_accuracy_by_family"]
    assert (by["plus"]["value"], by["plus"]["n"]) == (pytest.approx(2 / 3), 3)
    assert (by["sort"]["value"], by["sort"]["n"]) == (pytest.approx(1 / 2), 2)
    unnamed: dict = {}
    score_preferences(wins, [{} for _ in wins], unnamed)
    assert "preference_accuracy_by_family" not in unnamed and unnamed["preference_accuracy"] == pytest.approx(3 / 5)


def test_a_series_equal_to_another_is_drawn_once_under_both_names():
    from llmlab.report import _distinct

    series = {"eval/reward_mean": [(1, 0.5), (2, 0.7)], "eval/exact_match": [(1, 0.5), (2, 0.7)], "rl/reward_mean": [(1, 0.2)]}
    drawn = _distinct([(k, k) for k in ("rl/reward_mean", "eval/reward_mean", "eval/exact_match")], series.get)
    assert drawn == [("rl/reward_mean", "rl/reward_mean"), ("eval/reward_mean", "eval/reward_mean = eval/exact_match")]
