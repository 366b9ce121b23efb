"""Prefect tasks over llmlab's stage functions: paths, configs and fingerprints in, small dicts out.

`run_stage` runs any stage kind (looked up inside llmlab). Its cache key is llmlab's own
(`llmlab.reuse.cache_key`: resolved config + input fingerprints + code version); results persist as
JSON under the state directory, so a new flow run — even against a fresh Prefect database — shows
finished stages as Cached, and `prefect flow-run retry` resumes a failed run. The flow sets
`refresh_cache` when the recorded output is gone or altered, so a cache entry is never trusted blindly.

An expected failure (bad data, a failed gate, out of memory, a full disk: `llmlab.errors`) ends the
task as a Failed state carrying its one sentence, so Prefect logs no traceback for it (the stage's
log file and MLflow run keep one); anything else raises as usual. LLMLAB_DEBUG=1 raises everything.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Failed, State

from llmlab.errors import debug_enabled, expected_failure
from llmlab.execute import execute_stage
from llmlab.foreground import followed_result
from llmlab.isolate import default_parallel, execute_stage_isolated
from llmlab.pipeline_runs import record_selection
from llmlab.preflight import PreflightFailed, preflight
from llmlab.reuse import cache_key, finished_result
from llmlab.spec import load_spec


def _key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return cache_key(load_spec(parameters["spec"]), parameters["stage"], parameters["inputs"])


@task(name="stage", task_run_name="{stage}", cache_key_fn=_key, persist_result=True,
      result_serializer="json", log_prints=True)
def run_stage(spec: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
              force: bool = False, slot: int | None = None, slots: int = 1, follow: str | None = None) -> dict | State:
    """Run stage `stage` of spec file `spec` on its upstream results; returns its StageResult dict.
    With a `slot` (branches running side by side), in a process of its own on that slot; with
    `follow` (a hand-over folder), the stage runs in the `llmlab` process that started this flow
    and this task waits for its result (`llmlab.foreground`)."""
    try:
        if follow is not None:
            return followed_result(spec, stage, follow)
        if slot is not None:
            return execute_stage_isolated(spec, stage, inputs, parent_run_id, force=force, slot=slot, slots=slots)
        return execute_stage(spec, stage, inputs, parent_run_id, force=force)
    except Exception as exc:
        return _failed(exc, stage)


@task(name="select", task_run_name="select-{stage}", cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def select_branch(spec: str, stage: str, judged: dict[str, dict], parent_run_id: str) -> str | State:
    """The judge branch `stage` takes (best selection metric), logged on the pipeline's run."""
    try:
        return record_selection(spec, parent_run_id, stage, judged)
    except Exception as exc:
        return _failed(exc, stage)


def max_parallel(spec: str) -> int:
    """How many branches of a sweep run at once (the spec's max_parallel, else one per visible GPU, else 1)."""
    return default_parallel(load_spec(spec).max_parallel)


def _failed(exc: Exception, stage: str | None = None) -> State:
    """A Failed state with the sentence of an expected failure; re-raises anything else."""
    sentence = expected_failure(exc, stage)
    if sentence is None or debug_enabled():
        raise exc
    log = getattr(exc, "stage_log", None)
    return Failed(message=sentence + (f" (traceback in {log})" if log else ""))


@task(name="check-outputs", task_run_name="check-{stage}", cache_policy=NO_CACHE, persist_result=False)
def intact_result(spec: str, stage: str, inputs: dict[str, dict], strict: bool = True) -> dict | None:
    """The finished result of a stage if its outputs are whole and (when strict) match its key."""
    return finished_result(load_spec(spec), stage, inputs, strict)


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def check_spec(spec: str) -> None | State:
    """Open every local file, folder and model the spec names; fail before any stage runs."""
    problems, notes = preflight(load_spec(spec), spec)
    for note in notes:
        print(note if note.startswith("warning:") else f"note: {note}")
    if problems:
        return _failed(PreflightFailed(spec, problems))
    return None
