"""Loading a spec: parse the YAML, validate every block, check the graph, report every problem at once.

    from llmlab.spec import load_spec
    spec = load_spec("pipelines/tiny.yaml")      # raises SpecError listing every problem

Structure errors come from pydantic (`llmlab.spec.errors` translates them); cross-field rules live
next to the fields in `rules()` methods and are checked for every block that parsed, so one run of
`llmlab validate` reports everything; rules between stages are `llmlab.spec.references`, sweeps and
rounds `llmlab.spec.graph`. Never imports torch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import TypeAdapter, ValidationError

from llmlab.spec.base import Loc, StrictModel
from llmlab.spec.blocks import ModelSpec, TokenizerSpec
from llmlab.spec.errors import SpecError, SpecIssue, dotted, structural_issues
from llmlab.spec.graph import expand
from llmlab.spec.pipeline import Pipeline, PromoteSpec, TrackingSpec
from llmlab.spec.references import reference_issues
from llmlab.spec.stages import STAGE_KINDS, Stage, StageBase


def _drop(raw: Any, locs: list[Loc]) -> Any:
    """A deep copy of `raw` without the keys at `locs` (so defaults stand in for bad values)."""
    raw = copy.deepcopy(raw)
    for loc in locs:
        node = raw
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return raw


def _rule_issues(obj: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    """Walk a parsed block, yielding every `rules()` problem with its absolute location."""
    if isinstance(obj, StrictModel):
        for rel, msg in obj.rules():
            yield loc + rel, msg
        if isinstance(obj, StageBase):
            for rel, msg in obj.shared_issues():
                yield loc + rel, msg
        for name, field in type(obj).model_fields.items():
            yield from _rule_issues(getattr(obj, name), loc + (field.alias or name,))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _rule_issues(item, loc + (i,))
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _rule_issues(item, loc + (key,))


def _stage_issues(body: dict) -> list[tuple[Loc, str]]:
    """Every problem of one stage body (a swept variant), located within the body."""
    try:
        parsed = TypeAdapter(Stage).validate_python(body)
    except ValidationError as err:
        return [(loc[1:] if loc and loc[0] in STAGE_KINDS else loc, msg) for loc, msg in structural_issues(err)]
    return list(_rule_issues(parsed, ()))


def _line_map(text: str) -> dict[Loc, int]:
    """YAML path -> 1-based line, for pointing messages at the right place."""
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[loc + (key.value,)] = key.start_mark.line + 1
                walk(value, loc + (key.value,))
                lines[loc + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def parse_spec(text: str, file: str = "<spec>") -> Pipeline:
    """Parse and validate YAML text; raise SpecError with every issue."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(file, [SpecIssue(path="", line=line, message=f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(raw, dict):
        raise SpecError(file, [SpecIssue(path="", line=1, message="the spec must be a mapping with name, tokenizer, model and stages")])
    found: list[tuple[Loc, str]] = []
    spec = None
    try:
        spec = Pipeline.model_validate(raw)
    except ValidationError as err:
        found += structural_issues(err)
    # cross-field rules of every block that parses on its own, even when others do not
    # (keys with structural errors are dropped first, so their defaults stand in)
    bad = [loc for loc, _ in found]
    blocks: list[tuple[Loc, Any]] = [((k,), a) for k, a in (("model", ModelSpec), ("tokenizer", TokenizerSpec), ("tracking", TrackingSpec),
                                                              ("promote", PromoteSpec))]
    if isinstance(raw.get("stages"), dict):
        blocks += [(("stages", name), Stage) for name in raw["stages"]]
    cleaned = _drop(raw, bad)
    for loc, annotation in blocks:
        body = cleaned
        for part in loc:
            body = body.get(part) if isinstance(body, dict) else None
        if isinstance(body, dict):
            try:
                found += list(_rule_issues(TypeAdapter(annotation).validate_python(body), loc))
            except ValidationError:
                pass
    found += list(reference_issues(raw))
    if not found:
        graph, concrete, graph_issues = expand(raw, _stage_issues)
        found += graph_issues
    if found:
        lines = _line_map(text)
        unique = sorted(dict.fromkeys(found), key=lambda f: _line_for(lines, f[0]) or 0)
        raise SpecError(file, [SpecIssue(path=dotted(loc), line=_line_for(lines, loc), message=msg) for loc, msg in unique])
    assert spec is not None
    if list(concrete) != list(spec.stages) or graph.selections:
        spec = Pipeline.model_validate({**raw, "stages": concrete})
    spec._graph = graph
    return spec


def load_spec(path: str | Path) -> Pipeline:
    """Read and validate a spec file; raise SpecError (every issue) or FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        specs = sorted(p.name for p in path.glob("*.y*ml"))[:6]
        hint = f" (it holds {', '.join(specs)})" if specs else ""
        raise SpecError(str(path), [SpecIssue(path="", line=None, message=f"a folder, not a spec file: name one YAML spec "
                                              f"file in it{hint}, e.g. {path / (specs[0] if specs else 'pipeline.yaml')}")])
    if not path.is_file():
        raise SpecError(str(path), [SpecIssue(path="", line=None, message="file not found: check the path")])
    return parse_spec(path.read_text(), str(path))


def json_schema() -> dict:
    """The JSON Schema of the spec, for editors (`llmlab schema > llmlab.schema.json`)."""
    return Pipeline.model_json_schema(by_alias=True)
