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

from llmlab.data.formats import PROMPTS
from llmlab.data.reader import read
from llmlab.data.sources import DataSource, DataSourceError
from llmlab.train.objectives import target_count, token_nll_sum


def perplexity(model: torch.nn.Module, batches: list[torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity over fixed batches: token-id tensors (every token
    is a target) or batch dicts whose `labels` mask what counts (e.g. assistant tokens only)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            if not isinstance(batch, dict):
                batch = {"input_ids": batch, "labels": batch}
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            total += token_nll_sum(model(**batch).logits, labels).double().cpu()
            count += int(target_count(labels))
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


def checkable_prompts(sources: list[DataSource], limit: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the named split of each source (read whole: held-out task
    prompts, never trained on), up to `limit` in all: rows in a prompt format (a `prompt` column or
    chat `messages`) with an `answer` column. A multi-turn prompt is scored by its last user turn."""
    pairs: list[tuple[str, str]] = []
    for source in sources:
        examples = read([source], PROMPTS, lambda item, report: item, seed=0, val_fraction=0.0,
                        max_train=limit - len(pairs), hold_out=False)
        for messages, text, extras in examples.train:
            if "answer" not in extras:
                raise DataSourceError(f"eval tasks source {source.path!r}: rows need an `answer` column (and a `prompt` "
                                      f"or `messages` column); found {sorted(['prompt' if text else 'messages', *extras])}")
            pairs.append((text if text is not None else messages[-1]["content"], str(extras["answer"])))
        if len(pairs) >= limit:
            break
    return pairs[:limit]


def render_user_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn of the tokenizer's chat template (with the generation prompt), or
    as it is when the tokenizer has no template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template else p for p in prompts]


def exact_match_accuracy(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 16,
                         batch_size: int = 64, with_stop: bool = False) -> tuple[float, list[str]]:
    """Share of prompts whose greedy completion is exactly the answer, and the completions (ending
    with their stop token's text when `with_stop`, as RL rollouts are scored). Prompts are rendered
    with the tokenizer's chat template when it has one (instruction-tuned use), else used as they are."""
    from llmlab.data.tasks import exact_match
    from llmlab.generate import generate

    rendered = render_user_prompts(tokenizer, [p for p, _ in pairs])
    completions: list[str] = []
    for i in range(0, len(rendered), batch_size):
        completions += generate(model, tokenizer, rendered[i:i + batch_size], max_new_tokens, temperature=0.0,
                                keep_stop=with_stop)
    hits = [exact_match(c, a) for c, (_, a) in zip(completions, pairs)]
    return sum(hits) / max(len(hits), 1), completions


def preference_accuracy(model: torch.nn.Module, pairs: list[dict], pad_id: int, batch_size: int = 32) -> float:
    """Share of held-out pairs whose chosen response the model finds more likely than the rejected
    one (summed log-probabilities of the response tokens)."""
    from llmlab.data.preference import eval_batches
    from llmlab.train.dpo import sequence_logps

    device = next(model.parameters()).device
    correct = total = 0
    with torch.no_grad():
        for batch in eval_batches(pairs, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
            half = logps.shape[0] // 2
            correct += int((logps[:half] > logps[half:]).sum())
            total += half
    return correct / max(total, 1)


def render_report(results: dict[str, Any]) -> str:
    """A Markdown report: one row per model, then each model's sample generations."""
    models = {name: results["models"][name] for name in results["model_order"]}  # JSON files sort keys
    lines = [f"# Evaluation: {results['pipeline']} / {results['stage']}", "",
             f"Held-out text: {results['val_tokens']:,} tokens scored per model "
             f"({results['batches']} batches x {results['batch_sequences']} x {results['seq_len']}).", "",
             "| model | eval loss | perplexity | unigram perplexity | exact match | preference accuracy | mean reward |",
             "|---|---|---|---|---|---|---|"]

    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "–"

    for name, m in models.items():
        lines.append(f"| {name} | {m['eval/loss']:.4f} | {m['eval/ppl']:.2f} | {m['unigram_ppl']:.2f} | "
                     f"{cell(m, 'exact_match')} | {cell(m, 'preference_accuracy')} | {cell(m, 'reward_mean')} |")
    lines += ["", "## Samples (greedy)" if results["temperature"] == 0 else "## Samples", ""]
    for prompt_i, prompt in enumerate(results["prompts"]):
        lines.append(f"**Prompt:** `{prompt}`")
        lines.append("")
        for name, m in models.items():
            sample = m["samples"][prompt_i].replace("\n", "⏎")
            lines.append(f"- {name}: `{sample}`")
        lines.append("")
    return "\n".join(lines)
