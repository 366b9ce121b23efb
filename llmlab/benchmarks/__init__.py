"""Benchmarks the field uses, inside the eval stage: lm-evaluation-harness tasks on any model llmlab scores.

- `builtin`: llmlab's own tasks as lm-eval tasks (checkable tasks by exact match, preference pairs and
  standard-library docstrings as multiple choice), generated offline.
- `adapter`: `LlmlabLM`, any loaded causal LM as an lm-eval model (batched log-likelihoods, llmlab's
  KV-cached sampler for generation).
- `run`: running a stage's tasks on one model, and resolving them before anything runs (`llmlab validate`).
- `contamination`: the share of a task's documents that a model's upstream training data held.

The eval stage (`llmlab.runners.eval`) ties them together; lm-eval is imported only by what runs
or checks a benchmark.
"""
