"""Evaluation numbers against independent computations."""

import math

import numpy as np
import pytest
import torch

from llmlab.evaluate import perplexity, render_report, unigram_perplexity
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
    results = {"pipeline": "p", "stage": "eval", "val_tokens": 100, "batches": 1, "batch_size": 1, "seq_len": 8,
               "temperature": 0.0, "prompts": ["Hi"], "model_order": ["a", "b"],
               "models": {"a": {"eval/loss": 1.0, "eval/ppl": 2.7, "unigram_ppl": 9.0, "samples": ["x\ny"]},
                          "b": {"eval/loss": 2.0, "eval/ppl": 7.4, "unigram_ppl": 9.0, "samples": ["z"]}}}
    text = render_report(results)
    assert "| a | 1.0000 | 2.70 | 9.00 |" in text and "| b | 2.0000 | 7.40 | 9.00 |" in text
    assert "- a: `x⏎y`" in text and "- b: `z`" in text
