"""Evaluation: held-out perplexity, a unigram baseline, and sample generations.

    metrics = perplexity(model, batches)                 # {"eval/loss": ..., "eval/ppl": ...}
    base = unigram_perplexity(train_tokens, batches, vocab_size)
    report = render_report(results)                      # Markdown comparison table

The eval stage (`stages.run_eval`) scores every model it names on the same held-out batches, so
their numbers compare directly. The unigram baseline (add-one smoothed token frequencies of the
training split) is the bar a model must clear to have learned anything beyond token counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from llmlab.train.objectives import target_count, token_nll_sum


def perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity over fixed batches of token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x in batches:
            x = x.to(device)
            total += token_nll_sum(model(input_ids=x).logits, x).double().cpu()
            count += int(target_count(x))
    if was_training:
        model.train()
    loss = float(total / max(count, 1))
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def unigram_perplexity(train_tokens: np.ndarray, batches: list[torch.Tensor], vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model fitted on `train_tokens`, scored on the same
    targets `perplexity` scores (every position but each row's first)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nll, n = 0.0, 0
    for x in batches:
        targets = x[:, 1:].reshape(-1).numpy()
        nll -= float(logp[targets].sum())
        n += targets.size
    return math.exp(nll / max(n, 1))


def render_report(results: dict[str, Any]) -> str:
    """A Markdown report: one row per model, then each model's sample generations."""
    models = results["models"]
    lines = [f"# Evaluation: {results['pipeline']} / {results['stage']}", "",
             f"Held-out text: {results['val_tokens']:,} tokens scored per model "
             f"({results['batches']} batches x {results['batch_size']} x {results['seq_len']}).", "",
             "| model | eval loss | perplexity | unigram perplexity |", "|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {m['eval/loss']:.4f} | {m['eval/ppl']:.2f} | {m['unigram_ppl']:.2f} |")
    lines += ["", "## Samples (greedy)" if results["temperature"] == 0 else "## Samples", ""]
    for prompt_i, prompt in enumerate(results["prompts"]):
        lines.append(f"**Prompt:** `{prompt}`")
        lines.append("")
        for name, m in models.items():
            sample = m["samples"][prompt_i].replace("\n", "⏎")
            lines.append(f"- {name}: `{sample}`")
        lines.append("")
    return "\n".join(lines)
