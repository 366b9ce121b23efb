"""Supervised fine-tuning data: conversation formats, assistant-only labels, batches with packing.

Formats (detected per source from its columns, or named with `format:`), each turned into a list
of {"role", "content"} messages:

    messages           messages: [{role, content}, ...]            (system/user/assistant, multi-turn)
    sharegpt           conversations: [{from, value}, ...]         (human/gpt/system)
    alpaca             instruction, input, output
    instruction        instruction, response
    prompt_completion  prompt, completion
    question_answer    question, answer
    text               text (or the data entry's `column:`): a plain document, not a conversation

Conversations are rendered with the tokenizer's chat template. Labels are the token ids of the
assistant turns (content and end-of-turn token) and IGNORE_INDEX everywhere else. The mask comes
from the template: its `{% generation %}` markers when it has them
(`return_assistant_tokens_mask=True`), else from character offsets: each assistant turn is the text
that rendering messages[:i+1] adds to rendering messages[:i] with the generation prompt, mapped to
tokens with the offsets mapping (trailing whitespace after the end-of-turn token excluded).

A plain document (`text`) is learnt whole, the way pretraining learns it: its tokens and EOS, no
chat template, a label on every token — pretraining text mixed into SFT keeps the model's language
modelling while it learns the conversations.

Longer conversations and documents are cut to `max_seq_len` tokens (counted in `SFTData.stats`); one left with no
assistant token is dropped (counted too).

Validation: a source's own "validation" split when it has one (built-in task sources, hub datasets
with that split), else a `val_fraction` of its examples chosen by a stable hash of the
conversation, never used for training.

    data = prepare_sft_data([{"path": "builtin:tasks"}], tokenizer, max_seq_len=128, seed=0,
                            val_fraction=0.05)
    batches = SFTBatches(data.train, batch_size=16, seed=0, packing=False, max_seq_len=128,
                         pad_id=tokenizer.pad_token_id)
    batch = batches.next_batch()   # {input_ids, attention_mask, labels} or, packed,
                                   # {input_ids, attention_mask, segment_ids, labels}
    for batch in eval_batches(data.val, batch_size=32, pad_id=tokenizer.pad_token_id): ...
"""

from __future__ import annotations

import re

import torch

from llmlab.data.formats import SFT
from llmlab.data.order import EpochWalk
from llmlab.data.reader import Examples, SourceReport, read
from llmlab.data.sources import DataSource
from llmlab.train.objectives import IGNORE_INDEX

Example = tuple[list[int], list[int]]  # (input_ids, labels)

# ------------------------------------------------------------------------------------ tokenizing

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and bool(_GENERATION_TAG.search(template))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content and
    end-of-turn, trailing whitespace excluded), found by rendering prefixes of the conversation."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations incrementally "
                             "(a prefix renders differently), so assistant turns cannot be located; "
                             "use a template with {% generation %} markers")
        end = len(through.rstrip())
        spans.append((len(before), end))
    return text, spans


def assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a rendered conversation; mask 1 on assistant tokens and end-of-turn."""
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        inside = any(start < s_end and end > s_start for s_start, s_end in spans) if end > start else False
        mask.append(int(inside))
    return list(enc["input_ids"]), mask


def tokenize_document(tokenizer, text: str, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of a plain document: its tokens and EOS, each its own label (the
    first excepted: nothing predicts it); cut to `max_seq_len` tokens."""
    from llmlab.data.pretrain import encode_documents

    ids = encode_documents(tokenizer, [text])[0] + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] + ids[1:]
    return ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are the ids on assistant tokens, IGNORE_INDEX
    elsewhere (the first position always: nothing predicts it); cut to `max_seq_len` tokens."""
    ids, mask = assistant_mask(tokenizer, messages)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE_INDEX
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], labels[:max_seq_len], truncated


# ------------------------------------------------------------------------------------- datasets


def encoder(tokenizer, max_seq_len: int):
    """conversation (or plain document) -> (input_ids, labels), cut to `max_seq_len` (noted); dropped
    when no assistant token is left to learn."""

    def encode(item: list[dict] | str, report: SourceReport) -> Example | None:
        document = isinstance(item, str)
        ids, labels, truncated = (tokenize_document if document else tokenize_conversation)(tokenizer, item, max_seq_len)
        if truncated:  # a document learnt by its first max_seq_len tokens is what mixing text in means
            report.note("documents cut to max_seq_len" if document else "truncated", expected=document)
        if all(label == IGNORE_INDEX for label in labels):
            report.drop("dropped_no_target")
            return None
        return ids, labels

    return encode


def prepare_sft_data(sources: list[DataSource], tokenizer, max_seq_len: int, seed: int, val_fraction: float,
                     max_examples: int | None = None, max_val_examples: int | None = None) -> Examples[Example]:
    """Read, convert, tokenize and split SFT sources (`llmlab.data.reader.read`); see the module
    docstring. `max_examples` caps the training examples, `max_val_examples` the validation ones
    (default: max_examples, or all)."""
    cap = max_val_examples if max_val_examples is not None else max_examples
    return read(sources, SFT, encoder(tokenizer, max_seq_len), seed, val_fraction, max_examples, cap)


# -------------------------------------------------------------------------------------- batches


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded {input_ids, attention_mask, labels}; padding has labels IGNORE_INDEX."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(examples):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention[r, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_rows(rows: list[list[Example]], max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Each row's examples laid end to end in `max_seq_len` tokens: segment ids 0, 1, ... per
    example and one more for the padding (labels IGNORE_INDEX, attention_mask 0), so with
    `segment_ids` no token attends outside its own example and positions restart per example."""
    B = len(rows)
    input_ids = torch.full((B, max_seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, max_seq_len), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((B, max_seq_len), dtype=torch.long)
    attention = torch.zeros((B, max_seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for seg, (ids, lab) in enumerate(row):
            n = len(ids)
            input_ids[r, pos:pos + n] = torch.tensor(ids, dtype=torch.long)
            labels[r, pos:pos + n] = torch.tensor(lab, dtype=torch.long)
            labels[r, pos] = IGNORE_INDEX  # never predicted from the previous example
            segments[r, pos:pos + n] = seg
            attention[r, pos:pos + n] = 1
            pos += n
        segments[r, pos:] = len(row)
    return {"input_ids": input_ids, "attention_mask": attention, "segment_ids": segments,
            "labels": labels}


class SFTBatches:
    """Resumable SFT batches: each epoch visits every example once in the order of
    `random.Random(f"{seed}:{epoch}")`; a batch that reaches an epoch's end continues into the next.

    Without packing a batch is `batch_size` examples, right-padded to the longest. With packing a
    batch is `batch_size` rows of exactly `max_seq_len` tokens, each holding as many consecutive
    examples as fit (`segment_ids` keep them apart). `state_dict()` is (epoch, position)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, packing: bool,
                 max_seq_len: int, pad_id: int):
        if not examples:
            raise ValueError("SFTBatches needs at least one example")
        too_long = max(len(ids) for ids, _ in examples)
        if too_long > max_seq_len:
            raise ValueError(f"an example has {too_long} tokens, more than max_seq_len={max_seq_len}")
        self.examples = examples
        self.batch_size = self.micro_batch = batch_size
        self.unit = "packed rows" if packing else "sequences"
        self.packing = packing
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.walk = EpochWalk(len(examples), seed, "examples")

    def _peek(self) -> Example:
        return self.examples[self.walk.peek()]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.packing:
            picked = []
            for _ in range(self.batch_size):
                picked.append(self.examples[self.walk.take()])
            return pad_batch(picked, self.pad_id)
        rows: list[list[Example]] = []
        row: list[Example] = []
        used = 0
        while True:
            ex = self._peek()
            if used + len(ex[0]) > self.max_seq_len:  # row full: the example opens the next row
                rows.append(row)
                row, used = [], 0
                if len(rows) == self.batch_size:
                    break
            row.append(ex)
            used += len(ex[0])
            self.walk.advance()
        return pack_rows(rows, self.max_seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return self.walk.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.walk.load_state_dict(state)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Validation batches in a fixed order (the examples' own), right-padded."""
    return [pad_batch(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
