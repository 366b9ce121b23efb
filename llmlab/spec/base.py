"""The base of every spec block: strict pydantic models whose fields document themselves.

    class MyBlock(StrictModel):
        a: int = Field(1, description="how many of a")
        def rules(self): yield ("a",), "a must be odd" if self.a % 2 == 0 else ...

Every field carries its `description`: `llmlab schema` shows it to editors, the wizard asks with it
and docs/spec.md is generated from it. `rules()` yields cross-field problems; `llmlab.spec.load`
collects them with the structural ones. `config_hash` is the short, stable hash of a resolved
config that cache keys and checkpoint identities use. Never imports torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, ClassVar, Iterator, Union

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

Loc = tuple[Union[str, int], ...]


class StrictModel(BaseModel):
    """Base of every spec block: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)
    # keys this block once had under another name or meaning: old key -> one sentence naming what to write instead
    renamed: ClassVar[dict[str, str]] = {}

    def rules(self) -> Iterator[tuple[Loc, str]]:
        """Cross-field problems of this block, as (location relative to the block, message)."""
        return iter(())


def redefault(cls: type[BaseModel], name: str, default: Any) -> FieldInfo:
    """`cls`'s field `name` with another default, its description and constraints kept: how a
    subclass gives an inherited field a default of its own (`lr: float = redefault(TrainBase, "lr", 5e-6)`)."""
    info = copy.copy(cls.model_fields[name])
    info.default = default
    return info


def config_hash(obj: Any) -> str:
    """A stable short hash of any JSON-able config (pydantic models are dumped by alias)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
