"""Evaluation: held-out perplexity, a unigram baseline, and sample generations.

    metrics = perplexity(model, batches)                 # {"eval/loss": ..., "eval/ppl": ...}
    base = unigram_perplexity(train_tokens, batches, vocab_size)
    tasks = checkable_prompts(sources, limit=500)        # held-out prompts with one right answer
    proportion([True, False, True])                      # {"value", "n", "ci": Wilson 95% interval}

The eval stage (`llmlab.runners.eval`) scores every model it names on the same held-out batches, so
their numbers compare directly. The unigram baseline (add-one smoothed token frequencies of the
training split) is the bar a model must clear to have learned anything beyond token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmlab.data.formats import PROMPTS
from llmlab.data.reader import read
from llmlab.data.sources import DataSource, DataSourceError
from llmlab.data.tasks import exact_match
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
    if count == 0:  # a loss of 0 (perplexity 1) would look like a perfect model
        raise ValueError("no held-out tokens to score: the validation set is empty")
    loss = float(total / count)
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


@dataclass(frozen=True)
class TaskPrompt:
    """A held-out prompt with one checkable answer."""

    prompt: str
    answer: str
    family: str  # the row's `task` column (the built-in tasks: successor, add, sort, reverse, ...), else its source


def checkable_prompts(sources: list[DataSource], limit: int) -> list[TaskPrompt]:
    """Held-out task prompts from the named split of each source (read whole: never trained on), up
    to `limit` in all: rows in a prompt format (a `prompt` column, chat `messages`, a `question`)
    with an `answer` column. A multi-turn prompt is scored by its last user turn."""
    tasks: list[TaskPrompt] = []
    for source in sources:
        examples = read([source], PROMPTS, lambda item, report: item, seed=0, val_fraction=0.0,
                        max_train=limit - len(tasks), hold_out=False)
        for messages, text, extras in examples.train:
            if "answer" not in extras:
                raise DataSourceError(f"eval tasks source {source.path!r}: rows need an `answer` column (and a `prompt` "
                                      f"or `messages` column); found {sorted(['prompt' if text else 'messages', *extras])}")
            tasks.append(TaskPrompt(text if text is not None else messages[-1]["content"], str(extras["answer"]),
                                    str(extras.get("task", source.path))))
        if len(tasks) >= limit:
            break
    return tasks[:limit]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion hits / n (95% with z = 1.96; Wilson 1927): honest at
    small n and near 0 or 1, where the normal approximation is not."""
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def proportion(hits: list[bool]) -> dict[str, Any]:
    """{"value", "n", "ci": [low, high]} of a list of successes."""
    k, n = sum(hits), len(hits)
    return {"value": k / max(n, 1), "n": n, "ci": list(wilson_interval(k, n))}


def render_user_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn of the tokenizer's chat template (with the generation prompt), or
    as it is when the tokenizer has no template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template else p for p in prompts]


def task_completions(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 64) -> list[str]:
    """Greedy completions of task prompts, each ending with its stop token's text when it stopped (as
    RL rollouts are scored). Prompts are rendered with the tokenizer's chat template when it has one."""
    from llmlab.generate import generate

    rendered = render_user_prompts(tokenizer, prompts)
    completions: list[str] = []
    for i in range(0, len(rendered), batch_size):
        completions += generate(model, tokenizer, rendered[i:i + batch_size], max_new_tokens, temperature=0.0,
                                keep_stop=True)
    return completions


def exact_match_accuracy(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 16,
                         batch_size: int = 64, with_stop: bool = False) -> tuple[float, list[str]]:
    """Share of prompts whose greedy completion is exactly the answer, and the completions (ending
    with their stop token's text when `with_stop`)."""
    from llmlab.data.tasks import cut_at_end_of_turn

    completions = task_completions(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    hits = [exact_match(c, a) for c, (_, a) in zip(completions, pairs)]
    if not with_stop:
        completions = [cut_at_end_of_turn(c) for c in completions]
    return sum(hits) / max(len(hits), 1), completions


def preference_wins(model: torch.nn.Module, pairs: list[dict], pad_id: int, batch_size: int = 32) -> list[bool]:
    """For each held-out pair, whether the model finds the chosen response more likely than the
    rejected one (summed log-probabilities of the response tokens)."""
    from llmlab.data.preference import eval_batches
    from llmlab.train.dpo import sequence_logps

    device = next(model.parameters()).device
    wins: list[bool] = []
    with torch.no_grad():
        for batch in eval_batches(pairs, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
            half = logps.shape[0] // 2
            wins += (logps[:half] > logps[half:]).tolist()
    return wins


def preference_accuracy(model: torch.nn.Module, pairs: list[dict], pad_id: int, batch_size: int = 32) -> float:
    """Share of held-out pairs whose chosen response the model finds more likely (`preference_wins`)."""
    wins = preference_wins(model, pairs, pad_id, batch_size)
    return sum(wins) / max(len(wins), 1)


def by_family(families: list[str | None], hits: list[bool]) -> dict[str, dict]:
    """The share of hits per family name (with its 95% interval), families in sorted order; hits
    whose family is None count in no family."""
    grouped: dict[str, list[bool]] = {}
    for family, hit in zip(families, hits):
        if family is not None:
            grouped.setdefault(family, []).append(hit)
    return {f: proportion(h) for f, h in sorted(grouped.items())}


def score_preferences(wins: list[bool], pairs: list[dict], scores: dict) -> None:
    """Preference accuracy overall and, when the pairs name their task family, per family (each
    with its 95% interval)."""
    overall = proportion(wins)
    scores["preference_accuracy"], scores["preference_accuracy_ci"] = overall["value"], overall["ci"]
    families = by_family([pair.get("family") for pair in pairs], wins)
    if families:
        scores["preference_accuracy_by_family"] = families


def score_tasks(model, tok, tasks: list[TaskPrompt], max_new_tokens: int, reward_fn, scores: dict) -> list[str]:
    """Exact match overall and per task family (with 95% intervals), and the mean reward of the
    completions when a reward is named; returns the completions (stop token kept)."""
    completions = task_completions(model, tok, [t.prompt for t in tasks], max_new_tokens)
    hits = [exact_match(c, t.answer) for c, t in zip(completions, tasks)]
    overall = proportion(hits)
    scores["exact_match"], scores["exact_match_ci"] = overall["value"], overall["ci"]
    scores["exact_match_by_family"] = by_family([task.family for task in tasks], hits)
    if reward_fn is not None:  # scored as RL scores rollouts: the prompt as rendered, the stop token kept
        rewards = reward_fn(render_user_prompts(tok, [t.prompt for t in tasks]), completions,
                            answers=[t.answer for t in tasks],
                            prompt_messages=[[{"role": "user", "content": t.prompt}] for t in tasks])
        scores["reward_mean"] = sum(rewards) / len(rewards)
    return completions
