"""The base of every spec block: strict pydantic models that report cross-field problems.

    class MyBlock(StrictModel):
        a: int = 1  # what it is
        def rules(self): yield ("a",), "a must be odd" if self.a % 2 == 0 else ...

Blocks live next to the code that uses them (`llmlab.data.sources.DataSource`, `llmlab.spec_blocks`,
`llmlab.spec_stages`); `llmlab.spec` loads a whole pipeline and reports every problem at once.
Never imports torch.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Union

from pydantic import BaseModel, ConfigDict

Loc = tuple[Union[str, int], ...]


class StrictModel(BaseModel):
    """Base of every spec block: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)
    # keys this block had under an older name or meaning: old key -> what to write instead
    renamed: ClassVar[dict[str, str]] = {}

    def rules(self) -> Iterator[tuple[Loc, str]]:
        """Cross-field problems of this block, as (location relative to the block, message)."""
        return iter(())
