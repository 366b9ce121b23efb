"""Prompts for online RL (ppo, grpo stages): row formats, prompt extraction, tokenizing, splits.

Formats (detected per source from its columns, or named with `format:`):

    prompt     prompt: "347+1="  (a user turn) or prompt: [{role, content}, ...] (a conversation)
    messages   messages: [{role, content}, ...]: the conversation before the last assistant turn
               (a conversation that ends with a user turn is taken whole)
    hh-rlhf    chosen: "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic/hh-rlhf, the seed's default
               RLHF data): everything up to and including the last "Assistant:"

Each row becomes a `Prompt`: its token ids, the text the policy sees (`text`: the chat template's
rendering with the generation prompt when the tokenizer has a template, else the plain prompt; an
hh-rlhf transcript is plain text ending in "Assistant:"), and the row's other columns (`extras`,
e.g. the built-in tasks' `answer`), which reward functions receive by column name.

Prompts longer than `max_prompt_length` tokens are cut from the left (the end of the conversation,
the part the completion answers, is kept).

Validation: a source's own "validation" split when it has one (built-in task generators, hub
datasets), else a `val_fraction` of its prompts chosen by a stable hash, never trained on.

    data = prepare_prompt_data([{"path": "builtin:tasks-prompts"}], tokenizer, max_prompt_length=64,
                               seed=0, val_fraction=0.05)
    data.train[0].ids, data.train[0].text, data.train[0].extras["answer"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterator

from llmlab.data.order import held_out
from llmlab.data.preference import _hh_split, parse_hh_transcript
from llmlab.data.sft import DETECT_SAMPLE_ROWS, _chain, merge_sources, normalise_source, source_splits

@dataclass
class Prompt:
    ids: list[int]  # what the policy is conditioned on
    text: str  # the same, as text: what reward functions see as the prompt
    extras: dict[str, Any] = field(default_factory=dict)  # the row's other columns (e.g. answer)


@dataclass
class PromptData:
    train: list[Prompt]
    val: list[Prompt]
    stats: dict


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


# name -> (columns that identify it, row -> (messages, plain prompt text or None), columns consumed)
PROMPT_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict], tuple[list[dict], str | None]], tuple[str, ...]]] = {
    "prompt": (("prompt",), _prompt_messages, ("prompt",)),
    "messages": (("messages",), lambda r: (_before_last_assistant(r["messages"]), None), ("messages",)),
    "hh-rlhf": (("chosen",), _hh, ("chosen", "rejected")),
}


def detect_prompt_format(rows_sample: list[dict], source_name: str) -> str:
    if not rows_sample:
        raise ValueError(f"prompt data source {source_name!r} has no rows")
    keys = set.intersection(*(set(r) for r in rows_sample))
    for name, (columns, _, _) in PROMPT_FORMATS.items():
        if set(columns) <= keys:
            return name
    found = sorted(set().union(*(set(r) for r in rows_sample)))
    known = "; ".join(f"{n} ({', '.join(c)})" for n, (c, _, _) in PROMPT_FORMATS.items())
    raise ValueError(f"could not detect the prompt format of {source_name!r}: its rows have columns "
                     f"{', '.join(found) or '(none)'}. Known formats and the columns they need: {known}. "
                     f"Rename the columns, or set `format:` on the data entry.")


def extract_prompt(row: dict, fmt: str) -> tuple[list[dict], str | None, dict]:
    """(messages ending with a user turn, plain prompt text or None, the row's other columns)."""
    columns, convert, consumed = PROMPT_FORMATS[fmt]
    missing = [c for c in columns if c not in row]
    if missing:
        raise KeyError(f"row lacks the column(s) {missing} of format {fmt!r}; it has {', '.join(map(str, row))}")
    messages, text = convert(row)
    return messages, text, {k: v for k, v in row.items() if k not in consumed}


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


def _prompts(rows: Iterator[dict], source: dict, name: str) -> Iterator[tuple[list[dict], str | None, dict]]:
    first = list(islice(rows, DETECT_SAMPLE_ROWS))
    fmt = source["format"] or detect_prompt_format(first, name)
    for k, row in enumerate(_chain(first, rows)):
        try:
            yield extract_prompt(row, fmt)
        except (KeyError, TypeError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ValueError(f"{name!r} row {k} is not valid {fmt!r} prompt data: {msg}") from e


def prepare_prompt_data(sources: list[dict], tokenizer, max_prompt_length: int, seed: int, val_fraction: float,
                        max_prompts: int | None = None, max_val_prompts: int | None = None) -> PromptData:
    """Read, extract, render and tokenize prompt sources; see the module docstring."""

    sources = [normalise_source(s, "prompt", PROMPT_FORMATS) for s in sources]
    stats: dict = {"truncated": 0, "sources": []}
    per_train: list[list[Prompt]] = []
    per_val: list[list[Prompt]] = []

    def make(messages, text, extras) -> Prompt:
        rendered = render_prompt(tokenizer, messages, text)
        ids = encode_prompt(tokenizer, rendered)
        if len(ids) > max_prompt_length:
            stats["truncated"] += 1
            ids = ids[-max_prompt_length:]
            rendered = tokenizer.decode(ids, skip_special_tokens=False)
        return Prompt(ids, rendered, extras)

    for s in sources:
        name = s["path"]
        train_rows, val_rows = source_splits(s)
        train, val = [], []
        for messages, text, extras in _prompts(train_rows, s, name):
            if val_rows is None and held_out(messages, val_fraction):
                if max_val_prompts is None or len(val) < max_val_prompts:
                    val.append(make(messages, text, extras))
            else:
                train.append(make(messages, text, extras))
            if max_prompts is not None and len(train) >= max_prompts:
                break
        if val_rows is not None:
            for messages, text, extras in _prompts(val_rows, s, f"{name} (validation split)"):
                val.append(make(messages, text, extras))
                if max_val_prompts is not None and len(val) >= max_val_prompts:
                    break
        stats["sources"].append({"path": name, "train": len(train), "val": len(val),
                                 "validation": "split" if val_rows is not None else "held-out fraction"})
        per_train.append(train)
        per_val.append(val)
    train, val = merge_sources(per_train, per_val, [float(s["weight"]) for s in sources], seed, max_prompts,
                               max_val_prompts)
    if not train:
        raise ValueError(f"no training prompts from {[s['path'] for s in sources]}")
    stats.update(train_prompts=len(train), val_prompts=len(val))
    return PromptData(train, val, stats)
