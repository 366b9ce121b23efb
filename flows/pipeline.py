"""The pipeline flow: a spec compiled into one Prefect task per stage.

    llmlab run pipelines/tiny.yaml [--force S] [--only S] [--from S]   # this flow, locally
    prefect deployment run 'llmlab/tiny' --param force='["eval"]'       # through a worker

Stages run in declaration order (the tokenizer first when the spec trains one); each gets the
results of the stages it names in `from` (and the tokenizer stage's), passed as small dicts. A
swept stage runs as one task per branch (named by its values, e.g. `dpo[beta=0.1]`), side by side
up to `max_parallel`; a stage with `select` takes the best branch (a `select-<stage>` task logs the
choice); a repeated group runs as one task per stage and round (`dpo#2`).
Finished stages whose key is unchanged are reused (Prefect shows them Cached); `force` reruns the
named stages, `from_stage` reruns a stage and everything after it, `only` runs just the named
stages on the recorded outputs of the others.

A stage that fails in an expected way (its task ends Failed with one sentence, see tasks.stage_tasks)
ends the flow Failed with that sentence, after closing the pipeline's MLflow run; unexpected errors
raise with their traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmlab.paths import state_dir
from llmlab.serve import configure_environment

configure_environment()

from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Failed, State  # noqa: E402

from llmlab.spec import load_spec  # noqa: E402
from tasks.stage_tasks import check_spec, intact_result, max_parallel, run_stage, select_branch  # noqa: E402
from tasks.tracking_tasks import adopt_run, close_run, open_run  # noqa: E402


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task's state with exc_info even when no exception is active (a task
    that returned a Failed state), which prints a stray 'NoneType: None'; drop that empty part."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoEmptyTraceback())


def drain_reporting(timeout: float = 30.0) -> None:
    """Send the logs and events this process still holds for the Prefect API, before the server it
    reports to may stop (Prefect would otherwise send them at exit, and retry a stopped server for a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout)


def _run_name() -> str:
    """The spec's `name:` (the MLflow experiment's name too); the file's name if it does not load."""
    try:
        return load_spec(flow_run.parameters["spec"]).name
    except Exception:  # noqa: BLE001 — the flow itself reports a bad spec
        return Path(flow_run.parameters["spec"]).stem


def _raise_unexpected(state: State) -> None:
    """Re-raise the exception a failed task raised (a bug: it keeps its traceback); an expected
    failure's state carries only its sentence and passes."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        raise error


def _batches(plan, names: list[str], parallel: int) -> list[list[str]]:
    """Consecutive branches of one fanned-out stage run side by side (`parallel` at a time);
    everything else one by one, in order."""
    out: list[list[str]] = []
    for name in names:
        prev = out[-1] if out else None
        variant = plan.variant(name) if name != "tokenizer" else None
        if (prev and variant and variant.assign and len(prev) < parallel and prev[0] != "tokenizer"
                and plan.variant(prev[0]).base == variant.base and plan.variant(prev[0]).assign):
            prev.append(name)
        else:
            out.append([name])
    return out


@flow(name="llmlab", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def pipeline(spec: str, force: list[str] | None = None, only: list[str] | None = None,
             from_stage: str | None = None, sweep: dict | None = None, only_reused: bool = False,
             follow: str | None = None) -> dict[str, dict] | State:
    """Run the stages of the spec file `spec`; returns {stage: StageResult dict}.

    Stage names may be written ones (`dpo`: all its branches and rounds) or concrete ones
    (`dpo[beta=0.1]`, `dpo#2`). `sweep` narrows sweeps to some of their values,
    e.g. {"dpo": {"beta": [0.1]}}: the other branches, and what fans out from them, do not run.
    `only_reused` records a run whose every stage is reused and runs none: a stage that would run
    fails the flow instead (what `llmlab run` starts in the background when it found nothing to run).
    `follow` (a hand-over folder, `llmlab.foreground`) records stages that the `llmlab` process which
    started this flow runs itself: their tasks wait for its results, and the pipeline's MLflow run is
    the one it opened."""
    plan = load_spec(spec)
    order = plan.stage_names()
    named = [*(force or []), *(only or []), *([from_stage] if from_stage else [])]
    unknown = [s for s in named if not plan.expand_names([s])]
    if unknown:
        return Failed(message=f"{spec}: unknown stage(s) {unknown}; this pipeline has {order}")
    keep, problems = plan.graph.narrowed(sweep or {})
    if problems:
        return Failed(message=f"{spec}: sweep={sweep}: " + "; ".join(problems))
    first = order.index(plan.expand_names([from_stage])[0]) if from_stage else len(order)
    forced = set(plan.expand_names(force or [])) | set(order[first:])
    only_set = set(plan.expand_names(only or []))
    checked = check_spec(spec, return_state=True)  # every local file, folder and model it names, before any stage runs
    if checked.is_failed():
        _raise_unexpected(checked)
        return Failed(message=checked.message)
    storage = state_dir() / "prefect-results"
    if follow:
        parent = adopt_run(spec, follow, flow_run.id)
    else:
        parent = open_run(spec, flow_run.id)
    results: dict[str, dict] = {}
    reused: dict[str, str] = {}
    chosen: dict[str, str] = {}  # selecting stage -> the judge's branch it took
    runnable = [n for n in order if n == "tokenizer" or n in keep]
    try:
        for batch in _batches(plan, runnable, max_parallel(spec)):
            pending = []
            for name in batch:
                selection = plan.selection(name)
                if selection is not None:
                    judged = {b: results[b] for b in selection.options if b in results}
                    picked = select_branch(spec, name, judged, parent, return_state=True)
                    if picked.is_failed():
                        _raise_unexpected(picked)
                        close_run(spec, parent, "FAILED", results, reused, chosen)
                        return Failed(message=picked.message)
                    chosen[name] = picked.result()
                inputs = {ref: results[dep] for ref, dep in plan.dependencies(name, chosen.get(name)).items()}
                skip = bool(only_set) and name not in only_set
                # with --only, any finished, intact output of another stage will do (even from older code)
                recorded = intact_result(spec, name, inputs, strict=not skip)
                if only_reused and not skip and (recorded is None or name in forced):
                    close_run(spec, parent, "FAILED", results, reused, chosen)
                    return Failed(message=f"stage '{name}' is no longer reusable (its spec, inputs or output changed "
                                          f"after `llmlab run` found every stage reusable); nothing ran")
                if skip:
                    if recorded is None:
                        close_run(spec, parent, "FAILED", results, reused, chosen)
                        return Failed(message=f"stage '{name}' has no finished output to run {only} on; run it first "
                                              f"(llmlab run {spec} --only {name})")
                    results[name], reused[name] = {**recorded, "reused": True}, recorded["mlflow_run_id"]
                    continue
                pending.append((name, inputs, recorded))
            task = run_stage.with_options(result_storage=storage)
            if len(pending) == 1:  # in this process, as always
                name, inputs, recorded = pending[0]
                states = [task.with_options(refresh_cache=name in forced or recorded is None)(
                    spec, name, inputs, parent, force=name in forced, follow=follow, return_state=True)]
            else:  # side by side, each branch in its own process on its own slot (GPU or share of the cores)
                futures = [task.with_options(refresh_cache=name in forced or recorded is None).submit(
                    spec, name, inputs, parent, force=name in forced, slot=i, slots=len(pending), follow=follow)
                    for i, (name, inputs, recorded) in enumerate(pending)]
                states = [f.wait() or f.state for f in futures]
            for (name, _, _), state in zip(pending, states):
                if state.is_failed():
                    _raise_unexpected(state)
                    close_run(spec, parent, "FAILED", results, reused, chosen)
                    return Failed(message=state.message)  # an expected one: its sentence, no traceback
                result = state.result()
                if state.name == "Cached" or result["reused"]:
                    result = {**result, "reused": True}
                    reused[name] = result["mlflow_run_id"]
                results[name] = result
    except BaseException:
        close_run(spec, parent, "FAILED", results, reused, chosen)
        raise
    close_run(spec, parent, "FINISHED", results, reused, chosen)
    return results
