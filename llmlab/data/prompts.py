"""Prompts for online RL (ppo, grpo stages): row formats, prompt extraction, tokenizing, splits.

Formats (detected per source from its columns, or named with `format:`):

    prompt     prompt: "347+1="  (a user turn) or prompt: [{role, content}, ...] (a conversation)
    messages   messages: [{role, content}, ...]: the conversation before the last assistant turn
               (a conversation that ends with a user turn is taken whole)
    hh-rlhf    chosen: "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic/hh-rlhf, the common
               RLHF data): everything up to and including the last "Assistant:"

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

from llmlab.data.preference import _hh_split, parse_hh_transcript
from llmlab.data.reader import Examples, Format, Kind, SourceReport, first_matching, read
from llmlab.data.reader import detect_format as detect_rows_format
from llmlab.data.sources import DataSource

@dataclass
class Prompt:
    ids: list[int]  # what the policy is conditioned on
    text: str  # the same, as text: what reward functions see as the prompt
    extras: dict[str, Any] = field(default_factory=dict)  # the row's other columns (e.g. answer)


def _prompt_messages(row: dict) -> tuple[list[dict], str | None]:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], prompt
    if isinstance(prompt, list):
        return _before_last_assistant(prompt), None
    raise TypeError(f"`prompt` must be a string or a list of chat messages, not {type(prompt).__name__}")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise TypeError("messages must be a list of {role, content} objects")
    return messages


def _before_last_assistant(messages: list) -> list[dict]:
    messages = _check_messages(messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    ends_with_user = bool(messages) and messages[-1]["role"] == "user"
    head = messages if last is None or ends_with_user else messages[:last]
    if not head or head[-1]["role"] != "user":
        raise ValueError("no user turn before the last assistant turn: nothing to answer")
    return head


def _hh(row: dict) -> tuple[list[dict], str | None]:
    """hh-rlhf: the transcript up to and including its last "\n\nAssistant:" (text), and its
    turns before that as messages (parsed as the preference data parses them)."""
    prefix, _ = _hh_split(row["chosen"], "chosen")
    messages = parse_hh_transcript(prefix)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("no Human turn before the last Assistant turn")
    return messages, prefix + "\n\nAssistant:"


def _extract(columns: tuple[str, ...], convert, consumed: tuple[str, ...]) -> Format:
    """A prompt format: its columns, and row -> (messages ending with a user turn, plain text or None,
    the row's other columns)."""

    def extract(row: dict, source: DataSource | None = None) -> tuple[list[dict], str | None, dict]:
        messages, text = convert(row)
        return messages, text, {k: v for k, v in row.items() if k not in consumed}

    return Format(columns, extract)


PROMPT_FORMATS: dict[str, Format] = {
    "prompt": _extract(("prompt",), _prompt_messages, ("prompt",)),
    "messages": _extract(("messages",), lambda r: (_before_last_assistant(r["messages"]), None), ("messages",)),
    "hh-rlhf": _extract(("chosen",), _hh, ("chosen", "rejected")),
}
PROMPTS = Kind("prompt", PROMPT_FORMATS, first_matching(PROMPT_FORMATS), held_out_key=lambda item: item[0])


def detect_prompt_format(rows_sample: list[dict], source_name: str) -> str:
    return detect_rows_format(rows_sample, DataSource(path=source_name), PROMPTS)


def extract_prompt(row: dict, fmt: str) -> tuple[list[dict], str | None, dict]:
    """(messages ending with a user turn, plain prompt text or None, the row's other columns)."""
    missing = [c for c in PROMPT_FORMATS[fmt].columns if c not in row]
    if missing:
        raise KeyError(f"row lacks the column(s) {missing} of format {fmt!r}; it has {', '.join(map(str, row))}")
    return PROMPT_FORMATS[fmt].convert(row, None)


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
        return Prompt(ids, rendered, extras)

    return encode


def prepare_prompt_data(sources: list[DataSource], tokenizer, max_prompt_length: int, seed: int, val_fraction: float,
                        max_prompts: int | None = None, max_val_prompts: int | None = None) -> Examples[Prompt]:
    """Read, extract, render and tokenize prompt sources (`llmlab.data.reader.read`); see the module
    docstring."""
    return read(sources, PROMPTS, encoder(tokenizer, max_prompt_length), seed, val_fraction, max_prompts, max_val_prompts)
