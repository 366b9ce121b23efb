"""Run an eval stage's lm-evaluation-harness tasks on one model, and check them before anything runs.

    results = run_benchmarks(model, tokenizer, stage.benchmarks, seed=1234)
    results["llmlab_tasks_gen"].metrics        # {"exact_match": 0.52}, with .stderr, .n and .samples
    problems = check_benchmarks(stage.benchmarks, offline=True)   # [(index, field, message)], for preflight

Tasks come from llmlab's own folder (`llmlab.benchmarks.builtin`), the `include` YAML files or folders
a spec names, and, when a spec names one, lm-eval's built-in index. Each benchmark runs through
`lm_eval.evaluator.evaluate` on `LlmlabLM`, with its `num_fewshot`, `limit` and chat template. A
metric is named by lm-eval's metric name (`exact_match`, `acc`, ...), with the filter's name after an
underscore when it is not lm-eval's default filter. Imports lm-eval only when called.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.benchmarks.builtin import BUILTIN_TASKS, CHAT_TASKS

DEFAULT_FILTER = "none"  # lm-eval's name for the filter a task gets when it names none
STDERR_BOOTSTRAP = 1000  # bootstrap resamples for the metrics whose standard error has no closed form


@dataclass
class BenchmarkResult:
    """One task's scores on one model: metric -> value and its standard error, and every scored document."""

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    n: int = 0  # documents scored
    samples: list[dict[str, Any]] = field(default_factory=list)  # per document: prompt, target, answer, scores
    documents: list[str] = field(default_factory=list)  # each scored document's text and target (contamination)


def metric_name(key: str) -> str:
    """lm-eval's `metric,filter` as a name MLflow and gates take: `acc,none` -> `acc`,
    `exact_match,strict-match` -> `exact_match_strict-match`."""
    metric, _, filt = key.partition(",")
    name = metric if filt in ("", DEFAULT_FILTER) else f"{metric}_{filt}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def quiet_lm_eval() -> None:
    """lm-eval's and datasets' progress output off: the stage prints one line per model and task."""
    import logging

    import datasets

    datasets.disable_progress_bars()
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def task_manager(benchmarks: list[Any], eot: str | None):
    """lm-eval's task index over llmlab's tasks (for answers ending with `eot`), every `include`, and
    lm-eval's own tasks when a benchmark is none of those."""
    from lm_eval.tasks import TaskManager

    from llmlab.benchmarks.builtin import builtin_tasks

    includes = [Path(b.include).expanduser().resolve() for b in benchmarks if b.include]
    # lm-eval scans folders: a task file is found through the folder it is in
    paths = [str(builtin_tasks(eot or ""))] + [str(p.parent if p.is_file() else p) for p in includes]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(b.task in local.all_tasks for b in benchmarks):
        return local
    return TaskManager(include_path=paths, include_defaults=True)


def run_benchmarks(model: Any, tokenizer: Any, benchmarks: list[Any], seed: int) -> dict[str, BenchmarkResult]:
    """Every benchmark on one model (a group gives a result per task in it); see the module docstring."""
    from lm_eval.evaluator import evaluate

    from llmlab.benchmarks.adapter import LlmlabLM
    from llmlab.benchmarks.builtin import end_of_turn

    quiet_lm_eval()
    chat = tokenizer.chat_template is not None
    tm = task_manager(benchmarks, end_of_turn(tokenizer) if chat else None)
    lm = LlmlabLM(model, tokenizer)
    out: dict[str, BenchmarkResult] = {}
    for b in benchmarks:
        loaded = tm.load([b.task])
        for task in loaded["tasks"].values():
            if b.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=b.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        use_chat = chat and (b.chat_template if b.chat_template is not None else b.task in CHAT_TASKS)
        raw = evaluate(lm=lm, task_dict=loaded, limit=b.limit, bootstrap_iters=STDERR_BOOTSTRAP, log_samples=True,
                       apply_chat_template=use_chat, fewshot_as_multiturn=use_chat, verbosity="WARNING")
        for name in loaded["tasks"]:
            scores = raw["results"].get(name, {})
            result = BenchmarkResult(name, n=int(raw.get("n-samples", {}).get(name, {}).get("effective", 0)))
            for key, value in scores.items():
                if "," not in key or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                if metric.endswith("_stderr"):
                    result.stderr[metric_name(f"{metric[:-len('_stderr')]},{filt}")] = float(value)
                else:
                    result.metrics[metric_name(key)] = float(value)
            logged = raw.get("samples", {}).get(name, [])
            result.samples = [_sample(s) for s in logged]
            result.documents = [document_text(loaded["tasks"][name], s["doc"]) for s in logged]
            out[name] = result
    return out


def document_text(task: Any, doc: dict[str, Any]) -> str:
    """A document as the model meets it, before any chat template: its prompt and its right answer."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    return f"{text if isinstance(text, str) else ''} {target}"


def _sample(logged: dict[str, Any]) -> dict[str, Any]:
    """What a person checks of one scored document: the prompt the model saw, the target, the model's
    answer (its generated text, or the choice it scored highest) and the document's scores."""
    args = logged.get("arguments") or [[""]]
    answer: Any = logged.get("filtered_resps")
    if isinstance(answer, list) and answer and isinstance(answer[0], (list, tuple)):  # log-likelihoods: the best choice
        lls = [float(r[0]) for r in answer]
        answer = max(range(len(lls)), key=lls.__getitem__)
    elif isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    scores = {m: float(logged[m]) for m in logged.get("metrics", []) if isinstance(logged.get(m), (int, float))}
    return {"doc_id": logged.get("doc_id"), "prompt": args[0][0], "target": logged.get("target"), "answer": answer, **scores}


# --------------------------------------------------------------------------- before anything runs


def _builtin_index() -> dict[str, str]:
    """lm-eval's own tasks and groups: name -> its YAML file, read once per lm-eval version (the index
    takes seconds) and kept in the cache."""
    from importlib.metadata import version

    from llmlab.checkpoint import atomic_write_json
    from llmlab.paths import cache_dir

    cached = cache_dir("benchmarks") / f"lm-eval-{version('lm_eval')}-index.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=True)
    index = {name: str(entry.yaml_path or "") for name, entry in tm.task_index.items()}
    atomic_write_json(cached, index)
    return index


def _data_files(config: dict[str, Any]) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files or [])


def _check_yaml(path: Path) -> list[tuple[str, str]]:
    """(field, problem) of a local task YAML: it parses (its `include`s and `!function`s too), and the
    data files it names exist."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskManager reads task files with

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # yaml errors, a !function whose module is missing, ...
        return [("include", f"{path}: does not parse as a task YAML ({type(exc).__name__}: {str(exc)[:200]})")]
    problems = []
    for f in _data_files(config):
        found = Path(f).expanduser() if Path(f).is_absolute() else (path.parent / f)
        if not (found.exists() or Path(f).expanduser().exists()):
            problems.append(("include", f"{path}: dataset_kwargs.data_files names {f}, which does not exist"))
    return problems


def _dataset_cached(yaml_path: str) -> str | None:
    """The hub dataset a built-in task reads when it is not in the local cache (the hub being off), else None."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(yaml_path, resolve_func=False)
    except Exception:  # noqa: BLE001  a task whose config cannot be read here is lm-eval's to report at run time
        return None
    path, name = config.get("dataset_path"), config.get("dataset_name")
    if not path or Path(str(path)).exists() or path in ("json", "csv", "parquet", "text"):
        return None
    try:
        import datasets

        datasets.load_dataset_builder(path, name)
    except Exception:  # noqa: BLE001  offline, a dataset not in the cache fails in many ways
        return f"{path}" + (f" ({name})" if name else "")
    return None


def check_benchmarks(benchmarks: list[Any], offline: bool) -> list[tuple[int, str, str]]:
    """Every benchmark of an eval stage resolved before anything runs: its `include` exists and parses
    with its data files present, its task is defined there or is llmlab's or lm-eval's (else the
    nearest names), and, offline, a built-in task's dataset is in the local cache."""
    problems: list[tuple[int, str, str]] = []
    local: dict[str, str] = {}  # task -> the YAML defining it
    for i, b in enumerate(benchmarks):
        if not b.include:
            continue
        root = Path(b.include).expanduser()
        if not root.exists():
            problems.append((i, "include", f"{b.include} does not exist: name a task YAML file or a folder of them"))
            continue
        for yaml_file in ([root] if root.is_file() else sorted(root.rglob("*.yaml"))):
            problems += [(i, f, m) for f, m in _check_yaml(yaml_file)]
            task = _task_name(yaml_file)
            if task:
                local[task] = str(yaml_file)
    index: dict[str, str] | None = None
    for i, b in enumerate(benchmarks):
        if b.task in BUILTIN_TASKS or b.task in local:
            continue
        if b.include and any(p[0] == i for p in problems):
            continue
        index = index if index is not None else _builtin_index()
        if b.task in index:
            if offline:
                missing = _dataset_cached(index[b.task]) if index[b.task] else None
                if missing:
                    problems.append((i, "task", f"lm-eval task '{b.task}' reads the hub dataset {missing}, which is not in "
                                                f"the local cache and the hub is off: run it once online to cache it, or "
                                                f"give a local task YAML over local files (`include`)"))
            continue
        known = list(BUILTIN_TASKS) + list(local) + list(index)
        near = difflib.get_close_matches(b.task, known, n=3, cutoff=0.6)
        where = f" in {b.include}" if b.include else ""
        problems.append((i, "task", f"unknown task '{b.task}'{where}" + (f": did you mean {', '.join(near)}?" if near else
                                                                        ": name one of llmlab's (" + ", ".join(BUILTIN_TASKS)
                                                                        + "), lm-eval's, or one your `include` defines")))
    return problems


def _task_name(path: Path) -> str | None:
    """The task (or group) a YAML file defines, read as plain YAML (tags such as !function kept as text)."""
    import yaml

    class _Lenient(yaml.SafeLoader):
        pass

    _Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(), Loader=_Lenient) or {}
    except (OSError, yaml.YAMLError):
        return None
    name = config.get("task") or config.get("group")
    return name if isinstance(name, str) else None
