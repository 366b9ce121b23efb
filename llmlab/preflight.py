"""Checks before anything runs: every local file, folder and model a spec names is opened and looked at.

    problems, notes = preflight(spec)          # llmlab validate and llmlab run call it
    for p in problems: print(p.render())       # stage 'sft': data/chats.jsonl: ... — fix ...

- Data: each local source of each stage (training data, eval text, tasks and pairs, the tokenizer's
  text) is opened and a sample read: it exists, is UTF-8, has rows, its format is detected (or the
  named `format:` fits) and the format's columns are in the sampled rows; too many malformed rows in
  the sample is a problem too. Built-in sources are ours and known good.
- Models: a stage's `model:` folder has a config and weights, and the head the stage needs — a
  causal LM when its kind samples or trains one (the record's `policy`) — and so does every other
  model its record names (a dpo `reference_model`, eval `models:`, a `reward:` model, which must be a
  sequence classifier); a model's tokenizer (or the stage's `tokenizer:`) has no more tokens than
  the model has embedding rows. Merge adapters and spec tokenizers exist.
- Hub names are checked when the hub is reachable; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
  they are skipped with a note, never downloaded. Online with a hub that does not answer, models in
  the local cache are used from there (one note, and the run goes offline); anything else stops the
  run before any stage, one line each.
- With `tracking.required`, MLflow must answer.

Nothing here imports torch unless a model folder's config lacks its `architectures` (then
transformers' Auto mappings are read), so `llmlab validate` stays quick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from llmlab.data.reader import Kind, detect_format
from llmlab.data.sources import BUILTIN_PREFIX, BadRow, DataSource, DataSourceError, open_rows
from llmlab.errors import UserError
from llmlab.reuse import folder_conflict
from llmlab.runners.context import stage_block
from llmlab.runners.registry import KINDS, kind_of
from llmlab.spec import Pipeline

PROBE_ROWS = 50  # rows of a local source read at validate time
SCAN_BYTES = 64 * 2**20  # a local file up to this size is read whole at validate time, for rows the run would skip
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Problem:
    """One thing that would fail a stage: which stage, what (file, model), why and the fix."""

    stage: str
    what: str
    message: str

    def render(self) -> str:
        return f"stage '{self.stage}': {self.what}: {self.message}" if self.stage else f"{self.what}: {self.message}"


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


HUB_ANSWER_SECONDS = 5.0
_hub_answers: dict[str, bool] = {}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_answers() -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers; asked once per process."""
    endpoint = hub_endpoint()
    if endpoint not in _hub_answers:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=HUB_ANSWER_SECONDS):
                _hub_answers[endpoint] = True
        except Exception:  # noqa: BLE001  not answering, however it fails
            _hub_answers[endpoint] = False
    return _hub_answers[endpoint]


def _hub_cache() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def cached_hub_file(name: str, filename: str) -> str | None:
    """The local cache's copy of a hub repository's file, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename, cache_dir=_hub_cache())
    return found if isinstance(found, str) else None


def hub_down_problems(spec: Pipeline) -> tuple[list[Problem], list[str]]:
    """Online, with hub names in the spec and a hub that does not answer: models and tokenizers in the
    local cache are used from there (one note; the run is switched to HF_HUB_OFFLINE so nothing waits
    on the hub), anything else is a problem before any stage runs."""
    if offline():
        return [], []
    models = [(name, named) for name, named in hub_model_names(spec)]
    datasets = [(name, source.path) for name, sources in
                ((n, kind_of(spec, n).sources(stage_block(spec, n))) for n in spec.stage_names())
                for source, _ in sources if not source.is_local and not source.path.startswith(BUILTIN_PREFIX)]
    if not (models or datasets) or hub_answers():
        return [], []
    endpoint, problems = hub_endpoint(), []
    for stage, name in models:
        if not (cached_hub_file(name, "config.json") or cached_hub_file(name, "tokenizer_config.json")):
            problems.append(Problem(stage, name, f"the Hugging Face hub at {endpoint} does not answer and this model is "
                                                 f"not in the local cache ({_hub_cache()}): check the network or "
                                                 f"HF_ENDPOINT, or download it where the hub answers and run with "
                                                 f"HF_HUB_OFFLINE=1"))
    for stage, name in datasets:
        problems.append(Problem(stage, name, f"the Hugging Face hub at {endpoint} does not answer, and an online run "
                                             f"reads datasets from it: retry when it answers, or set "
                                             f"HF_DATASETS_OFFLINE=1 to use a copy an earlier run cached"))
    if problems:
        return problems, []
    os.environ["HF_HUB_OFFLINE"] = "1"  # every hub model is cached: the stages read it from there without waiting
    return [], [f"the Hugging Face hub at {endpoint} does not answer: hub models are read from the local cache "
                f"({_hub_cache()}) for this run"]


def hub_model_names(spec: Pipeline) -> list[tuple[str, str]]:
    """(stage, hub name) of every hub model and tokenizer the spec names."""
    found = []
    if spec.tokenizer and spec.tokenizer.name and not _is_local(spec.tokenizer.name):
        found.append(("tokenizer", spec.tokenizer.name))
    for name, stage in spec.stages.items():
        start = getattr(stage, "model", None)
        if isinstance(start, str) and not _is_local(start):
            found.append((name, start))
        tok = getattr(stage, "tokenizer", None)
        if isinstance(tok, str) and not _is_local(tok):
            found.append((name, tok))
        for named in KINDS[stage.kind].models(stage):
            if named.need != "adapters" and not _is_local(named.path):
                found.append((name, named.path))
    return list(dict.fromkeys(found))


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~", "."))


# ----------------------------------------------------------------------------------------- data


def check_source(source: DataSource, kind: Kind) -> tuple[str | None, str | None]:
    """(what is wrong with a local source, a warning about it): a problem from a sample of its rows;
    then, for a file up to SCAN_BYTES, every row is read, and malformed ones past the sample — which
    the run skips, or stops at when they are more than max_bad_share — are a warning."""
    try:
        rows = list(islice(open_rows(source), PROBE_ROWS))  # a file that is not UTF-8 fails while reading
    except (DataSourceError, OSError) as e:
        return str(e), None
    if not rows:
        return "it has no rows: add rows, or remove it from the stage's data", None
    good = [r for _, r in rows if not isinstance(r, BadRow)]
    bad = [(w, r.error) for w, r in rows if isinstance(r, BadRow)]
    if not good:
        return f"none of its first {len(rows)} rows can be read ({bad[0][0]}: {bad[0][1]})", None
    try:
        fmt = detect_format(good, source, kind)
    except DataSourceError as e:
        return str(e), None
    convert = kind.formats[fmt].convert

    def malformed(where: str, row: Any) -> tuple[str, str] | None:
        if isinstance(row, BadRow):
            return where, row.error
        try:
            convert(row, source)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return where, f"{type(e).__name__}: {e}"
        return None

    bad = [b for b in (malformed(w, r) for w, r in rows) if b]
    if len(bad) > source.max_bad_share * len(rows):
        return (f"{len(bad)} of its first {len(rows)} rows are malformed as {kind.name} data in format {fmt!r} "
                f"(first: {bad[0][0]}: {bad[0][1]}); fix them, set `format:`, or raise max_bad_share"), None
    path = Path(source.path).expanduser()
    if not path.is_file() or path.stat().st_size > SCAN_BYTES or len(rows) < PROBE_ROWS:
        total = len(rows)
    else:  # the whole file: the rows the run would skip
        total = 0
        bad = []
        try:
            for where, row in open_rows(source):
                total += 1
                found = malformed(where, row)
                if found:
                    bad.append(found)
        except (DataSourceError, OSError) as e:
            return str(e), None
        if len(bad) > source.max_bad_share * total:  # past the sample: the stage stops when it reaches them
            return None, (f"{len(bad)} of its {total} rows are malformed as {kind.name} data in format {fmt!r}, more "
                          f"than max_bad_share {source.max_bad_share:g}, so the stage will stop when it reads them "
                          f"(first: {bad[0][0]}: {bad[0][1]}); fix them, set `format:`, or raise max_bad_share")
    if bad:
        return None, (f"{len(bad)} of its {total} rows are malformed and will be skipped (first: {bad[0][0]}: "
                      f"{bad[0][1]}); fix them to use them")
    return None, None


def data_problems(spec: Pipeline) -> tuple[list[Problem], list[str]]:
    problems, notes = [], []
    stages = [(name, kind_of(spec, name).sources(stage_block(spec, name))) for name in spec.stage_names()]
    for name, sources in stages:
        for source, kind in sources:
            if source.path.startswith(BUILTIN_PREFIX):
                continue
            if source.is_local:
                problem, warning = check_source(source, kind)
                if problem:
                    problems.append(Problem(name, source.path, problem))
                if warning:
                    notes.append(f"warning: stage '{name}': {source.path}: {warning}")
            elif offline():
                notes.append(f"stage '{name}': hub dataset {source.path} not checked (offline)")
    return problems, notes


# --------------------------------------------------------------------------------------- models


def _architectures(config: dict) -> list[str]:
    names = list(config.get("architectures") or [])
    if names:
        return names
    model_type = config.get("model_type")
    if model_type == "llmlab":
        return ["LlmlabForCausalLM"]
    # deferred: a config without `architectures` is rare, and transformers' mappings import torch
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return [m[model_type] for m in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
            if model_type in m]


def is_causal_lm(config: dict) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(config))


def is_sequence_classifier(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in _architectures(config))


def _read_config(name: str) -> tuple[dict | None, str | None]:
    """(config dict, None) of a local folder or a reachable hub model; (None, problem or note)."""
    import json

    if _is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return None, f"no such folder: {name}"
        if not (folder / "config.json").is_file():
            return None, "it has no config.json: save the model with save_pretrained, or name its folder"
        if not any((folder / w).is_file() for w in WEIGHT_FILES):
            return None, f"it has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})"
        try:
            return json.loads((folder / "config.json").read_text()), None
        except ValueError as e:
            return None, f"its config.json is not valid JSON ({e})"
    if offline():
        return None, "offline"
    try:
        from huggingface_hub import hf_hub_download  # deferred: only for hub names, when online

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text()), None
    except Exception as e:  # the hub raises many types (RepositoryNotFoundError, HTTPError, ...)
        return None, f"cannot read its config from the Hugging Face hub ({type(e).__name__}: {str(e)[:160]})"


def model_problems(spec: Pipeline) -> tuple[list[Problem], list[str]]:
    from llmlab.tokenizer import tokenizer_file_vocab

    problems, notes = [], []

    def check(stage: str, name: str, role: str, need: str) -> dict | None:
        config, issue = _read_config(name)
        if issue == "offline":
            notes.append(f"stage '{stage}': hub model {name} not checked (offline)")
            return None
        if issue:
            problems.append(Problem(stage, name, issue))
            return None
        arch = ", ".join(_architectures(config)) or config.get("model_type", "unknown")
        if need == "causal" and not is_causal_lm(config):
            problems.append(Problem(stage, name, f"it is a {arch}, which has no causal-LM head, so it cannot be the "
                                                 f"{role}: use a causal LM (…ForCausalLM)"))
        if need == "classifier" and not is_sequence_classifier(config):
            problems.append(Problem(stage, name, f"it is a {arch}, not a sequence-classification model, so it cannot "
                                                 f"score as the {role}: use a reward model (…ForSequenceClassification, "
                                                 f"one output) or train one with a reward stage"))
        return config

    if spec.tokenizer and spec.tokenizer.path and not Path(spec.tokenizer.path).expanduser().is_dir():
        problems.append(Problem("tokenizer", spec.tokenizer.path, "no such tokenizer folder"))
    for name, stage in spec.stages.items():
        kind = KINDS[stage.kind]
        start = getattr(stage, "model", None)
        if isinstance(start, str):
            config = check(name, start, f"starting model of a {stage.kind} stage", "causal" if kind.policy else "")
            tok_dir = stage.tokenizer or start
            vocab = tokenizer_file_vocab(tok_dir) if _is_local(tok_dir) else None
            rows = (config or {}).get("vocab_size")
            if vocab and isinstance(rows, int) and vocab > rows:
                problems.append(Problem(name, tok_dir, f"the tokenizer has {vocab:,} tokens but the model {start} has "
                                                       f"{rows:,} embedding rows: use the tokenizer the model was "
                                                       f"trained with"))
        for named in kind.models(stage):
            if named.need == "adapters":
                if not (Path(named.path) / "adapter_config.json").is_file():
                    problems.append(Problem(name, named.path, "no adapter_config.json: name the folder a LoRA stage "
                                                              "wrote (<stage>/adapters/best)"))
            else:
                check(name, named.path, named.role, named.need)
    return problems, notes


class PreflightFailed(UserError):
    """A spec names files or models that would fail its stages; one line per problem."""

    def __init__(self, spec_file: str, problems: list[Problem]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with what {spec_file} names "
                         f"(no stage ran):\n" + "\n".join("  " + p.render() for p in problems))


def workdir_problems(spec: Pipeline) -> list[Problem]:
    """The folder stage outputs go to must be creatable and writable (checked on its nearest
    existing ancestor; nothing is created here)."""
    root = Path(spec.output_root).expanduser().absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    what = f"workdir {root}"
    if not existing.is_dir():
        return [Problem("", what, f"{existing} is a file, not a folder: point `workdir` at a folder")]
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return [Problem("", what, f"{existing} is on a read-only filesystem: remount it writable or point `workdir` "
                                  f"somewhere writable")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem("", what, f"{existing} is not writable by this user: make it writable or point `workdir` "
                                  f"somewhere writable")]
    return []


def folder_problems(spec: Pipeline, spec_file: str | Path) -> list[Problem]:
    """Stage folders that hold another spec's stage with a different config (see
    `llmlab.reuse.folder_conflict`); execute_stage checks again under the stage's lock."""
    problems = []
    for stage in spec.stage_names():
        conflict = folder_conflict(spec_file, spec, stage)
        if conflict:
            _, what, message = conflict.split(": ", 2)
            problems.append(Problem(stage, what, message))
    return problems


def benchmark_problems(spec: Pipeline) -> list[Problem]:
    """Every lm-evaluation-harness task an eval stage names, resolved: a local task file that parses
    with its data present, a known task name (else the nearest ones), and, offline, a built-in task's
    dataset in the local cache (`llmlab.benchmarks.run.check_benchmarks`; lm-eval is imported only here)."""
    staged = [(name, stage) for name, stage in spec.stages.items() if getattr(stage, "benchmarks", None)]
    if not staged:
        return []
    from llmlab.benchmarks.run import check_benchmarks

    problems = []
    for name, stage in staged:
        for i, field_name, message in check_benchmarks(stage.benchmarks, offline()):
            problems.append(Problem(name, f"benchmarks[{i}].{field_name}", message))
    return problems


def preflight(spec: Pipeline, spec_file: str | Path | None = None) -> tuple[list[Problem], list[str]]:
    """Every problem found in the spec's workdir (and, given the spec's file, stage folders another
    spec owns), local files, folders and models (and hub ones when online), and notes on what was
    skipped."""
    hub, hub_notes = hub_down_problems(spec)
    if hub:  # the hub does not answer: what it would say about each model is unknown
        return tracking_problems(spec) + merge_branches(spec, hub), hub_notes
    data, data_notes = data_problems(spec)
    models, model_notes = model_problems(spec)
    folders = folder_problems(spec, spec_file) if spec_file is not None else []
    return (tracking_problems(spec) + workdir_problems(spec) + folders
            + merge_branches(spec, data + models + benchmark_problems(spec)), hub_notes + data_notes + model_notes)


def tracking_problems(spec: Pipeline) -> list[Problem]:
    """With `tracking.required`, MLflow must answer before anything runs (without it, a run goes on
    and its records wait on disk)."""
    if not spec.tracking.required:
        return []
    from llmlab.tracking import ANSWER_SECONDS, answers, default_tracking_uri

    uri = spec.tracking.uri or default_tracking_uri()
    if answers(uri):
        return []
    return [Problem("", "tracking.required", f"MLflow at {uri} does not answer (asked for {ANSWER_SECONDS:g} s): start "
                                             f"the server, point tracking.uri at one that runs, or set `required: "
                                             f"false` to run now and send the records when it answers")]


def merge_branches(spec: Pipeline, problems: list[Problem]) -> list[Problem]:
    """One problem for what every branch or round of a stage shares (the same file, the same cause),
    named by the stage as the spec writes it."""
    groups: dict[tuple[str, str, str], list[Problem]] = {}
    for p in problems:
        base = spec.base_stage(p.stage) if p.stage and p.stage != "tokenizer" else p.stage
        groups.setdefault((base, p.what, p.message), []).append(p)
    out = []
    for (base, what, message), found in groups.items():
        if len(found) == 1:
            out.append(found[0])
        else:
            out.append(Problem(base, what, f"{message} (all {len(found)} of its branches or rounds)"))
    return out
