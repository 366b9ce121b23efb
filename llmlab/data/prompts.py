"""Prompts for online RL (ppo, grpo stages): rendering, tokenizing and splitting prompt rows.

Formats (`llmlab.data.formats`; detected per source from its columns, or named with `format:`):

    prompt     prompt: "347+1="  (a user turn) or prompt: [{role, content}, ...] (a conversation)
    messages   messages: [{role, content}, ...]: the conversation before the last assistant turn
               (a conversation that ends with a user turn is taken whole)
    hh-rlhf    chosen: "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic/hh-rlhf, the common
               RLHF data): everything up to and including the last "Assistant:"
    question   question: "Natalia sold clips to ..." (a user turn; e.g. GSM8K, whose `answer`
               column the numeric_match reward reads)

Each row becomes a `Prompt`: its token ids, the text the policy sees (`text`: the chat template's
rendering with the generation prompt when the tokenizer has a template, else the plain prompt; an
hh-rlhf transcript is plain text ending in "Assistant:"), and the row's other columns (`extras`,
e.g. the built-in tasks' `answer`), which reward functions receive by column name.

Prompts longer than `max_prompt_length` tokens are cut from the left (the end of the conversation,
the part the completion answers, is kept).

Validation: a source's own "validation" split when it has one (built-in task generators, hub
datasets), else a `val_fraction` of its prompts chosen by a stable hash, never trained on.

    data = prepare_prompt_data([DataSource(path="builtin:tasks-prompts")], tokenizer, max_prompt_length=64,
                               seed=0, val_fraction=0.05)
    data.train[0].ids, data.train[0].text, data.train[0].extras["answer"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmlab.data.formats import PROMPTS
from llmlab.data.reader import Examples, SourceReport, read
from llmlab.data.sources import DataSource


@dataclass
class Prompt:
    ids: list[int]  # what the policy is conditioned on
    text: str  # the same, as text: what reward functions see as the prompt
    extras: dict[str, Any] = field(default_factory=dict)  # the row's other columns (e.g. answer)
    messages: list[dict] = field(default_factory=list)  # the conversation, for a reward model to render its own way


def render_prompt(tokenizer, messages: list[dict], text: str | None) -> str:
    """The text the policy sees: the chat template's rendering with the generation prompt when the
    tokenizer has a template; otherwise the plain text (an hh-rlhf transcript, or the turns joined)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text if text is not None else "\n\n".join(m["content"] for m in messages)


def encode_prompt(tokenizer, rendered: str) -> list[int]:
    """Token ids of a rendered prompt: special tokens as they are in the text (a chat template
    writes its own), the tokenizer's BOS added otherwise."""
    return tokenizer(rendered, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def encoder(tokenizer, max_prompt_length: int):
    """(messages, text, extras) -> a Prompt: rendered, tokenized, cut from the left to
    `max_prompt_length` tokens (noted)."""

    def encode(item: tuple[list[dict], str | None, dict], report: SourceReport) -> Prompt:
        messages, text, extras = item
        rendered = render_prompt(tokenizer, messages, text)
        ids = encode_prompt(tokenizer, rendered)
        if len(ids) > max_prompt_length:
            report.note("truncated")
            ids = ids[-max_prompt_length:]
            rendered = tokenizer.decode(ids, skip_special_tokens=False)
        return Prompt(ids, rendered, extras, messages)

    return encode


def prepare_prompt_data(sources: list[DataSource], tokenizer, max_prompt_length: int, seed: int, val_fraction: float,
                        max_prompts: int | None = None, max_val_prompts: int | None = None) -> Examples[Prompt]:
    """Read, extract, render and tokenize prompt sources (`llmlab.data.reader.read`); see the module
    docstring."""
    return read(sources, PROMPTS, encoder(tokenizer, max_prompt_length), seed, val_fraction, max_prompts, max_val_prompts)
