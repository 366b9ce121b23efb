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
    return spec, Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name, spec.tracking.wait_seconds)


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
    spec, tracker = _tracker(spec_file)
    run = tracker.run(run_id)
    order = spec.stage_names()
    tags = {f"llmlab.reused.{name}": rid for name, rid in reused.items()}
    tags["llmlab.stages"] = ",".join(order)
    missing = [s for s in order if s not in results]
    for i, name in enumerate(missing):  # after a failure: the first missing stage failed
        tags[f"llmlab.stage.{name}.status"] = "failed" if i == 0 and status == "FAILED" else "not run"
    for name, r in results.items():
        tags[f"llmlab.stage.{name}.run_id"] = r["mlflow_run_id"]
        tags[f"llmlab.stage.{name}.status"] = r["status"]
        tags[f"llmlab.stage.{name}.seconds"] = r["seconds"]
    run.set_tags(tags)
    if status == "FINISHED":
        version = register_final_model(tracker, spec_file, results)
        if version is not None:
            run.set_tags({"llmlab.registered_model": f"{version[0]}/{version[1]}"})
    run.finish(status)


def register_final_model(tracker, spec_file: str, results: dict[str, dict]) -> tuple[str, str] | None:
    """Register the pipeline's last model in the MLflow model registry under the pipeline name,
    with its lineage (every stage's run id and fingerprint) as tags. A model whose fingerprint is
    already registered is not registered again. Returns (name, version) or None."""
    spec = load_spec(spec_file)
    with_model = [name for name, r in results.items() if "model" in r["outputs"] and r["kind"] != "reward"]
    if not with_model:
        return None
    final = results[with_model[-1]]
    client = tracker.client
    name = spec.name
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"Final models of the llmlab pipeline '{name}'")
    for v in client.search_model_versions(filter_string=f"name = '{name}'"):
        if v.tags.get("llmlab.fingerprint") == final["fingerprint"]:
            return name, v.version
    run = client.get_run(final["mlflow_run_id"])
    logged = any(a.path == "model" for a in client.list_artifacts(final["mlflow_run_id"]))
    source = f"{run.info.artifact_uri}/model" if logged else Path(final["outputs"]["model"]).resolve().as_uri()
    lineage = {f"llmlab.lineage.{s}": f"{r['mlflow_run_id']}@{r['fingerprint']}" for s, r in results.items()}
    chain = " -> ".join(f"{s} ({r['kind']}, run {r['mlflow_run_id']}, fingerprint {r['fingerprint']})" for s, r in results.items())
    version = client.create_model_version(
        name, source, run_id=final["mlflow_run_id"],
        tags={"llmlab.stage": final["stage"], "llmlab.fingerprint": final["fingerprint"], **lineage},
        description=f"Model of stage '{final['stage']}' from {spec_file}. Lineage: {chain}")
    return name, version.version


def list_runs(pipeline: str | None, limit: int = 20) -> list[dict]:
    """Recent pipeline runs (newest first): status, start, duration, and per stage its status,
    seconds and whether a finished output was reused."""
    from mlflow.tracking import MlflowClient

    from llmlab.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    experiments = [e for e in client.search_experiments() if pipeline in (None, e.name)]
    out = []
    for exp in experiments:
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`llmlab.pipeline` != ''",
                                     order_by=["attributes.start_time DESC"], max_results=limit)
        for r in parents:
            tags = r.data.tags
            stages = [s for s in tags.get("llmlab.stages", "").split(",") if s]
            out.append({
                "pipeline": exp.name, "run_id": r.info.run_id, "status": r.info.status,
                "start": r.info.start_time, "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000,
                "stages": [{"stage": s, "status": tags.get(f"llmlab.stage.{s}.status", "?"),
                            "seconds": float(tags.get(f"llmlab.stage.{s}.seconds", 0)),
                            "reused": f"llmlab.reused.{s}" in tags} for s in stages],
            })
    return sorted(out, key=lambda r: r["start"], reverse=True)[:limit]
