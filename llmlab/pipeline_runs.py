"""The pipeline-level MLflow run: opened before the first stage, closed after the last.

    run_id = open_pipeline_run("pipelines/tiny.yaml", flow_run_id)
    close_pipeline_run("pipelines/tiny.yaml", run_id, "FINISHED", results)

Tags: `prefect.flow_run_id`, `llmlab.spec_hash`, `llmlab.git_commit`; the resolved spec is logged as
an artifact; on close, each stage's run id, status and duration become tags of the parent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmlab import __version__
from llmlab.checkpoint import atomic_write_json
from llmlab.paths import state_dir
from llmlab.spec import config_hash, load_spec


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tracker(spec_file: str):
    from llmlab.tracking import Tracker

    spec = load_spec(spec_file)
    return spec, Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name)


def open_pipeline_run(spec_file: str, flow_run_id: str | None) -> str:
    spec, tracker = _tracker(spec_file)
    run_id = tracker.start_pipeline_run(spec.name, {
        "prefect.flow_run_id": flow_run_id or "none", "llmlab.spec_hash": config_hash(spec),
        "llmlab.git_commit": git_commit(), "llmlab.version": __version__, "llmlab.spec_file": spec_file,
        "llmlab.pipeline": spec.name,
    })
    run = tracker.run(run_id)
    resolved = state_dir() / "runs" / run_id / "spec.resolved.json"
    atomic_write_json(resolved, spec.model_dump(mode="json", by_alias=True))
    run.log_artifact(resolved, "spec")
    run.log_artifact(spec_file, "spec")
    return run_id


def close_pipeline_run(spec_file: str, run_id: str, status: str, results: dict[str, dict],
                       reused: dict[str, str]) -> None:
    """Record each stage's run id, status and duration on the parent; `llmlab.reused.<stage>` names
    the run whose finished output was reused instead of running the stage again."""
    _, tracker = _tracker(spec_file)
    run = tracker.run(run_id)
    tags = {f"llmlab.reused.{name}": rid for name, rid in reused.items()}
    for name, r in results.items():
        tags[f"llmlab.stage.{name}.run_id"] = r["mlflow_run_id"]
        tags[f"llmlab.stage.{name}.status"] = r["status"]
        tags[f"llmlab.stage.{name}.seconds"] = r["seconds"]
    run.set_tags(tags)
    run.finish(status)
