"""Orders and splits of examples: `held_out` (the one hash rule that keeps validation data out of
training) and `EpochWalk`, a resumable, seeded, per-epoch shuffled walk over N items — the cursor
of every in-memory batch source (SFT examples, preference pairs).

    walk = EpochWalk(len(items), seed)
    i = walk.peek(); walk.advance()          # or: i = walk.take()
    state = walk.state_dict()                # {"epoch", "position"}: resumes the exact order

Each epoch visits every item once in the order of `random.Random(f"{seed}:{epoch}")`; a walk that
reaches an epoch's end continues into the next epoch's order.
"""

from __future__ import annotations

import hashlib
import json
import random


def held_out(key: object, fraction: float) -> bool:
    """Whether an example belongs to the held-out share `fraction`: a stable hash of the example
    itself (text, or JSON of a conversation / pair), the same on every run and machine, so an
    example and every copy of it always land on the same side."""
    if fraction <= 0:
        return False
    blob = key if isinstance(key, str) else json.dumps(key, sort_keys=True, ensure_ascii=False)
    h = int.from_bytes(hashlib.blake2b(blob.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class EpochWalk:
    def __init__(self, n: int, seed: int, what: str = "items"):
        if n < 1:
            raise ValueError(f"nothing to iterate over: 0 {what}")
        self.n, self.seed, self.what = n, seed, what
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def peek(self) -> int:
        """The index of the next item (rolling over into the next epoch when this one is done)."""
        if self.position >= self.n:
            self.epoch += 1
            self.position = 0
        if self._order_epoch != self.epoch:
            self._order = list(range(self.n))
            random.Random(f"{self.seed}:{self.epoch}").shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order[self.position]

    def advance(self) -> None:
        self.position += 1

    def take(self) -> int:
        i = self.peek()
        self.advance()
        return i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] <= self.n:
            raise ValueError(f"batch position {state['position']} is outside these {self.n} {self.what}; "
                             f"was the state saved for other data?")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
