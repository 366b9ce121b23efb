"""Contamination: how many of a benchmark's documents a model's training data already held.

    index = NgramIndex(n=13)
    index.add_texts(training_texts(sources, kind, seed, val_fraction))   # each upstream training stage's
    index.share(["Return the sum of a and b ...", ...])                  # 0.0 .. 1.0

Text is compared as lower-case words (runs of letters, digits and underscores; chat-template tokens
such as `<|im_end|>` left out). A document counts as seen when one of its word n-grams (n = 13, as in
GPT-3's contamination study) occurs in the training text. A document shorter than n words is a whole
example (`347+5= 352` is three words): it counts as seen when a training example begins with it —
short word runs recur by chance anywhere in a corpus, so only a whole example counts. Training text is
what a stage trained on: its data sources' training split, without the share it held out by hash for
validation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

WORD = re.compile(r"\w+")
MARKUP = re.compile(r"<\|[^|<>]*\|>")  # chat-template tokens such as <|im_end|>: not words of the text
IGNORED_KEYS = ("role",)  # message fields that are not text the model read as content


def words(text: str) -> list[str]:
    return WORD.findall(MARKUP.sub(" ", text).lower())


def item_text(item: Any) -> str:
    """The text of one data item as a stage reads it — a document, a conversation's messages, a pair's
    prompt and answers, a prompt and its answer — joined with spaces (roles left out)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return " ".join(item_text(v) for k, v in item.items() if k not in IGNORED_KEYS)
    if isinstance(item, (list, tuple)):
        return " ".join(item_text(v) for v in item)
    return ""


def training_texts(sources: list[Any], kind: Any, seed: int, val_fraction: float) -> Iterator[str]:
    """The texts a stage trained on from `sources` (one data `Kind`): their training split, less what
    the stage held out by hash (a source with a validation split of its own holds none of it out)."""
    from llmlab.data.reader import stream
    from llmlab.data.sources import has_own_split

    own_validation = [has_own_split(source, "validation") for source in sources]
    for index, held, item in stream(sources, kind, seed, val_fraction):
        if held and not own_validation[index]:
            continue
        yield item_text(item)


class NgramIndex:
    """Training text as hashed word n-grams (every window of n words) and hashed beginnings of its
    examples (their first k words, for each length k < n a document of k words needs)."""

    def __init__(self, n: int = 13):
        self.n = n
        self.grams: set[int] = set()  # every n-word window of the training text
        self.starts: dict[int, set[int]] = {}  # k -> the first k words of each training example

    def sizes_for(self, documents: Iterable[str]) -> set[int]:
        """The example beginnings the documents need: the lengths of those shorter than n words."""
        return {len(w) for w in map(words, documents) if 0 < len(w) < self.n}

    def add_texts(self, texts: Iterable[str], sizes: set[int]) -> None:
        """Index every text (one training example each): its n-grams, and its first k words for k in `sizes`."""
        for k in sizes:
            self.starts.setdefault(k, set())
        n = self.n
        for text in texts:
            w = words(text)
            self.grams.update(hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1))
            for k in sizes:
                if len(w) >= k:
                    self.starts[k].add(hash(tuple(w[:k])))

    def seen(self, document: str) -> bool:
        w = words(document)
        if len(w) >= self.n:
            return any(hash(tuple(w[i:i + self.n])) in self.grams for i in range(len(w) - self.n + 1))
        return bool(w) and hash(tuple(w)) in self.starts.get(len(w), set())

    def share(self, documents: list[str]) -> float:
        """The share of `documents` seen in the indexed text (0 for no documents)."""
        return share_seen([self], documents)


def share_seen(indexes: list[NgramIndex], documents: list[str]) -> float:
    """The share of `documents` seen in any of `indexes` (each one stage's training text; 0 for no
    documents): the same as one index over all their text."""
    return sum(any(index.seen(d) for index in indexes) for d in documents) / len(documents) if documents else 0.0
