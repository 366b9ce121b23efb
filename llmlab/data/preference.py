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
without an Assistant turn, empty responses, ...) are malformed: the reader's one policy applies
(`llmlab.data.reader`: counted in `stats["malformed"]`, the first five kept with their file and row
in `stats["malformed_examples"]`, logged and skipped; the source fails past its max_bad_share).

Pairs whose chosen and rejected sequences are identical token for token (after truncation) are
well-formed but useless: the DPO log-ratio difference is exactly 0 whatever the weights, so they
carry no gradient and would only dilute the metrics. They are dropped and counted in
`stats["dropped_identical"]`. Sequences longer than `max_seq_len` are cut from the right
(`stats["truncated"]` counts the pairs); a pair whose chosen or rejected response is cut away
entirely is dropped (`stats["dropped_no_target"]`).

Validation: a source's own "validation" split when it has one (built-in task sources, hub datasets
with that split), else a `val_fraction` of its pairs chosen by a stable hash of the example.

    data = prepare_preference_data([DataSource(path="builtin:tasks-preference")], tokenizer,
                                   max_seq_len=128, seed=0, val_fraction=0.05)
    batches = PreferenceBatches(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_token_id)
    batch = batches.next_batch()  # {input_ids, attention_mask, labels}: 2B rows, B chosen first
    for batch in eval_batches(data.val, batch_size=16, pad_id=tokenizer.pad_token_id): ...

A pair is a dict {chosen_ids, chosen_labels, rejected_ids, rejected_labels} (lists of ints), plus
"family" (a string) when its row had a `task` column (the built-in task pairs do); when
every pair of a batch also has "ref_logps" (a (chosen, rejected) pair of floats, see
`llmlab.train.dpo.attach_reference_logps`) the batch carries `ref_logps` (2B,) too.
"""

from __future__ import annotations

import sys

import torch

from llmlab.data.formats import (
    PREFERENCE,
)
from llmlab.data.order import EpochWalk
from llmlab.data.reader import Examples, SourceReport, read
from llmlab.data.sft import pad_batch, tokenize_conversation
from llmlab.data.sources import DataSource
from llmlab.train.objectives import IGNORE_INDEX

Pair = dict  # {chosen_ids, chosen_labels, rejected_ids, rejected_labels[, family][, ref_logps]}

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


def encoder(tokenizer, max_seq_len: int):
    """(prompt, chosen, rejected, family) -> a tokenized pair (with "family" when the row named
    one); truncation noted; dropped when a response has no token left, or chosen and rejected are
    identical token for token."""

    def encode(item: tuple[list[dict], str, str, str | None], report: SourceReport) -> Pair | None:
        pair = tokenize_pair(tokenizer, *item[:3], max_seq_len)
        if pair.pop("truncated"):
            report.note("truncated")
        if (all(x == IGNORE_INDEX for x in pair["chosen_labels"])
                or all(x == IGNORE_INDEX for x in pair["rejected_labels"])):
            report.drop("dropped_no_target")
            return None
        if pair["chosen_ids"] == pair["rejected_ids"]:
            report.drop("dropped_identical")
            return None
        if item[3] is not None:
            pair["family"] = item[3]
        return pair

    return encode


def prepare_preference_data(sources: list[DataSource], tokenizer, max_seq_len: int, seed: int,
                            val_fraction: float, max_examples: int | None = None,
                            max_val_examples: int | None = None) -> Examples[Pair]:
    """Read, convert, tokenize and split preference sources (`llmlab.data.reader.read`); see the
    module docstring. `max_examples` caps the training pairs, `max_val_examples` the validation
    ones (default: max_examples, or all)."""
    cap = max_val_examples if max_val_examples is not None else max_examples
    return read(sources, PREFERENCE, encoder(tokenizer, max_seq_len), seed, val_fraction, max_examples, cap)


def preference_pairs(sources: list[DataSource], tokenizer, max_seq_len: int, limit: int) -> list[Pair]:
    """Up to `limit` tokenized pairs from the named split of each source, read whole (an evaluation's
    held-out test pairs: no share is held out of them)."""
    return read(sources, PREFERENCE, encoder(tokenizer, max_seq_len), 0, 0.0, limit, hold_out=False).train


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
