"""The pipeline-level MLflow run: opened before the first stage, closed after the last.

    run_id = open_pipeline_run("pipelines/tiny.yaml", flow_run_id)
    close_pipeline_run("pipelines/tiny.yaml", run_id, "FINISHED", results)

Tags: `prefect.flow_run_id`, `llmlab.spec_hash`, `llmlab.git_commit`; the resolved spec is logged as
an artifact; on close, each stage's run id, status and duration become tags of the parent.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

from llmlab import __version__
from llmlab.checkpoint import atomic_write_json
from llmlab.paths import state_dir
from llmlab.spec import config_hash, load_spec


def _handlers() -> None:
    from llmlab.tracking import HANDLERS

    HANDLERS.setdefault(REGISTER_OP, _replay_register)


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


def adopt_pipeline_run(spec_file: str, run_id: str, flow_run_id: str | None) -> str:
    """A pipeline run opened by the process that runs the stages (`llmlab.foreground`), taken over by
    the flow that records it: the flow run's id joins its tags."""
    _, tracker = _tracker(spec_file)
    tracker.run(run_id).set_tags({"prefect.flow_run_id": flow_run_id or "none"})
    return run_id


def record_selection(spec_file: str, run_id: str, stage: str, judged: dict[str, dict]) -> str:
    """Choose the branch a selecting stage takes (`llmlab.selection.choose_branch`), log the choice and
    its table on the pipeline's run, and return the judge's winning branch."""
    from llmlab.selection import choose_branch, log_choice

    spec, tracker = _tracker(spec_file)
    choice = choose_branch(spec, stage, judged)
    log_choice(tracker.run(run_id), choice)
    print(f"[{stage}] takes the branch {choice.label} of '{choice.judge}' ({choice.mode} {choice.metric} = "
          f"{next(r['value'] for r in choice.table if r['chosen']):.4g} over {len(choice.table)} branches)")
    return choice.winner


def close_pipeline_run(spec_file: str, run_id: str, status: str, results: dict[str, dict],
                       reused: dict[str, str], chosen: dict[str, str] | None = None) -> dict | None:
    """Record each stage's run id, status and duration on the parent; `llmlab.reused.<stage>` names
    the run whose finished output was reused instead of running the stage again. Stages that fanned
    out get a table of their branches. A finished run registers its model and, with `promote`,
    decides the alias (returned as a dict; None without `promote`, or while the registry does not
    answer: then registration and promotion wait in the outbox with the run's other records, and
    happen when they are sent)."""
    from llmlab.selection import log_branch_tables

    spec, tracker = _tracker(spec_file)
    chosen = chosen or {}
    run = tracker.run(run_id)
    order = spec.stage_names()
    tags = {f"llmlab.reused.{name}": rid for name, rid in reused.items()}
    tags["llmlab.stages"] = json.dumps(order)  # concrete names may hold commas (branches of a sweep)
    missing = [s for s in order if s not in results]
    for i, name in enumerate(missing):  # after a failure: the first missing stage failed
        tags[f"llmlab.stage.{name}.status"] = "failed" if i == 0 and status == "FAILED" else "not run"
    for name, r in results.items():
        tags[f"llmlab.stage.{name}.run_id"] = r["mlflow_run_id"]
        tags[f"llmlab.stage.{name}.status"] = r["status"]
        tags[f"llmlab.stage.{name}.seconds"] = r["seconds"]
    run.set_tags(tags)
    headline, params = summary(spec, results)
    run.log_params(params)
    run.log_metrics(headline, step=0)
    log_branch_tables(run, spec, results)
    decision = None
    if status == "FINISHED":
        from llmlab.promote import promotion_metrics

        op = {"op": REGISTER_OP, "spec_file": str(Path(spec_file).resolve()), "results": results,
              "metrics": promotion_metrics(spec, results, chosen) if spec.promote else {}}
        real = tracker.real_id(run_id) if tracker.sync(announce=False) else None
        if real is not None:
            decision = register_and_promote(tracker, real, op)
        else:
            print(f"registry: the model is registered{' and the alias decided' if spec.promote else ''} when MLflow at "
                  f"{tracker.uri} answers and the run's records are sent", flush=True)
            run.send(op)
    run.finish(status)
    metrics, others = tracker.outbox.waiting()
    if metrics or others:
        print(f"warning: MLflow at {tracker.uri} has not taken {metrics} metrics and {others} other records yet; they "
              f"wait in {tracker.outbox.dir} and are sent by the next llmlab command that reaches it (`llmlab sync` "
              f"sends them now)", flush=True)
    return decision


REGISTER_OP = "register"  # the outbox operation that registers a finished run's model and decides promotion


def register_and_promote(tracker, parent_id: str, op: dict) -> dict | None:
    """Register the run's final model and, with `promote`, decide the alias; the outcome goes onto the
    pipeline's run `parent_id` (an MLflow id) and, with `promote`, into promotion.json beside the
    run's resolved spec. `op` holds the spec file, the stage results and the candidate's metrics (run
    ids translated to MLflow's). Sent directly at the end of a run, or from the outbox later."""
    from llmlab.promote import promote

    spec_file, results, metrics = op["spec_file"], op["results"], op["metrics"]
    if not Path(spec_file).is_file():
        print(f"warning: {spec_file} is gone: the model of MLflow run {parent_id} is not registered", flush=True)
        return None
    spec = load_spec(spec_file)
    results = {name: {**r, "mlflow_run_id": tracker.real_id(r["mlflow_run_id"]) or r["mlflow_run_id"]}
               for name, r in results.items()}
    version = register_final_model(tracker, spec_file, results, metrics, parent_id)
    client = tracker.client
    if version is None:
        return None
    client.set_tag(parent_id, "llmlab.registered_model", f"{version[0]}/{version[1]}")
    if spec.promote is None:
        return None
    made = promote(client, spec, version[0], version[1], metrics)
    print(made.sentence(), flush=True)
    for key, value in {"llmlab.promote.decision": "promoted" if made.promoted else "refused",
                       "llmlab.promote.alias": made.alias, "llmlab.promote.version": made.version,
                       "llmlab.promote.champion_before": made.champion_version or "none",
                       "llmlab.promote.reason": made.reason[:4000]}.items():
        client.set_tag(parent_id, key, str(value))
    decision = made.to_dict()
    resolved = state_dir() / "runs" / parent_id / "promotion.json"
    atomic_write_json(resolved, decision)
    client.log_artifact(parent_id, str(resolved))
    return decision


def _replay_register(tracker, run_id: str, op: dict) -> None:
    register_and_promote(tracker, run_id, op)


def send_waiting(uri: str) -> None:
    """Before reading from the store at `uri`: send what its outbox holds (quietly; nothing when empty)."""
    from llmlab.tracking import Outbox, Tracker

    if Outbox(uri).files():
        Tracker(uri, announce=False)


def sync_all() -> list[str]:
    """Send what every outbox under the state directory holds; one line per tracking store."""
    from llmlab.tracking import Tracker, outboxes

    lines = []
    for box in outboxes():
        before = box.waiting()
        tracker = Tracker(box.uri, announce=False)
        after = tracker.outbox.waiting()
        sent = (before[0] - after[0], before[1] - after[1])
        if after == (0, 0):
            lines.append(f"{box.uri}: sent {sent[0]} metrics and {sent[1]} other records")
        else:
            lines.append(f"{box.uri}: does not answer; {after[0]} metrics and {after[1]} other records still wait in "
                         f"{box.dir}" + (f" ({sent[0]} metrics and {sent[1]} records sent)" if any(sent) else ""))
    return lines


def final_stage(spec, results: dict[str, dict]) -> str | None:
    """The stage whose model is the pipeline's: `promote.model`'s, else the last model made."""
    from llmlab.promote import promoted_stage

    target = promoted_stage(spec)
    if target is not None and target in results:
        return target
    with_model = [name for name, r in results.items() if "model" in r["outputs"] and r["kind"] != "reward"]
    return with_model[-1] if with_model else None


def summary(spec, results: dict[str, dict]) -> tuple[dict[str, float], dict[str, str]]:
    """The pipeline's headline numbers and key params, for its MLflow run: each stage's closing
    metrics as `<stage>/<metric>` (`sft/exact_match`; an eval stage's per model, `eval/grpo/ppl`),
    and the final model's scores from the last eval stage that scored it as `final/<metric>`."""
    from llmlab.tracking import mlflow_key

    metrics: dict[str, float] = {}
    final = final_stage(spec, results)
    for name, r in results.items():
        for key, value in r["metrics"].items():
            if not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                continue
            model, _, rest = key.partition("/") if r["kind"] == "eval" else ("", "", key)
            short = rest.removeprefix("eval/")
            metrics[mlflow_key(f"{name}/{model}/{short}" if model else f"{name}/{short}")] = float(value)
            if final and model == final:
                metrics[mlflow_key(f"final/{short}")] = float(value)
    params = {"pipeline": spec.name, "seed": str(spec.seed), "spec_hash": config_hash(spec),
              "stages": " -> ".join(results), "final_stage": final or "none"}
    return metrics, params


def register_final_model(tracker, spec_file: str, results: dict[str, dict],
                         metrics: dict[str, float] | None = None, parent_id: str | None = None) -> tuple[str, str] | None:
    """Register the pipeline's model in the MLflow model registry under the pipeline name: the
    `promote.model` stage's, else the last model; its lineage (every stage's run id and fingerprint)
    and `metrics` (what promotion gates read) as tags. A model whose fingerprint is already
    registered is not registered again. Returns (name, version) or None."""
    import logging

    from llmlab.promote import METRIC_TAG

    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to 300 s"
    spec = load_spec(spec_file)
    final_name = final_stage(spec, results)
    if final_name is None:
        return None
    final = results[final_name]
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
    from llmlab.tracking import mlflow_key

    lineage = {mlflow_key(f"llmlab.lineage.{s}"): f"{r['mlflow_run_id']}@{r['fingerprint']}" for s, r in results.items()}
    chain = " -> ".join(f"{s} ({r['kind']}, run {r['mlflow_run_id']}, fingerprint {r['fingerprint']})" for s, r in results.items())
    scores = {f"{METRIC_TAG}{k}": f"{v:.6g}" for k, v in sorted((metrics or {}).items())[:200]}
    tags = {"llmlab.stage": final["stage"], "llmlab.stage_run_id": final["mlflow_run_id"],
            "llmlab.fingerprint": final["fingerprint"], **lineage, **scores}
    description = f"Model of stage '{final['stage']}' from {spec_file}. Lineage: {chain}"
    try:  # linked to the pipeline's run, where users look first
        version = client.create_model_version(name, source, run_id=parent_id or final["mlflow_run_id"], tags=tags,
                                              description=description)
    except Exception as exc:  # noqa: BLE001
        # a tracking server that proxies artifacts takes a version only from the run holding its source
        if parent_id is None or "run_id" not in str(exc):
            raise
        version = client.create_model_version(name, source, run_id=final["mlflow_run_id"], tags=tags,
                                              description=description)
    return name, version.version


def _read_local(uri: str, read: Callable[[Any], Any]) -> Any:
    """`read(connection)` on MLflow's SQLite store at `uri`, opened read-only, so `runs` answers without
    loading MLflow: [] when the store does not exist yet, None when `uri` is not a SQLite store or its
    tables are not those read here (then MLflow's client reads it)."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return []
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            return read(db)
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _parent_runs(uri: str, pipeline: str | None, limit: int) -> list[tuple[str, str, str, int, int | None, dict]]:
    """(experiment, run id, status, start ms, end ms, tags) of recent pipeline runs, newest first."""

    def read(db) -> list:
        found = db.execute(
            "SELECT e.name, r.run_uuid, r.status, r.start_time, r.end_time FROM runs r "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'llmlab.pipeline' AND t.value != '' "
            "WHERE r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active' AND (? IS NULL OR e.name = ?) "
            "ORDER BY r.start_time DESC LIMIT ?", (pipeline, pipeline, limit)).fetchall()
        return [(name, run_id, status, start, end,
                 dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall()))
                for name, run_id, status, start, end in found]

    local = _read_local(uri, read)
    if local is not None:
        return local
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for exp in [e for e in client.search_experiments() if pipeline in (None, e.name)]:
        for r in client.search_runs([exp.experiment_id], filter_string="tags.`llmlab.pipeline` != ''",
                                    order_by=["attributes.start_time DESC"], max_results=limit):
            out.append((exp.name, r.info.run_id, r.info.status, r.info.start_time, r.info.end_time, dict(r.data.tags)))
    return sorted(out, key=lambda r: r[3], reverse=True)[:limit]


def list_runs(pipeline: str | None, limit: int = 20) -> list[dict]:
    """Recent pipeline runs (newest first): status, start, duration, and per stage its status,
    seconds and whether a finished output was reused."""
    from llmlab.tracking import default_tracking_uri, mlflow_key, stage_list

    uri = default_tracking_uri()
    send_waiting(uri)
    out = []
    for name, run_id, status, start, end, tags in _parent_runs(uri, pipeline, limit):
        out.append({
            "pipeline": name, "run_id": run_id, "status": status,
            "registered": tags.get("llmlab.registered_model"), "promotion": tags.get("llmlab.promote.decision"),
            "start": start, "seconds": ((end or start) - start) / 1000,
            "stages": [{"stage": s, "status": tags.get(f"llmlab.stage.{mlflow_key(s)}.status", "?"),
                        "seconds": float(tags.get(f"llmlab.stage.{mlflow_key(s)}.seconds", 0)),
                        "reused": f"llmlab.reused.{mlflow_key(s)}" in tags} for s in stage_list(tags.get("llmlab.stages", ""))],
        })
    return out


def champions(pipeline: str | None = None) -> list[dict]:
    """Every alias of llmlab's registered models: model name, alias, version, its stage and run."""
    from llmlab.tracking import default_tracking_uri

    uri = default_tracking_uri()
    local = _read_local(uri, lambda db: db.execute(
        "SELECT a.name, a.alias, a.version, v.run_id, (SELECT value FROM model_version_tags vt WHERE vt.name = "
        "a.name AND vt.version = a.version AND vt.key = 'llmlab.stage') FROM registered_model_aliases a "
        "JOIN model_versions v ON v.name = a.name AND v.version = a.version "
        "WHERE (? IS NULL OR a.name = ?) ORDER BY a.name, a.alias", (pipeline, pipeline)).fetchall())
    if local is not None:
        return [{"model": m, "alias": a, "version": str(v), "stage": st, "run_id": r} for m, a, v, r, st in local]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for model in client.search_registered_models():
        if pipeline not in (None, model.name):
            continue
        for alias, version in sorted((model.aliases or {}).items()):
            v = client.get_model_version(model.name, version)
            out.append({"model": model.name, "alias": alias, "version": str(version), "stage": v.tags.get("llmlab.stage"),
                        "run_id": v.run_id})
    return out


_handlers()
