"""The pipeline spec: pydantic models of the YAML file, strict loading, every error at once.

    from llmlab.spec import load_spec
    spec = load_spec("pipelines/tiny.yaml")      # raises SpecError listing every problem

`llmlab validate FILE` prints `SpecError.issues`; `llmlab schema` prints `Pipeline.model_json_schema()`.
Field names follow LLM-Lab's ModelConfig / TrainingConfig, which llmlab grew from. Structure errors
come from pydantic; cross-field rules live next to the fields in `rules()` methods and are checked
for every block that parsed, so one run of `validate` reports everything. This module never imports
torch.
"""


from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator, Union

import yaml
from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter, ValidationError

from llmlab.data.sources import DataSource
from llmlab.spec_base import Loc, StrictModel
from llmlab.spec_graph import ROUND, Graph, Selection, Variant, expand
from llmlab.spec_blocks import (
    OPTIMIZER_CLASSES,
    OPTIMIZER_NAMES,
    Adafactor,
    AdamW,
    DistributedSpec,
    Lion,
    LoraSpec,
    ModelSpec,
    Muon,
    OptimizerSpec,
    SGD,
    Sophia,
    TokenizerSpec,
    TokenizerTrain,
    TrainBase,
    TrainSpec,
)
from llmlab.spec_stages import (
    DEFAULT_PROMPTS,
    STAGE_KINDS,
    DpoStage,
    DpoTrain,
    EvalModel,
    EvalStage,
    ExportStage,
    GrpoStage,
    MergeStage,
    PpoStage,
    PreferencesStage,
    PretrainStage,
    RewardStage,
    RewardTrain,
    RlStageBase,
    RlTrain,
    SftStage,
    SftTrain,
    Stage,
    StageBase,
)

__all__ = [
    "OPTIMIZER_CLASSES", "OPTIMIZER_NAMES", "Adafactor", "AdamW", "DataSource", "DistributedSpec", "Lion", "Loc",
    "LoraSpec", "ModelSpec", "Muon", "OptimizerSpec", "SGD", "Sophia", "StrictModel", "TokenizerSpec", "TokenizerTrain",
    "TrainBase", "TrainSpec", "DEFAULT_PROMPTS", "STAGE_KINDS", "DpoStage", "DpoTrain", "EvalModel", "EvalStage", "ExportStage", "GrpoStage",
    "MergeStage", "PpoStage", "PreferencesStage", "PretrainStage", "RewardStage", "RewardTrain", "RlStageBase", "RlTrain", "SftStage",
    "SftTrain", "Stage", "StageBase", "TrackingSpec", "Pipeline", "SpecIssue", "SpecError", "parse_spec", "load_spec",
    "config_hash", "json_schema",
]


class TrackingSpec(StrictModel):
    """Where MLflow records runs. None = $MLFLOW_TRACKING_URI, else SQLite under the state dir."""

    uri: str | None = None
    experiment: str | None = None  # None = the pipeline name
    wait_seconds: float = Field(60.0, ge=0)  # at a stage's end, how long to wait for an MLflow that stopped answering


class RepeatSpec(StrictModel):
    """Rounds: run `stages` (consecutive in the spec) `times` times, each round from the last one's model."""

    stages: list[str] = Field(min_length=1)
    times: int = Field(ge=1, le=100)


class PromoteSpec(StrictModel):
    """Give the registered model of stage `model` the MLflow alias `alias` only when every gate holds.
    Gates are `METRIC OP BOUND` over the stage's metrics and those `metrics_from` (an eval stage)
    reported for it (`exact_match` for its `dpo/exact_match`); a bound `champion.<metric>` is the
    recorded metric of the version that holds the alias now (no holder yet: such gates pass)."""

    model: str
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    gates: list[str] = Field(default_factory=list)
    metrics_from: str | None = None

    def rules(self) -> Iterator[tuple[Loc, str]]:
        from llmlab.gates import parse_gate

        for i, gate in enumerate(self.gates):
            try:
                parse_gate(gate)
            except ValueError as exc:
                yield ("gates", i), str(exc)


class Pipeline(StrictModel):
    """A whole pipeline: tokenizer, architecture, and named stages in declaration order. After
    loading, `stages` holds the concrete stages (sweeps fanned out, rounds unrolled:
    `llmlab.spec_graph`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # MLflow experiment, Prefect run
    seed: int = 1234
    workdir: str | None = None  # stage outputs go to <workdir>/<stage>/; None = runs/<name>
    tokenizer: TokenizerSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    stages: dict[str, Stage] = Field(min_length=1)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    repeat: RepeatSpec | list[RepeatSpec] | None = None  # groups of stages run in rounds
    promote: PromoteSpec | None = None  # which model gets the champion alias, and when
    max_parallel: int | None = Field(None, ge=1)  # branches run at once; None = one per visible GPU, 1 on CPU
    _graph: Graph | None = PrivateAttr(None)

    @property
    def output_root(self) -> str:
        return self.workdir or f"runs/{self.name}"

    @property
    def graph(self) -> Graph:
        if self._graph is None:  # a Pipeline built directly, not by load_spec: no sweeps, no rounds
            g = Graph(order=list(self.stages))
            for name, stage in self.stages.items():
                g.refs[name] = {r: r for r in stage.inputs}
                g.variants[name] = Variant(name)
                g.folders[name] = name
            self._graph = g
        return self._graph

    def stage_names(self) -> list[str]:
        """All concrete stages in execution order, the implicit `tokenizer` stage first when it trains."""
        first = ["tokenizer"] if self.tokenizer.train is not None else []
        return first + list(self.graph.order)

    def stage_dir(self, stage: str) -> Path:
        """The folder of a concrete stage: `<workdir>/<stage>`, `<workdir>/<stage>/<variant>` for a
        branch of a sweep, `<workdir>/<stage>/round-<k>` for a round."""
        return Path(self.output_root) / self.graph.folders.get(stage, stage)

    def dependencies(self, stage: str, chosen: str | None = None) -> dict[str, str]:
        """{name the stage reads: concrete stage} including the trained tokenizer; for a stage that
        selects a branch, `chosen` names the winning branch of its judge (else the first one's refs)."""
        deps = {"tokenizer": "tokenizer"} if self.tokenizer.train is not None and stage != "tokenizer" else {}
        if stage == "tokenizer":
            return deps
        selection = self.graph.selections.get(stage)
        if selection is not None and chosen is not None:
            return {**deps, **selection.options[chosen]}
        return {**deps, **self.graph.refs[stage]}

    def variant(self, stage: str) -> Variant:
        return self.graph.variants.get(stage) or Variant(stage)

    def branch_values(self, stage: str) -> dict[str, Any]:
        """The swept values a concrete stage runs with or follows (an eval branch: its dpo branch's)."""
        variant = self.variant(stage)
        values: dict[str, Any] = {}
        for base, label in variant.assign.items():
            values.update(self.graph.labels.get(base, {}).get(label, {}))
        return {**values, **variant.values}

    def selection(self, stage: str) -> Selection | None:
        return self.graph.selections.get(stage)

    def base_stage(self, stage: str) -> str:
        """The stage as the spec file names it (`dpo` for `dpo[beta=0.1]` and `dpo#2`)."""
        return self.variant(stage).base

    def expand_names(self, names: list[str]) -> list[str]:
        """Concrete stages for names a user gives: a written stage means all its branches and rounds."""
        out = []
        for n in names:
            out += [n] if n == "tokenizer" or n in self.graph.variants else self.graph.branches(n)
        return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- loading


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


def _dotted(loc: Loc) -> str:
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


def _drop(raw: Any, locs: list[Loc]) -> Any:
    """A deep copy of `raw` without the keys at `locs` (so defaults stand in for bad values)."""
    import copy

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


def _structural_issues(err: ValidationError) -> list[tuple[Loc, str]]:
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


def _graph_issues(raw: dict) -> Iterator[tuple[Loc, str]]:
    """`from` must name an earlier stage (or the tokenizer); no stage may depend on itself."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return
    seen = ["tokenizer"] if isinstance(raw.get("tokenizer"), dict) and "train" in raw["tokenizer"] else []
    names = list(stages)
    if "tokenizer" in names:
        yield ("stages", "tokenizer"), "the name 'tokenizer' is reserved for the tokenizer stage: rename this stage"
    for name in names:
        if any(c in str(name) for c in "[]#/;:,= "):
            yield ("stages", name), "stage names may not contain [ ] # / ; : , = or spaces (branches and rounds use them)"
    groups = raw.get("repeat")
    groups = [groups] if isinstance(groups, dict) else (groups if isinstance(groups, list) else [])
    rounds = {s: g.get("times") for g in groups if isinstance(g, dict) for s in (g.get("stages") or []) if isinstance(s, str)}
    for name, body in stages.items():
        src = body.get("from") if isinstance(body, dict) else None
        deps = [("from", d) for d in ([src] if isinstance(src, str) else (src or []))]
        for key in ("reference_stage", "reward_stage"):
            if isinstance(body, dict) and isinstance(body.get(key), str):
                deps.append((key, body[key]))
        for key, dep in deps:
            if not isinstance(dep, str):
                continue
            round_ref = ROUND.match(dep)
            if round_ref and round_ref["base"] in names:
                times = rounds.get(round_ref["base"])
                if times is None:
                    yield (("stages", name, key), f"'{dep}' names a round, but '{round_ref['base']}' is in no `repeat` group")
                    continue
                if not 1 <= int(round_ref["k"]) <= int(times):
                    yield (("stages", name, key), f"'{dep}': '{round_ref['base']}' runs rounds 1 to {times}")
                    continue
                if round_ref["base"] in rounds and name in rounds:
                    yield (("stages", name, key), f"'{dep}': a repeated stage reads its own round's stages by their names")
                    continue
                dep = round_ref["base"]
            if dep == name:
                yield (("stages", name, key), f"stage '{name}' cannot take its own output (a cycle)")
            elif dep in names and dep not in seen:
                yield (("stages", name, key), f"'{dep}' is declared after '{name}': a stage may only use earlier stages (declare '{dep}' first; cycles are not allowed)")
            elif dep not in names:
                near = difflib.get_close_matches(dep, [n for n in names if n != name], n=1)
                hint = f" — did you mean '{near[0]}'?" if near else f" (stages: {', '.join(names)})"
                yield (("stages", name, key), f"unknown stage '{dep}'{hint}")
            elif isinstance(stages.get(dep), dict):
                dep_kind = stages[dep].get("kind")
                if key == "reward_stage" and dep_kind != "reward":
                    yield (("stages", name, key), f"reward_stage '{dep}' is a {dep_kind} stage; name a stage of kind reward "
                                                  f"(or use `reward:` for a builtin, module:function or reward model)")
                elif key != "reward_stage" and dep_kind == "reward":
                    yield (("stages", name, key), f"'{dep}' is a reward model (a scalar head), not a language model: "
                                                  f"use it as `reward_stage` of a ppo or grpo stage")
                elif stages[dep].get("lora") and isinstance(body, dict) and body.get("kind") != "merge":
                    yield (("stages", name, key), f"'{dep}' trains LoRA adapters, not a whole model: add a stage "
                                                  f"`{dep}_merged: {{kind: merge, from: {dep}}}` after it and use that here")
        if isinstance(body, dict) and body.get("kind") == "dpo" and not body.get("data"):
            up = stages.get(src) if isinstance(src, str) else None
            if not (isinstance(up, dict) and up.get("kind") == "preferences"):
                yield (("stages", name, "data"), "dpo needs preference pairs: give `data`, or start `from` a preferences stage")
        if isinstance(body, dict) and body.get("kind") == "merge" and isinstance(src, str) and isinstance(stages.get(src), dict):
            up = stages[src]
            lora_kinds = ("sft", "dpo", "ppo", "grpo")  # the stage kinds that can train adapters
            if up.get("kind") not in lora_kinds or not up.get("lora"):
                yield (("stages", name, "from"), f"merge needs adapters, but stage '{src}' has none "
                        f"(it is {up.get('kind')}{' without lora' if up.get('kind') in lora_kinds else ''}): merge a "
                        f"stage with a lora block ({', '.join(lora_kinds)})")
        seen.append(name)


def _stage_issues(body: dict) -> list[tuple[Loc, str]]:
    """Every problem of one stage body (a swept variant), located within the body."""
    try:
        parsed = TypeAdapter(Stage).validate_python(body)
    except ValidationError as err:
        return [(loc[1:] if loc and loc[0] in STAGE_KINDS else loc, msg) for loc, msg in _structural_issues(err)]
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
        found += _structural_issues(err)
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
    found += list(_graph_issues(raw))
    if not found:
        graph, concrete, graph_issues = expand(raw, _stage_issues)
        found += graph_issues
    if found:
        lines = _line_map(text)
        unique = sorted(dict.fromkeys(found), key=lambda f: _line_for(lines, f[0]) or 0)
        raise SpecError(file, [SpecIssue(path=_dotted(loc), line=_line_for(lines, loc), message=msg) for loc, msg in unique])
    assert spec is not None
    if list(concrete) != list(spec.stages) or graph.selections:
        spec = Pipeline.model_validate({**raw, "stages": concrete})
    spec._graph = graph
    return spec


def load_spec(path: str | Path) -> Pipeline:
    """Read and validate a spec file; raise SpecError (every issue) or FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [SpecIssue(path="", line=None, message="file not found: check the path")])
    return parse_spec(path.read_text(), str(path))


def config_hash(obj: Any) -> str:
    """A stable short hash of any JSON-able config (pydantic models are dumped by alias)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def json_schema() -> dict:
    """The JSON Schema of the spec, for editors (`llmlab schema > llmlab.schema.json`)."""
    return Pipeline.model_json_schema(by_alias=True)

