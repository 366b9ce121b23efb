"""Preference data for DPO: formats, prompt/chosen/rejected pairs, tokenized pairs, batches.

Formats (detected per source from its columns and value types, or named with `format:`), each
turned into (prompt messages, chosen response text, rejected response text):

    plain          prompt, chosen, rejected     prompt: a string (one user turn) or a message list;
                                                chosen/rejected: strings, or message lists holding
                                                just the assistant response (TRL's explicit prompt)
    hh_rlhf        chosen, rejected             Anthropic hh-rlhf: two whole transcripts
                                                "\\n\\nHuman: ...\\n\\nAssistant: ..." sharing a
                                                prefix; the prompt is the conversation up to the
                                                last "Assistant:" turn, the responses that turn
    ultrafeedback  chosen, rejected (+ prompt)  UltraFeedback-binarized: chosen/rejected are whole
                                                conversations (message lists) that differ only in
                                                their final assistant turn; the prompt is the
                                                shared prefix (the `prompt` column is not needed)

Detection: rows whose chosen/rejected are strings are `plain` with a `prompt` column, `hh_rlhf`
without one; message lists that contain more than the assistant response are `ultrafeedback`,
lists holding only the response (with a `prompt` column) are `plain`.

A pair is rendered as two conversations, prompt + [assistant: chosen] and prompt +
[assistant: rejected], through `llmlab.data.sft.tokenize_conversation`, so the response mask comes
from the chat template (its `{% generation %}` markers, or the offsets fallback). Only the *final*
assistant turn is labelled (content and end-of-turn token): assistant turns inside a multi-turn
prompt are context, not targets. A prompt must therefore end with a user or system turn.

Rows that cannot be read as a pair (missing columns, hh transcripts without a shared prefix or
without an Assistant turn, empty responses, ...) are malformed: counted in `stats["malformed"]`,
the first five kept with their row numbers in `stats["malformed_examples"]`, logged, and skipped.
A source with no usable pair at all raises a ValueError.

Pairs whose chosen and rejected sequences are identical token for token (after truncation) are
well-formed but useless: the DPO log-ratio difference is exactly 0 whatever the weights, so they
carry no gradient and would only dilute the metrics. They are dropped and counted in
`stats["dropped_identical"]`. Sequences longer than `max_seq_len` are cut from the right
(`stats["truncated"]` counts the pairs); a pair whose chosen or rejected response is cut away
entirely is dropped (`stats["dropped_no_target"]`).

Validation: a source's own "validation" split when it has one (built-in task sources, hub datasets
with that split), else a `val_fraction` of its pairs chosen by a stable hash of the example.

    data = prepare_preference_data([{"path": "builtin:tasks-preference"}], tokenizer,
                                   max_seq_len=128, seed=0, val_fraction=0.05)
    batches = PreferenceBatches(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_token_id)
    batch = batches.next_batch()  # {input_ids, attention_mask, labels}: 2B rows, B chosen first
    for batch in eval_batches(data.val, batch_size=16, pad_id=tokenizer.pad_token_id): ...

A pair is a dict {chosen_ids, chosen_labels, rejected_ids, rejected_labels} (lists of ints); when
every pair of a batch also has "ref_logps" (a (chosen, rejected) pair of floats, see
`llmlab.train.dpo.attach_reference_logps`) the batch carries `ref_logps` (2B,) too.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from llmlab.data.order import EpochWalk, held_out

from llmlab.data.sft import normalise_source, pad_batch, tokenize_conversation
from llmlab.train.objectives import IGNORE_INDEX

log = logging.getLogger(__name__)

Pair = dict  # {chosen_ids, chosen_labels, rejected_ids, rejected_labels[, ref_logps]}

DETECT_SAMPLE_ROWS = 20
MALFORMED_SHOWN = 5
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------- formats


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


@dataclass(frozen=True)
class PreferenceFormat:
    columns: tuple[str, ...]  # all must be present
    convert: Callable[[dict], tuple[list[dict], str, str]]


PREFERENCE_FORMATS: dict[str, PreferenceFormat] = {
    "plain": PreferenceFormat(("prompt", "chosen", "rejected"), _plain),
    "hh_rlhf": PreferenceFormat(("chosen", "rejected"), _hh_rlhf),
    "ultrafeedback": PreferenceFormat(("chosen", "rejected"), _ultrafeedback),
}


def _formats_help() -> str:
    return "; ".join(f"{name} ({', '.join(f.columns)})" for name, f in PREFERENCE_FORMATS.items())


def _is_response_only(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant")


def detect_preference_format(rows_sample: list[dict], source_name: str) -> str:
    """The format of a source from a sample of its rows (see the module docstring); a ValueError
    naming the source, its columns and the known formats when none fits."""
    if not rows_sample:
        raise ValueError(f"preference data source {source_name!r} has no rows")
    keys = set.intersection(*(set(r) for r in rows_sample))
    if {"chosen", "rejected"} <= keys:
        values = [r["chosen"] for r in rows_sample if r.get("chosen") is not None]
        if values and all(isinstance(v, str) for v in values):
            return "plain" if "prompt" in keys else "hh_rlhf"
        if values and all(isinstance(v, (list, tuple)) for v in values):
            if "prompt" in keys and all(_is_response_only(v) for v in values):
                return "plain"
            return "ultrafeedback"
    found = sorted(set().union(*(set(r) for r in rows_sample)))
    raise ValueError(
        f"could not detect the preference format of {source_name!r}: its rows have columns "
        f"{', '.join(found) or '(none)'}; a preference source needs `chosen` and `rejected` "
        f"columns (strings or message lists), plus `prompt` unless they are whole conversations. "
        f"Known formats: {_formats_help()}. Rename the columns, or set `format:` on the data entry.")


def to_pair(row: dict, fmt: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen response, rejected response) of a row; ValueError when malformed."""
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; known: {', '.join(PREFERENCE_FORMATS)}")
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not a dict")  # noqa: TRY004
    missing = [c for c in PREFERENCE_FORMATS[fmt].columns if row.get(c) is None]
    if missing:
        raise ValueError(f"row lacks the column(s) {missing} of format {fmt!r}; it has "
                         f"{', '.join(map(str, row))}")
    prompt, chosen, rejected = PREFERENCE_FORMATS[fmt].convert(row)
    if not prompt:
        raise ValueError("the prompt is empty")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant turn; it must end with a user or "
                         "system turn, the response being the next assistant turn")
    for what, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ValueError(f"the {what} response is empty")
    return prompt, chosen, rejected


# ------------------------------------------------------------------------------------ tokenizing


def _final_turn_labels(labels: list[int]) -> list[int]:
    """Keep only the last contiguous run of labelled positions (the final assistant turn)."""
    out = list(labels)
    i = len(out) - 1
    while i >= 0 and out[i] == IGNORE_INDEX:
        i -= 1
    while i >= 0 and out[i] != IGNORE_INDEX:
        i -= 1
    for j in range(i + 1):
        out[j] = IGNORE_INDEX
    return out


def _tokenize_response(tokenizer, prompt: list[dict], response: str, max_seq_len: int):
    messages = [*prompt, {"role": "assistant", "content": response}]
    ids, labels, _ = tokenize_conversation(tokenizer, messages, sys.maxsize)
    labels = _final_turn_labels(labels)
    return ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len


def tokenize_pair(tokenizer, prompt_messages: list[dict], chosen: str, rejected: str,
                  max_seq_len: int) -> dict:
    """{chosen_ids, chosen_labels, rejected_ids, rejected_labels, truncated}: each sequence is the
    prompt conversation plus the response as a final assistant turn, rendered with the chat
    template; labels are the ids of the response tokens (end-of-turn included), IGNORE_INDEX
    elsewhere; both cut to `max_seq_len` tokens (`truncated` says whether either was)."""
    c_ids, c_labels, c_cut = _tokenize_response(tokenizer, prompt_messages, chosen, max_seq_len)
    r_ids, r_labels, r_cut = _tokenize_response(tokenizer, prompt_messages, rejected, max_seq_len)
    return {"chosen_ids": c_ids, "chosen_labels": c_labels, "rejected_ids": r_ids,
            "rejected_labels": r_labels, "truncated": c_cut or r_cut}


# ------------------------------------------------------------------------------------- datasets


@dataclass
class PreferenceData:
    train: list[Pair]
    val: list[Pair]
    stats: dict = field(default_factory=dict)


def is_validation_pair(prompt: list[dict], chosen: str, rejected: str, val_fraction: float) -> bool:
    """Stable hash of the example: the same pair always lands on the same side."""
    return held_out([prompt, chosen, rejected], val_fraction)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _pairs(rows: Iterator[dict], fmt: str | None, name: str, stats: dict,
           counts: dict) -> Iterator[tuple[list[dict], str, str]]:
    """Well-formed (prompt, chosen, rejected) of a split; malformed rows counted in `stats`."""
    first = list(islice(rows, DETECT_SAMPLE_ROWS))
    fmt = fmt or detect_preference_format([r for r in first if isinstance(r, dict)] or first, name)
    counts["format"] = fmt
    for k, row in enumerate(_chain(first, rows)):
        counts["rows"] += 1
        try:
            yield to_pair(row, fmt)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            counts["malformed"] += 1
            stats["malformed"] += 1
            if len(stats["malformed_examples"]) < MALFORMED_SHOWN:
                stats["malformed_examples"].append({"source": name, "row": k, "error": str(e)})


def prepare_preference_data(sources: list[dict], tokenizer, max_seq_len: int, seed: int,
                            val_fraction: float, max_examples: int | None = None,
                            max_val_examples: int | None = None) -> PreferenceData:
    """Read, convert, tokenize and split preference sources in memory; see the module docstring.

    `max_examples` caps the training pairs (after interleaving sources by weight),
    `max_val_examples` the validation ones (default: max_examples, or all)."""
    from llmlab.data.sft import merge_sources, source_splits

    sources = [normalise_source(s, "preference", PREFERENCE_FORMATS) for s in sources]
    if not sources:
        raise ValueError("no preference data sources given")
    stats = {"malformed": 0, "malformed_examples": [], "truncated": 0, "dropped_no_target": 0,
             "dropped_identical": 0, "sources": []}
    per_source_train: list[list[Pair]] = []
    per_source_val: list[list[Pair]] = []
    val_cap = max_val_examples if max_val_examples is not None else max_examples

    def encode(prompt, chosen, rejected) -> Pair | None:
        pair = tokenize_pair(tokenizer, prompt, chosen, rejected, max_seq_len)
        stats["truncated"] += int(pair.pop("truncated"))
        if (all(x == IGNORE_INDEX for x in pair["chosen_labels"])
                or all(x == IGNORE_INDEX for x in pair["rejected_labels"])):
            stats["dropped_no_target"] += 1
            return None
        if pair["chosen_ids"] == pair["rejected_ids"]:
            stats["dropped_identical"] += 1
            return None
        return pair

    for s in sources:
        name = s["path"]
        train_rows, val_rows = source_splits(s)
        train, val = [], []
        counts = {"rows": 0, "malformed": 0, "format": s["format"]}
        before = {k: stats[k] for k in ("dropped_no_target", "dropped_identical")}
        for prompt, chosen, rejected in _pairs(train_rows, s["format"], name, stats, counts):
            held_out = val_rows is None and is_validation_pair(prompt, chosen, rejected, val_fraction)
            if held_out and val_cap is not None and len(val) >= val_cap:
                continue
            pair = encode(prompt, chosen, rejected)
            if pair is not None:
                (val if held_out else train).append(pair)
            if max_examples is not None and len(train) >= max_examples:
                break
        if not train and not val:
            shown = "; ".join(f"row {m['row']}: {m['error']}" for m in stats["malformed_examples"]
                              if m["source"] == name)
            raise ValueError(
                f"preference source {name!r} (format {counts['format']!r}) has no usable pair: "
                f"{counts['rows']} row(s) read, {counts['malformed']} malformed"
                + (f" ({shown})" if shown else "")
                + f"; {stats['dropped_no_target'] - before['dropped_no_target']} had no response "
                  f"token left within max_seq_len={max_seq_len}, "
                  f"{stats['dropped_identical'] - before['dropped_identical']} had identical "
                  f"chosen and rejected sequences")
        n_train_malformed = counts["malformed"]
        if val_rows is not None:
            val_name = f"{name} (validation split)"
            for prompt, chosen, rejected in _pairs(val_rows, s["format"] or counts["format"],
                                                   val_name, stats, counts):
                if val_cap is not None and len(val) >= val_cap:
                    break
                pair = encode(prompt, chosen, rejected)
                if pair is not None:
                    val.append(pair)
        stats["sources"].append({
            "path": name, "format": counts["format"], "train": len(train), "val": len(val),
            "malformed": counts["malformed"], "malformed_train_split": n_train_malformed,
            "validation": "split" if val_rows is not None else "held-out fraction"})
        per_source_train.append(train)
        per_source_val.append(val)

    train, val = merge_sources(per_source_train, per_source_val, [float(s["weight"]) for s in sources], seed,
                               max_examples, val_cap)
    if not train:
        raise ValueError(f"no preference training pairs from {[s['path'] for s in sources]} "
                         f"(all usable pairs went to validation, or every source has weight 0)")
    stats.update(train_pairs=len(train), val_pairs=len(val),
                 train_tokens=sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train))
    if stats["malformed"]:
        shown = "; ".join(f"{m['source']} row {m['row']}: {m['error']}"
                          for m in stats["malformed_examples"])
        log.warning("%d malformed preference rows were skipped (first: %s)", stats["malformed"], shown)
    if stats["truncated"]:
        log.warning("%d preference pairs were longer than max_seq_len=%d tokens and were truncated",
                    stats["truncated"], max_seq_len)
    for key, why in (("dropped_no_target", "had no response token left after truncation"),
                     ("dropped_identical", "had identical chosen and rejected sequences")):
        if stats[key]:
            log.warning("%d preference pairs %s and were dropped", stats[key], why)
    return PreferenceData(train=train, val=val, stats=stats)


# -------------------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows, the B chosen sequences then the B rejected ones:
    {input_ids, attention_mask, labels} (+ ref_logps (2B,) when every pair carries them)."""
    if not pairs:
        raise ValueError("cannot collate an empty list of preference pairs")
    rows = ([(p["chosen_ids"], p["chosen_labels"]) for p in pairs]
            + [(p["rejected_ids"], p["rejected_labels"]) for p in pairs])
    batch = pad_batch(rows, pad_id)
    if all(p.get("ref_logps") is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p["ref_logps"][0] for p in pairs]
                                          + [p["ref_logps"][1] for p in pairs], dtype=torch.float32)
    return batch


class PreferenceBatches:
    """Resumable preference batches: each epoch visits every pair once in the order of
    `random.Random(f"{seed}:{epoch}")`; a batch that reaches an epoch's end continues into the
    next. Each batch is `batch_size` pairs collated by `collate_pairs` (2 * batch_size rows).
    `state_dict()` is (epoch, position)."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, pad_id: int):
        if not pairs:
            raise ValueError("PreferenceBatches needs at least one pair")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.pairs = pairs
        self.batch_size = self.micro_batch = batch_size
        self.unit = "pairs"
        self.pad_id = pad_id
        self.walk = EpochWalk(len(pairs), seed, "pairs")

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate_pairs([self.pairs[self.walk.take()] for _ in range(self.batch_size)], self.pad_id)

    def state_dict(self) -> dict:
        return self.walk.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.walk.load_state_dict(state)


def eval_batches(pairs: list[Pair], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Validation batches in a fixed order (the pairs' own), collated like training batches."""
    return [collate_pairs(pairs[i:i + batch_size], pad_id) for i in range(0, len(pairs), batch_size)]
