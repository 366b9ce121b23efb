"""What rows mean: the row formats of every data kind, and how each kind detects one. No torch, no
tokenizer — `llmlab validate` reads a sample of a local file through these to check it before
anything runs; the kind modules (`sft`, `preference`, `prompts`, `pretrain`) encode the items.

    SFT         conversations (list of {role, content} messages), from: messages, sharegpt, alpaca,
                instruction, prompt_completion, question_answer; or a document's text, from: text
    PREFERENCE  (prompt messages, chosen text, rejected text, the row's `task` or None), from: plain,
                hh_rlhf, ultrafeedback
    PROMPTS     (prompt messages, plain prompt text or None, the row's other columns), from: prompt,
                messages, hh-rlhf
    TEXT        a document's text, from the data entry's `column:`

Each converter raises KeyError / TypeError / ValueError on a malformed row; the reader
(`llmlab.data.reader`) counts, reports and skips such rows.
"""

from __future__ import annotations

import re
from typing import Any

from llmlab.data.reader import Format, Kind, first_matching
from llmlab.data.reader import detect_format as detect_rows_format
from llmlab.data.sources import DataSource

# ----------------------------------------------------------------------------------------- SFT

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "system": "system"}


def _messages(row: dict) -> list[dict]:
    out = []
    for m in row["messages"]:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role {role!r} is not system, user or assistant")
        out.append({"role": role, "content": "" if content is None else str(content)})
    return out


def _sharegpt(row: dict) -> list[dict]:
    out = []
    for m in row["conversations"]:
        speaker = str(m.get("from", "")).lower()
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"ShareGPT speaker {m.get('from')!r} is not one of "
                             f"{', '.join(sorted(SHAREGPT_ROLES))}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": str(m.get("value") or "")})
    return out


def _turn(prompt, answer) -> list[dict]:
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(answer)}]


def _alpaca(row: dict) -> list[dict]:
    extra = (row.get("input") or "").strip()
    prompt = row["instruction"] if not extra else f"{row['instruction']}\n\n{extra}"
    return _turn(prompt, row["output"])


def _text(row: dict, source: DataSource) -> str | None:
    """A row's text column as a string; None (dropped as empty) for a null or empty value."""
    value = row[source.column]
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text or None


def _conversation(convert):
    """A converter that also insists on an assistant turn (nothing to learn without one)."""

    def checked(row: dict, source: DataSource | None = None) -> list[dict]:
        messages = convert(row)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn: nothing to learn from")
        return messages

    return checked


# Order matters: the first match wins (alpaca before instruction: both have `instruction`).
SFT_FORMATS: dict[str, Format] = {
    "messages": Format(("messages",), _conversation(_messages)),
    "sharegpt": Format(("conversations",), _conversation(_sharegpt)),
    "alpaca": Format(("instruction", "input", "output"), _conversation(_alpaca)),
    "instruction": Format(("instruction", "response"), _conversation(lambda r: _turn(r["instruction"], r["response"]))),
    "prompt_completion": Format(("prompt", "completion"), _conversation(lambda r: _turn(r["prompt"], r["completion"]))),
    "question_answer": Format(("question", "answer"), _conversation(lambda r: _turn(r["question"], r["answer"]))),
    # a plain document (the data entry's `column:`), learnt whole: pretraining text mixed into SFT
    "text": Format(("text",), _text),
}
SFT = Kind("SFT", SFT_FORMATS, first_matching(SFT_FORMATS))


def detect_sft_format(rows_sample: list[dict], source_name: str) -> str:
    """The first format whose columns every sampled row has; DataSourceError naming the source, the
    columns it has and the known formats otherwise."""
    return detect_rows_format(rows_sample, DataSource(path=source_name), SFT)


def to_messages(row: dict, fmt: str) -> list[dict]:
    """The conversation a row stands for, as chat messages."""
    if fmt not in SFT_FORMATS:
        raise ValueError(f"unknown SFT format {fmt!r}; known: {', '.join(SFT_FORMATS)}")
    missing = [c for c in SFT_FORMATS[fmt].columns if c not in row]
    if missing:
        raise ValueError(f"row lacks the column(s) {missing} of format {fmt!r}; it has {', '.join(map(str, row))}")
    return SFT_FORMATS[fmt].convert(row, None)


# ----------------------------------------------------------------------------------- preference

ROLES = ("system", "user", "assistant")


def _message_list(value, what: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} is a {type(value).__name__}, not a list of messages")  # noqa: TRY004 (malformed row)
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise ValueError(f"{what} holds a {type(m).__name__}, not a {{role, content}} message")  # noqa: TRY004
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{what} has a message with role {role!r}, not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": "" if content is None else str(content)})
    return out


def _prompt_messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _message_list(value, "prompt")


def _response_text(value, what: str) -> str:
    """A response given as a string, or as a message list holding just the assistant turn."""
    if isinstance(value, str):
        return value
    messages = _message_list(value, what)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{what} must be a string or one assistant message; it has "
                         f"{len(messages)} message(s) with roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def _plain(row: dict) -> tuple[list[dict], str, str]:
    return (_prompt_messages(row["prompt"]), _response_text(row["chosen"], "chosen"),
            _response_text(row["rejected"], "rejected"))


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ASSISTANT = "\n\nAssistant:"


def parse_hh_transcript(text: str) -> list[dict]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [{user: a}, {assistant: b}] (contents stripped)."""
    parts = _HH_TURN.split(text)
    # parts = [text before the first marker, role, content, role, content, ...]
    if parts[0].strip():
        raise ValueError(f"transcript does not start with a 'Human:' or 'Assistant:' turn: "
                         f"{parts[0][:40]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _hh_split(text, what: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise ValueError(f"{what} is a {type(text).__name__}, not a transcript string")  # noqa: TRY004
    at = text.rfind(_HH_ASSISTANT)
    if at < 0:
        raise ValueError(f"{what} transcript has no '\\n\\nAssistant:' turn")
    response = text[at + len(_HH_ASSISTANT):]
    if "\n\nHuman:" in response:
        raise ValueError(f"{what} transcript ends with a Human turn, not an Assistant turn")
    return text[:at], response.strip()


def _hh_rlhf(row: dict) -> tuple[list[dict], str, str]:
    prefix_c, chosen = _hh_split(row["chosen"], "chosen")
    prefix_r, rejected = _hh_split(row["rejected"], "rejected")
    if prefix_c.strip() != prefix_r.strip():
        raise ValueError("chosen and rejected transcripts do not share the conversation before "
                         "their last Assistant turn")
    prompt = parse_hh_transcript(prefix_c)
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("transcript has no Human turn before its last Assistant turn")
    return prompt, chosen, rejected


def _ultrafeedback(row: dict) -> tuple[list[dict], str, str]:
    chosen = _message_list(row["chosen"], "chosen")
    rejected = _message_list(row["rejected"], "rejected")
    for what, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"{what} conversation does not end with an assistant turn")
    prompt_c, prompt_r = chosen[:-1], rejected[:-1]
    if prompt_c != prompt_r:
        raise ValueError("chosen and rejected conversations differ before their final assistant turn")
    if not prompt_c:  # responses only: the prompt is in its own column
        if row.get("prompt") is None:
            raise ValueError("chosen/rejected hold only the response and there is no prompt column")
        prompt_c = _prompt_messages(row["prompt"])
    return prompt_c, chosen[-1]["content"], rejected[-1]["content"]


def _checked(convert):
    """A converter that also checks what every pair needs: a prompt ending with a user or system
    turn and two non-empty responses; the item is (prompt, chosen, rejected, family), family the
    row's `task` string when it has one (None otherwise), so an evaluation can score pairs per
    task family. The held-out hash reads the first three only."""

    def pair(row: dict, source: DataSource | None = None) -> tuple[list[dict], str, str, str | None]:
        if not isinstance(row, dict):
            raise ValueError(f"row is a {type(row).__name__}, not a dict")  # noqa: TRY004
        prompt, chosen, rejected = convert(row)
        if not prompt:
            raise ValueError("the prompt is empty")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant turn; it must end with a user or "
                             "system turn, the response being the next assistant turn")
        for what, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"the {what} response is empty")
        family = row.get("task")
        return prompt, chosen, rejected, family if isinstance(family, str) and family else None

    return pair


PREFERENCE_FORMATS: dict[str, Format] = {
    "plain": Format(("prompt", "chosen", "rejected"), _checked(_plain)),
    "hh_rlhf": Format(("chosen", "rejected"), _checked(_hh_rlhf)),
    "ultrafeedback": Format(("chosen", "rejected"), _checked(_ultrafeedback)),
}


def _is_response_only(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant")


def _detect(rows_sample: list[dict], source: DataSource) -> str | None:
    """plain / hh_rlhf / ultrafeedback from the columns and value types (see the module docstring)."""
    keys = set.intersection(*(set(r) for r in rows_sample))
    if {"chosen", "rejected"} <= keys:
        values = [r["chosen"] for r in rows_sample if r.get("chosen") is not None]
        if values and all(isinstance(v, str) for v in values):
            return "plain" if "prompt" in keys else "hh_rlhf"
        if values and all(isinstance(v, (list, tuple)) for v in values):
            if "prompt" in keys and all(_is_response_only(v) for v in values):
                return "plain"
            return "ultrafeedback"
    return None


PREFERENCE = Kind("preference", PREFERENCE_FORMATS, _detect, held_out_key=lambda pair: list(pair[:3]),
                  help="plain (prompt, chosen, rejected); hh_rlhf (chosen, rejected: whole transcripts); "
                       "ultrafeedback (chosen, rejected: message lists). A preference source needs `chosen` and "
                       "`rejected` columns (strings or message lists), plus `prompt` unless they are whole "
                       "conversations")


def detect_preference_format(rows_sample: list[dict], source_name: str) -> str:
    """The format of a source from a sample of its rows; DataSourceError naming the source, its
    columns and the known formats when none fits."""
    return detect_rows_format(rows_sample, DataSource(path=source_name), PREFERENCE)


def to_pair(row: dict, fmt: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen response, rejected response) of a row; ValueError when malformed."""
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; known: {', '.join(PREFERENCE_FORMATS)}")
    if isinstance(row, dict):
        missing = [c for c in PREFERENCE_FORMATS[fmt].columns if row.get(c) is None]
        if missing:
            raise ValueError(f"row lacks the column(s) {missing} of format {fmt!r}; it has {', '.join(map(str, row))}")
    return PREFERENCE_FORMATS[fmt].convert(row, None)[:3]


# ------------------------------------------------------------------------------------- prompts


def _prompt_column(row: dict) -> tuple[list[dict], str | None]:
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
    "prompt": _extract(("prompt",), _prompt_column, ("prompt",)),
    "messages": _extract(("messages",), lambda r: (_before_last_assistant(r["messages"]), None), ("messages",)),
    "hh-rlhf": _extract(("chosen",), _hh, ("chosen", "rejected")),
    # a `question` column, e.g. GSM8K (its `answer` column stays for the reward)
    "question": _extract(("question",), lambda r: ([{"role": "user", "content": str(r["question"])}], str(r["question"])),
                         ("question",)),
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


# ---------------------------------------------------------------------------------------- text


def _has_column(sample: list[dict], source: DataSource) -> str | None:
    return "text" if all(source.column in r for r in sample) else None


TEXT = Kind("text", {"text": Format((), _text)}, _has_column,
            help="plain text in the column named by the data entry's `column:` (default text)")
