"""The pipeline flow: a spec compiled into one Prefect task per stage.

    llmlab run pipelines/tiny.yaml [--force S] [--only S] [--from S]   # this flow, locally
    prefect deployment run 'llmlab/tiny' --param force='["eval"]'       # through a worker

Stages run in declaration order (the tokenizer first when the spec trains one); each gets the
results of the stages it names in `from` (and the tokenizer stage's), passed as small dicts.
Finished stages whose key is unchanged are reused (Prefect shows them Cached); `force` reruns the
named stages, `from_stage` reruns a stage and everything after it, `only` runs just the named
stages on the recorded outputs of the others.

A stage that fails in an expected way (its task ends Failed with one sentence, see tasks.stages)
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
from tasks.stages import check_spec, intact_result, run_stage  # noqa: E402
from tasks.tracking import close_run, open_run  # noqa: E402


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task's state with exc_info even when no exception is active (a task
    that returned a Failed state), which prints a stray 'NoneType: None'; drop that empty part."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoEmptyTraceback())


def _run_name() -> str:
    return Path(flow_run.parameters["spec"]).stem


def _raise_unexpected(state: State) -> None:
    """Re-raise the exception a failed task raised (a bug: it keeps its traceback); an expected
    failure's state carries only its sentence and passes."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        raise error


@flow(name="llmlab", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def pipeline(spec: str, force: list[str] | None = None, only: list[str] | None = None,
             from_stage: str | None = None) -> dict[str, dict] | State:
    """Run the stages of the spec file `spec`; returns {stage: StageResult dict}."""
    plan = load_spec(spec)
    order = plan.stage_names()
    unknown = [s for s in [*(force or []), *(only or []), *([from_stage] if from_stage else [])] if s not in order]
    if unknown:
        return Failed(message=f"{spec}: unknown stage(s) {unknown}; this pipeline has {order}")
    forced = set(force or []) | (set(order[order.index(from_stage):]) if from_stage else set())
    checked = check_spec(spec, return_state=True)  # every local file, folder and model it names, before any stage runs
    if checked.is_failed():
        _raise_unexpected(checked)
        return Failed(message=checked.message)
    storage = state_dir() / "prefect-results"
    parent = open_run(spec, flow_run.id)
    results: dict[str, dict] = {}
    reused: dict[str, str] = {}
    try:
        for name in order:
            deps = [] if name == "tokenizer" else plan.stages[name].inputs
            if "tokenizer" in results and name != "tokenizer":
                deps = ["tokenizer", *deps]
            inputs = {d: results[d] for d in deps}
            skip = bool(only) and name not in only
            # with --only, any finished, intact output of another stage will do (even from older code)
            recorded = intact_result(spec, name, inputs, strict=not skip)
            if skip:
                if recorded is None:
                    close_run(spec, parent, "FAILED", results, reused)
                    return Failed(message=f"stage '{name}' has no finished output to run {only} on; run it first "
                                          f"(llmlab run {spec} --only {name})")
                results[name], reused[name] = {**recorded, "reused": True}, recorded["mlflow_run_id"]
                continue
            state = run_stage.with_options(result_storage=storage, refresh_cache=name in forced or recorded is None)(
                spec, name, inputs, parent, force=name in forced, return_state=True)
            if state.is_failed():
                _raise_unexpected(state)
                close_run(spec, parent, "FAILED", results, reused)
                return Failed(message=state.message)  # an expected one: its sentence, no traceback
            result = state.result()
            if state.name == "Cached" or result["reused"]:
                result = {**result, "reused": True}
                reused[name] = result["mlflow_run_id"]
            results[name] = result
    except BaseException:
        close_run(spec, parent, "FAILED", results, reused)
        raise
    close_run(spec, parent, "FINISHED", results, reused)
    return results
