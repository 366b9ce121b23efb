"""Spec problems as users read them: a dotted YAML path, a line, and what to write instead.

    raise SpecError(file, [SpecIssue(path="stages.sft.train.lr", line=12, message="...")])
    structural_issues(validation_error)      # pydantic's errors, translated: nearest key, renamed keys

`llmlab validate` prints `SpecError.issues`; `llmlab.spec.load` collects them. Never imports torch.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from llmlab.spec.base import Loc
from llmlab.spec.blocks import OPTIMIZER_CLASSES, OPTIMIZER_NAMES
from llmlab.spec.pipeline import Pipeline
from llmlab.spec.stages import STAGE_KINDS


class SpecIssue(BaseModel):
    """One problem: where (dotted YAML path, line) and what to do."""

    path: str
    line: int | None
    message: str

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {self.path or '<top>'}: {self.message}"


class SpecError(Exception):
    """Raised by load_spec with every issue found; str() is the full report."""

    def __init__(self, file: str, issues: list[SpecIssue]):
        self.file, self.issues = file, issues
        super().__init__("\n".join(i.render(file) for i in issues))


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated / list / dict annotations."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a)]
    return [tp]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The spec class owning the key at a raw pydantic `loc` (union tags still in it)."""
    current: Any = Pipeline
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        kinds = _unwrap(field.annotation)
        container = next((t for t in kinds if typing.get_origin(t) in (list, dict)), None)
        if container is not None:
            if parts:
                parts.pop(0)  # the list index or dict key
            kinds = _unwrap(typing.get_args(container)[-1])
        models = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        if field.discriminator is not None or len(models) > 1:  # pydantic puts the tag next
            tag = parts.pop(0) if parts else None
            models = [m for m in models if tag in (_kind(m, "kind"), _kind(m, "name"))]
        if not models:
            return None
        current = models[0]
    return current


def _kind(cls: Any, field: str = "kind") -> str | None:
    f = getattr(cls, "model_fields", {}).get(field)
    args = typing.get_args(f.annotation) if f is not None else ()
    return args[0] if args else None


def _clean_loc(loc: Loc) -> Loc:
    """Drop the discriminator tags pydantic inserts into union locations."""
    out: list[Union[str, int]] = []
    for part in loc:
        prev2 = out[-2] if len(out) >= 2 else None
        if prev2 == "stages" and part in STAGE_KINDS:
            continue
        if out and out[-1] == "optimizer" and part in OPTIMIZER_NAMES:
            continue
        out.append(part)
    return tuple(out)


def _nearest(key: str, valid: list[str]) -> list[str]:
    """The valid key a typo most likely meant: a whole word of it (lr_rate -> lr), else difflib."""
    words = [v for v in valid if v in key.split("_")]
    if words:
        return [max(words, key=len)]
    return difflib.get_close_matches(key, valid, n=1, cutoff=0.5)


def structural_issues(err: ValidationError) -> list[tuple[Loc, str]]:
    out = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(e["loc"]))
            if owner is not None and loc[-1] in owner.renamed:
                out.append((loc, f"'{loc[-1]}' is not a key here any more: {owner.renamed[loc[-1]]}"))
                continue
            valid = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
            near = _nearest(str(loc[-1]), valid)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
            owners = [n for n, c in OPTIMIZER_CLASSES.items() if c is not owner and loc[-1] in c.model_fields]
            if owner in OPTIMIZER_CLASSES.values() and owners:  # a field of another optimizer
                out.append((loc, f"unknown key '{loc[-1]}' for optimizer '{_kind(owner, 'name')}' — "
                                 f"'{loc[-1]}' is a field of {', '.join(owners)}"))
                continue
            out.append((loc, f"unknown key '{loc[-1]}' — {hint}"))
        elif e["type"] == "union_tag_invalid":
            tag = str(e["input"].get("kind", e["input"].get("name", ""))) if isinstance(e["input"], dict) else ""
            expected = e["ctx"]["expected_tags"]
            near = difflib.get_close_matches(tag, [t.strip(" '") for t in expected.split(",")], n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            out.append((loc, f"unknown value '{tag}': {hint}choose one of {expected}"))
        elif e["type"] == "union_tag_not_found":
            out.append((loc, f"missing '{e['ctx']['discriminator'].strip(chr(39))}': say which kind of block this is"))
        elif e["type"] == "missing":
            out.append((loc, "required field is missing"))
        else:
            out.append((loc, f"{e['msg']} (got {e['input']!r})" if not isinstance(e["input"], (dict, list)) else e["msg"]))
    return out
