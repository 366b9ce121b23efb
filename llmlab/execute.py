"""Executing a stage: what Prefect tasks call. Paths and fingerprints in, a StageResult dict out.

    result = execute_stage("pipelines/tiny.yaml", "pretrain", inputs={"tokenizer": {...}}, parent_run_id=rid)

`execute_stage` is the one generic wrapper: it resolves the stage's config, opens its MLflow run,
writes `<workdir>/<stage>/stage.json` (status running -> finished | failed | interrupted), and calls
the runner for the stage's kind (`llmlab.runners.registry`), or launches it under torchrun
(`llmlab.launch`). Runners write their outputs
atomically and return (outputs, metrics). A stage is finished only when stage.json says so.
Outputs per stage: `model/` (transformers format, tokenizer included), `checkpoints/`,
`metrics.jsonl`, `stage.json`; the tokenizer stage writes `tokenizer/`; eval writes `results.json`
and `report.md`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from llmlab import __version__, fastpath
from llmlab.checkpoint import atomic_write_json, fingerprint
from llmlab.errors import expected_failure, format_traceback
from llmlab.gates import GateFailed, check_gates
from llmlab.launch import run_under_torchrun
from llmlab.reuse import StageFolderTaken, cache_key, finished_result, folder_conflict, stage_lock
from llmlab.runners.context import StageContext, StageResult, stage_block
from llmlab.runners.registry import KINDS, kind_of, resolved_config, runner
from llmlab.spec import Pipeline, config_hash, load_spec
from llmlab.tracking import Tracker
from llmlab.train.signals import TrainingInterrupted


def execute_stage(spec_file: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
                  force: bool = False) -> dict[str, Any]:
    """Run one stage of a spec file; returns StageResult.to_dict(). Raises on failure.

    Holds a lock on the stage's output folder, so concurrent runs never write into each other; a
    run that waited for the lock reuses what the other run finished (unless `force`). `force`
    also discards the stage's checkpoints, so it starts from step 0."""
    spec = load_spec(spec_file)
    out_dir = spec.stage_dir(stage)
    with stage_lock(out_dir, stage):
        conflict = folder_conflict(spec_file, spec, stage)
        if conflict:
            raise StageFolderTaken(conflict)
        if not force:
            done = finished_result(spec, stage, inputs)
            if done is not None:
                print(f"[{stage}] reusing the finished output in {out_dir} (same config, inputs and code)")
                return {**done, "reused": True}
        elif (out_dir / "checkpoints").exists():
            shutil.rmtree(out_dir / "checkpoints")
        return _execute(spec, spec_file, stage, inputs, parent_run_id, cache_key(spec, stage, inputs))


def branch_tags(spec: Pipeline, stage: str) -> dict[str, Any]:
    """MLflow tags that place a concrete stage in the graph: its branch label and swept values (so
    the UI can filter and group by them), the sweeps it follows, its round."""
    variant = spec.variant(stage)
    tags: dict[str, Any] = {}
    if variant.label and variant.round is None:
        tags["llmlab.branch"] = variant.label
        # an upstream sweep's values too: eval branches line up with their dpo branches
        tags.update({f"llmlab.sweep.{k}": v for k, v in spec.branch_values(stage).items()})
        tags.update({f"llmlab.follows.{b}": label for b, label in variant.assign.items() if b != variant.base})
    if variant.round is not None:
        tags["llmlab.round"] = variant.round
    return tags


def write_failure_log(out_dir: Path, exc: BaseException) -> Path:
    """Append the failure's full traceback to the stage's log file (`<stage>/stage.log`)."""
    log = out_dir / "stage.log"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"--- failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n{format_traceback(exc)}\n")
    except OSError:  # the disk that failed the stage may refuse the log too; the console still has the cause
        pass
    return log


def _record_failure(run: Any, log: Path, message: str) -> None:
    """The failure's sentence as a tag and its traceback as an artifact of the stage's MLflow run;
    tracking must not hide the real error, so its own failures are swallowed here."""
    try:
        run.set_tags({"llmlab.error": message[:5000]})
        run.log_artifact(log)
        run.finish("FAILED")
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not record the failure in MLflow: {type(exc).__name__}: {exc}")


def _execute(spec: Pipeline, spec_file: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
             key: str) -> dict[str, Any]:
    kind_record = kind_of(spec, stage)
    kind = kind_record.name
    out_dir = spec.stage_dir(stage)
    config = resolved_config(spec, stage)
    chash = config_hash(config)
    in_results = {k: StageResult.from_dict(v) for k, v in inputs.items()}
    tracker = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name, spec.tracking.wait_seconds)
    variant = spec.variant(stage)
    run = tracker.start_stage_run(parent_run_id, stage, kind, tags={
        "llmlab.config_hash": chash, "llmlab.cache_key": key, "llmlab.version": __version__,
        "llmlab.base_stage": variant.base, **branch_tags(spec, stage),
        **{f"llmlab.input.{k}.run_id": v.mlflow_run_id for k, v in in_results.items()},
        **{f"llmlab.input.{k}.stage": v.stage for k, v in in_results.items()},
        **{f"llmlab.input.{k}.fingerprint": v.fingerprint for k, v in in_results.items()},
    })
    run.log_params({**config, **{f"sweep.{k}": v for k, v in spec.branch_values(stage).items()}})
    record = {"stage": stage, "kind": kind, "spec_file": str(Path(spec_file).resolve()), "pipeline": spec.name,
              "config": config, "config_hash": chash, "cache_key": key,
              "status": "running", "inputs": {k: v.fingerprint for k, v in in_results.items()},
              "input_runs": {k: v.mlflow_run_id for k, v in in_results.items()}, "mlflow_run_id": run.run_id,
              "llmlab_version": __version__, "started": time.time()}
    atomic_write_json(out_dir / "stage.json", record)
    atomic_write_json(out_dir / "config.json", config)
    run.log_artifact(out_dir / "config.json")
    run.log_artifact(spec_file, "spec")
    metrics_file = out_dir / "metrics.jsonl"
    if metrics_file.exists() and not (out_dir / "checkpoints").exists():
        metrics_file.unlink()  # a fresh start: metrics of an older, discarded attempt go
    ctx = StageContext(spec, stage, stage_block(spec, stage), out_dir, in_results, run, resolved=config, kinds=KINDS)
    from llmlab.plan import signature

    started_as = signature(spec, stage)  # what `llmlab plan` calibrates this stage's kind by
    started = time.perf_counter()
    dist_spec = getattr(ctx.config, "distributed", None)
    fastpath.new_stage(decode=getattr(ctx.config, "decode", "auto"))
    try:
        if dist_spec is not None and dist_spec.world_size > 1:
            outputs, metrics = run_under_torchrun(spec_file, stage, dist_spec, inputs, run.run_id, out_dir)
        else:
            outputs, metrics = runner(kind)(ctx)
    except TrainingInterrupted:
        atomic_write_json(out_dir / "stage.json", {**record, "status": "interrupted"})
        run.finish("KILLED")
        raise
    except BaseException as exc:
        sentence = expected_failure(exc, stage)
        log = write_failure_log(out_dir, exc)
        atomic_write_json(out_dir / "stage.json", {**record, "status": "failed", "error": sentence or f"{type(exc).__name__}: {exc}",
                                                   "expected": sentence is not None, "log": str(log)})
        _record_failure(run, log, sentence or f"{type(exc).__name__}: {exc}")
        exc.stage_log = log  # where the traceback went, for the one-sentence report (tasks.stage_tasks)
        raise
    gates = [] if stage == "tokenizer" else spec.stages[stage].gates
    if gates:
        upstream = [r for name, r in in_results.items() if name != "tokenizer"]
        failures = check_gates(gates, metrics, upstream[0].metrics if upstream else None)
        if failures:
            message = f"stage '{stage}' stopped the pipeline: " + "; ".join(failures)
            atomic_write_json(out_dir / "stage.json", {**record, "status": "failed", "error": message, "metrics": metrics})
            run.set_tags({"llmlab.gates": "failed"})
            run.finish("FAILED")
            raise GateFailed(message)
        run.set_tags({"llmlab.gates": "passed"})
    paths = fastpath.taken()  # which fast paths ran, and any that fell back
    if paths:
        record["fast_paths"] = paths
        run.set_tags({f"llmlab.fast_path.{name}": how for name, how in paths.items()})
    main = outputs[kind_record.main_output]
    result = StageResult(stage, kind, str(out_dir), fingerprint(main), chash, run.run_id, "finished",
                         outputs, metrics, round(time.perf_counter() - started, 2))
    if metrics_file.exists():
        run.log_artifact(metrics_file)
    run.set_tags({"llmlab.fingerprint": result.fingerprint})
    atomic_write_json(out_dir / "stage.json", {**record, "status": "finished", "fingerprint": result.fingerprint,
                                               "outputs": outputs, "metrics": metrics, "finished": time.time(),
                                               "seconds": result.seconds, "result": result.to_dict()})
    run.finish("FINISHED")
    from llmlab.plan import record_stage_time

    record_stage_time(spec, stage, result.seconds, started_as, metrics)  # calibrates `llmlab plan`'s estimates here
    return result.to_dict()
