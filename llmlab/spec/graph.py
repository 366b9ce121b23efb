"""The spec as a graph of concrete stages: sweeps fanned out into branches, rounds unrolled.

    graph, stages, issues = expand(raw)       # raw: the YAML mapping, already valid stage by stage
    graph.order                               # ['pretrain', 'dpo[beta=0.1]', 'dpo[beta=0.3]', 'eval[beta=0.1]', ...]
    graph.refs['eval[beta=0.1]']              # {'sft': 'sft', 'dpo': 'dpo[beta=0.1]'}

A stage with `sweep: {beta: [0.1, 0.3], train.lr: [1e-4, 3e-4]}` becomes one concrete stage per
variant (the grid, or the lists paired with `sweep_mode: zip`), named by its values
(`dpo[beta=0.1,train.lr=0.0001]`) with its own folder (`dpo/beta=0.1,train.lr=0.0001/`), config and
cache key. A stage reading a branched stage fans out the same way, one branch per upstream branch
(`eval[beta=0.1,train.lr=0.0001]`), unless it carries `select: {stage, metric, mode}`: then it stays
one stage and takes the upstream branch whose `select.stage` branch scored best, chosen at run time
(`Selection`). A stage keeps the names it was written with (`from: dpo`), so its runner, metric
names (`dpo/exact_match`) and config are the same in every branch; `refs` binds those names to
concrete stages.

`repeat: {stages: [preferences, dpo], times: 3}` unrolls a group of consecutive stages into rounds
(`preferences#1, dpo#1, preferences#2, ...`, folders `dpo/round-2/`); round k > 1 starts where the
group started (the stage the group's first stage reads from) from round k-1's last model. Later
stages that name a group stage get its last round; `dpo#1` names a round. Never imports torch.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from llmlab.spec.base import Loc
from llmlab.spec.stages import REF_KEYS, STAGE_CLASSES

Check = Callable[[dict], list]  # a stage body -> its problems as (location in the body, message)

ROUND = re.compile(r"^(?P<base>.+)#(?P<k>\d+)$")
FIXED = ("kind", "from", "sweep", "sweep_mode", "select", *REF_KEYS)  # what a sweep may not vary


def makes_model(body: dict) -> bool:
    """Whether a raw stage body's kind makes a model a later stage can start from."""
    cls = STAGE_CLASSES.get(body.get("kind"))  # type: ignore[arg-type]
    return cls is not None and cls.makes_model


@dataclass
class Selection:
    """How a stage that reads a branched stage picks one branch: the `stage` branch with the best
    `metric`; `options` maps each of its concrete branches to the refs this stage then binds."""

    stage: str
    metric: str
    mode: str
    options: dict[str, dict[str, str]]


@dataclass
class Variant:
    """Where a concrete stage comes from: its written stage, its branch label and swept values, its round."""

    base: str
    label: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # this stage's own swept field -> value
    assign: dict[str, str] = field(default_factory=dict)  # swept stage -> branch label it belongs to
    round: int | None = None


@dataclass
class Graph:
    order: list[str] = field(default_factory=list)  # concrete stages in execution order (no tokenizer)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)  # concrete -> {name it reads: concrete}
    variants: dict[str, Variant] = field(default_factory=dict)
    selections: dict[str, Selection] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)  # concrete -> folder under the workdir
    labels: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # swept stage -> label -> values

    def branches(self, base: str) -> list[str]:
        """The concrete stages a written stage became (itself alone when it was not fanned out)."""
        return [n for n in self.order if self.variants[n].base == base]

    def narrowed(self, narrow: dict[str, dict[str, list[Any]]]) -> tuple[set[str], list[str]]:
        """The concrete stages left when each swept stage keeps only the listed values
        (`{"dpo": {"beta": [0.1]}}`), and what in `narrow` does not fit the spec."""
        problems: list[str] = []
        narrow = _narrow_shape(narrow, problems)
        keep_labels: dict[str, set[str]] = {}
        for base, fields in narrow.items():
            if base not in self.labels:
                problems.append(f"stage '{base}' has no sweep (swept: {', '.join(self.labels) or 'none'})")
                continue
            ok = set()
            for label, values in self.labels[base].items():
                unknown = [p for p in fields if p not in values]
                if unknown:
                    problems.append(f"stage '{base}' sweeps {', '.join(values)}, not {', '.join(unknown)}")
                    break
                if all(values[p] in [_norm(v) for v in vs] for p, vs in fields.items()):
                    ok.add(label)
            if not ok and not problems:
                problems.append(f"no variant of stage '{base}' has {fields}")
            keep_labels[base] = ok
        keep = {n for n in self.order if all(self.variants[n].assign.get(b) in ok
                                             for b, ok in keep_labels.items() if b in self.variants[n].assign)}
        return keep, problems


def _narrow_shape(narrow: Any, problems: list[str]) -> dict[str, dict[str, list[Any]]]:
    """`{stage: {field: [values]}}` as given by a deployment's `sweep` parameter; one value may stand
    for a list of one. Anything else becomes a problem, in one sentence."""
    example = 'e.g. {"dpo": {"beta": [0.1, 0.3]}}'
    if not isinstance(narrow, dict):
        problems.append(f"sweep must map a stage to {{field: [values]}} ({example}), not {json.dumps(narrow)}")
        return {}
    out: dict[str, dict[str, list[Any]]] = {}
    for base, fields in narrow.items():
        if not isinstance(fields, dict) or not fields:
            problems.append(f"sweep.{base} must map a swept field to the values to keep ({example}), not {json.dumps(fields)}")
            continue
        out[base] = {field: list(values) if isinstance(values, list) else [values] for field, values in fields.items()}
    return out


def _norm(value: Any) -> Any:
    """Values as YAML/JSON give them (ints stay ints, 1e-4 a float) so `--param` lists compare."""
    return json.loads(json.dumps(value))


def fmt_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def refs_of(body: dict) -> list[str]:
    """The stage names a raw stage body reads: `from` (one or a list), reference_stage, reward_stage."""
    src = body.get("from")
    names = [src] if isinstance(src, str) else [s for s in (src or []) if isinstance(s, str)]
    names += [body[k] for k in REF_KEYS if isinstance(body.get(k), str)]
    return list(dict.fromkeys(names))


def _set_path(body: dict, path: str, value: Any) -> None:
    node: Any = body
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list) and parts[-1].isdigit():
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def sweep_variants(sweep: dict[str, list[Any]], mode: str) -> list[dict[str, Any]]:
    """The swept values of each variant: the grid of every list (in key order), or the lists paired."""
    keys = list(sweep)
    rows = zip(*sweep.values()) if mode == "zip" else itertools.product(*sweep.values())
    return [dict(zip(keys, row)) for row in rows]


def variant_label(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={fmt_value(v)}" for k, v in values.items())


def _sweep_issues(name: str, body: dict) -> Iterator[tuple[Loc, str]]:
    sweep = body.get("sweep")
    if not isinstance(sweep, dict) or not sweep:
        yield ("stages", name, "sweep"), "a sweep maps field paths to lists of values, e.g. {beta: [0.1, 0.3]}"
        return
    for path, values in sweep.items():
        loc = ("stages", name, "sweep", path)
        if path.split(".")[0] in FIXED:
            yield loc, f"a sweep varies a stage's settings, not '{path.split('.')[0]}': sweep the upstream stage instead"
        elif not isinstance(values, list) or not values:
            yield loc, "give a non-empty list of values"
        elif len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            yield loc, "a value appears twice: each variant must differ"
    lengths = {len(v) for v in sweep.values() if isinstance(v, list)}
    if body.get("sweep_mode") == "zip" and len(lengths) > 1:
        yield ("stages", name, "sweep_mode"), (f"zip pairs the lists value by value, but they have different lengths "
                                               f"({sorted(lengths)}): give every list the same length, or use grid")


def _variant_issues(name: str, body: dict, values: dict[str, Any], check: Check) -> Iterator[tuple[Loc, str]]:
    """Validate one variant's body: a bad swept value points at its sweep entry."""
    for loc, msg in check(body):
        path = ".".join(str(p) for p in loc)
        hit = next((p for p in values if path == p or path.startswith(p + ".")), None)
        where = ("stages", name, "sweep", hit) if hit else ("stages", name, "sweep")
        yield where, f"variant {variant_label(values)}: {path}: {msg.split(' — valid keys:')[0]}"


def _repeat_groups(raw: dict, names: list[str]) -> tuple[list[dict], list[tuple[Loc, str]]]:
    groups = raw.get("repeat")
    groups = [groups] if isinstance(groups, dict) else list(groups or [])
    issues: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    stages = raw["stages"]
    for i, g in enumerate(groups):
        loc: Loc = ("repeat",) if isinstance(raw.get("repeat"), dict) else ("repeat", i)
        members = g.get("stages") or []
        unknown = [s for s in members if s not in names]
        if unknown:
            issues.append((loc + ("stages",), f"unknown stage(s) {unknown} (stages: {', '.join(names)})"))
            continue
        idx = sorted(names.index(s) for s in members)
        if idx != list(range(idx[0], idx[0] + len(idx))) or [names[j] for j in idx] != list(members):
            issues.append((loc + ("stages",), "list the group's stages in their declared order, with no other stage "
                                              "between them: a round runs them one after another"))
            continue
        if seen & set(members):
            issues.append((loc + ("stages",), f"{sorted(seen & set(members))} already repeat in another group"))
        seen |= set(members)
        for s in members:
            if stages[s].get("sweep") or stages[s].get("select"):
                issues.append((loc + ("stages",), f"stage '{s}' sweeps or selects; a repeated group cannot (sweep a stage "
                                                  f"before the group instead)"))
        producers = [s for s in members if makes_model(stages[s])]
        if not producers:
            kinds = "/".join(k for k, cls in STAGE_CLASSES.items() if cls.makes_model)
            issues.append((loc + ("stages",), f"no stage of {members} makes a model, so a round has nothing to hand "
                                              f"to the next: include a {kinds} stage"))
        elif stages[producers[-1]].get("lora"):
            issues.append((loc + ("stages",), f"'{producers[-1]}' trains LoRA adapters, which the next round cannot start "
                                              f"from: add a merge stage after it to the group"))
        first = refs_of(stages[members[0]])
        if not first or first[0] in members:
            issues.append((loc + ("stages",), f"the group's first stage '{members[0]}' must start `from` a stage before "
                                              f"the group (round 2 starts from round 1's model instead)"))
    return groups, issues


def expand(raw: dict, check: Check) -> tuple[Graph, dict[str, dict], list[tuple[Loc, str]]]:
    """Concrete stages (name -> raw body) and their graph, from a raw spec whose blocks are valid;
    `check` validates a swept variant's body."""
    stages: dict[str, dict] = raw["stages"]
    names = list(stages)
    graph = Graph()
    issues: list[tuple[Loc, str]] = []
    out: dict[str, dict] = {}
    groups, group_issues = _repeat_groups(raw, names)
    issues += group_issues
    if issues:
        return graph, out, issues
    group_of = {s: g for g in groups for s in g["stages"]}
    latest: dict[str, list[str]] = {}  # written name -> the concrete stages a later reference fans over

    def add(name: str, body: dict, variant: Variant, refs: dict[str, str], folder: str) -> None:
        out[name] = body
        graph.order.append(name)
        graph.refs[name] = refs
        graph.variants[name] = variant
        graph.folders[name] = folder

    def options(ref: str) -> list[str]:
        if ROUND.match(ref) and ref in graph.variants:
            return [ref]
        return latest.get(ref, [])

    for base in names:
        body = {k: v for k, v in stages[base].items() if k not in ("sweep", "sweep_mode", "select")}
        group = group_of.get(base)
        if group is not None:
            if base != group["stages"][0]:
                continue
            issues += _unroll(stages, group, latest, add)
            continue
        refs = refs_of(stages[base])
        opts = {r: options(r) for r in refs}
        select = stages[base].get("select")
        if select:
            found = _selecting(base, body, stages, select, opts, latest, graph, add)
            if found:  # reported; checked on as a stage that reads the first branches
                add(base, body, Variant(base), {r: o[0] for r, o in opts.items() if o}, base)
            issues += found
            latest[base] = [base]
            continue
        own = []
        if stages[base].get("sweep") is not None:
            found = list(_sweep_issues(base, stages[base]))
            if not found:
                for values in sweep_variants(stages[base]["sweep"], stages[base].get("sweep_mode", "grid")):
                    variant_body = copy.deepcopy(body)
                    for path, value in values.items():
                        _set_path(variant_body, path, value)
                    found += [f for f in _variant_issues(base, variant_body, values, check)
                              if f[0] not in [g[0] for g in found]]  # one message per swept field
                    own.append((variant_label(values), values, variant_body))
            issues += found
            if found:
                own = []  # reported; later stages are checked as if this one did not sweep
            else:
                graph.labels[base] = {label: {k: _norm(v) for k, v in values.items()} for label, values, _ in own}
        origins: list[str] = []
        for r in refs:
            for o in opts[r]:
                origins += [b for b in graph.variants[o].assign if b not in origins]
        combos = list(itertools.product(*[list(graph.labels[o]) for o in origins])) if origins else [()]
        made = []
        for combo in combos:
            assign = dict(zip(origins, combo))
            bound = {r: next(o for o in opts[r] if all(assign.get(b) == lab for b, lab in graph.variants[o].assign.items()))
                     for r in refs}
            for label, values, variant_body in own or [("", {}, body)]:
                full = {**assign, **({base: label} if own else {})}
                text = _branch_text(full)
                name = f"{base}[{text}]" if text else base
                folder = f"{base}/{text.replace('/', '_')}" if text else base
                add(name, variant_body if own else copy.deepcopy(body),
                    Variant(base, text, values, full), bound, folder)
                made.append(name)
        latest[base] = made
    _promote_issues(raw, graph, latest, issues)
    return graph, out, issues


def _branch_text(assign: dict[str, str]) -> str:
    if len(assign) <= 1:
        return next(iter(assign.values()), "")
    return ";".join(f"{b}:{label}" for b, label in assign.items())


def _unroll(stages: dict[str, dict], group: dict, latest: dict[str, list[str]], add) -> list[tuple[Loc, str]]:
    members = group["stages"]
    times = int(group.get("times", 1))
    entry = refs_of(stages[members[0]])[0]
    last_model = [s for s in members if makes_model(stages[s])][-1]
    issues: list[tuple[Loc, str]] = []
    for k in range(1, times + 1):
        for s in members:
            refs = {}
            for r in refs_of(stages[s]):
                if r in members:
                    refs[r] = f"{r}#{k}"
                elif r == entry and k > 1:
                    refs[r] = f"{last_model}#{k - 1}"
                else:
                    found = latest.get(r, [])
                    if len(found) != 1:
                        issues.append((("stages", s, "from"), f"'{r}' is swept (branches {found}); a repeated group reads "
                                                              f"one model: give '{s}' a `select`-ed stage instead"))
                        continue
                    refs[r] = found[0]
            add(f"{s}#{k}", copy.deepcopy(stages[s]), Variant(s, f"round {k}", round=k), refs, f"{s}/round-{k}")
    for s in members:
        latest[s] = [f"{s}#{times}"]
    return issues


def _selecting(base: str, body: dict, stages: dict[str, dict], select: dict, opts: dict[str, list[str]],
               latest: dict[str, list[str]], graph: Graph, add) -> list[tuple[Loc, str]]:
    loc: Loc = ("stages", base, "select")
    judge = select.get("stage")
    if judge not in latest:
        return [(loc + ("stage",), f"'{judge}' is not a stage declared before '{base}'")]
    judged = latest[judge]
    origins = set(graph.variants[judged[0]].assign)
    if not origins:
        return [(loc + ("stage",), f"'{judge}' has one branch only: select compares the branches of a sweep (give an "
                                   f"upstream stage a `sweep`, or drop `select`)")]
    if stages[base].get("sweep") is not None:
        return [(loc,), "a stage either selects one upstream branch or sweeps its own fields, not both"]
    chosen: dict[str, dict[str, str]] = {}
    for j in judged:
        assign = graph.variants[j].assign
        bound = {}
        for r, options in opts.items():
            match = [o for o in options if all(assign.get(b) == lab for b, lab in graph.variants[o].assign.items())]
            if len(match) != 1:
                return [(loc + ("stage",), f"'{r}' fans out over sweeps that '{judge}' does not compare: select with a "
                                           f"stage that follows every sweep '{base}' reads")]
            bound[r] = match[0]
        chosen[j] = bound
    graph.selections[base] = Selection(judge, select.get("metric", ""), select.get("mode", "max"), chosen)
    add(base, body, Variant(base), dict(next(iter(chosen.values()))), base)
    return []


def _promote_issues(raw: dict, graph: Graph, latest: dict[str, list[str]], issues: list) -> None:
    promote = raw.get("promote")
    if not isinstance(promote, dict):
        return
    model = promote.get("model")
    if model not in latest:
        issues.append((("promote", "model"), f"unknown stage '{model}' (stages: {', '.join(latest)})"))
        return
    body = raw["stages"][graph.variants[latest[model][0]].base]
    kind = body.get("kind")
    if not makes_model(body):
        issues.append((("promote", "model"), f"'{model}' is a {kind} stage: promote a stage that makes a model"))
    src = promote.get("metrics_from")
    if src is not None and src not in latest:
        issues.append((("promote", "metrics_from"), f"unknown stage '{src}'"))
    elif src is not None and raw["stages"][graph.variants[latest[src][0]].base].get("kind") != "eval":
        issues.append((("promote", "metrics_from"), f"'{src}' is not an eval stage: name the eval stage that scored '{model}'"))
    if len(latest[model]) > 1:
        issues.append((("promote", "model"), f"'{model}' has {len(latest[model])} branches; promote one: name a stage "
                                             f"that `select`s from it"))
