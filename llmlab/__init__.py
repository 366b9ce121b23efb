"""llmlab: a language model's whole life — tokenizer, pretraining, fine-tuning, alignment,
evaluation — from one declarative YAML pipeline spec.

`import llmlab` stays light (no torch): the CLI's `validate` and `schema` must start fast.
`import llmlab.model.model` registers our architecture with transformers' Auto classes (the
config alone: `llmlab.model.config`).
"""

__version__ = "0.1.0"
