"""MLflow tracking — the only module that imports mlflow.

One experiment per pipeline name (created with an explicit artifact location), one parent run per
pipeline execution, one nested run per stage. Metrics use the same names across stages
(`train/loss`, `eval/ppl`, ...) with `step` = optimizer step, so the MLflow UI compares them.

    tracker = Tracker.from_spec(spec.tracking, experiment=spec.name)
    parent = tracker.start_pipeline_run("tiny", tags={...})
    run = tracker.start_stage_run(parent, "pretrain", "pretrain", params=config)
    run.log_metrics({"train/loss": 2.3}, step=10); run.finish("FINISHED")

Default store: `sqlite:///<state dir>/mlflow.db` with artifacts in `<state dir>/mlartifacts`;
`$MLFLOW_TRACKING_URI` or the spec's `tracking.uri` override it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmlab.paths import state_dir
from llmlab.report import HISTORY_KEYS

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer parameter values
METRIC_FLUSH = 200  # metrics buffered before one log_batch call


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"a.b[0].c": "value"} for MLflow params."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = str(obj)[:PARAM_VALUE_LIMIT]
    return out


class StageRun:
    """A nested MLflow run for one stage; buffers metrics and sends them in batches."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self._buffer: list[Any] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= METRIC_FLUSH:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


class Tracker:
    """Creates experiments and runs on one tracking store."""

    def __init__(self, uri: str | None = None, experiment: str = "llmlab"):
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow would otherwise write artifacts to ./mlruns of whatever folder it runs in
            location = (state_dir() / "mlartifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_pipeline_run(self, name: str, tags: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        return run.info.run_id

    def start_stage_run(self, parent_run_id: str | None, stage: str, kind: str, tags: dict[str, Any] | None = None) -> StageRun:
        all_tags = {"llmlab.stage": stage, "llmlab.kind": kind, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
        return StageRun(self.client, run.info.run_id)

    def run(self, run_id: str) -> StageRun:
        return StageRun(self.client, run_id)


def stage_histories(client: Any, run_id: str, keys: tuple[str, ...] = HISTORY_KEYS) -> dict[str, list[tuple[int, float]]]:
    """A run's metric histories as [(step, value)], for training-curve plots."""
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def rebuild_report(run: str, out_dir: Path, uri: str | None = None) -> list[Path]:
    """Rebuild the eval report of a past pipeline run from MLflow alone. `run` is a parent run id
    or a pipeline (experiment) name, meaning its newest run. Raises LookupError with the reason."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from llmlab.report import write_report

    client = MlflowClient(uri or default_tracking_uri())
    exp = client.get_experiment_by_name(run)
    if exp is not None:
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`llmlab.pipeline` != ''",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise LookupError(f"pipeline '{run}' has no recorded runs")
        parent = parents[0]
    else:
        try:
            parent = client.get_run(run)
        except Exception:
            raise LookupError(f"no pipeline named '{run}' and no run with that id in {uri or default_tracking_uri()}") from None
    tags = parent.data.tags
    evals = [s for s in tags.get("llmlab.stages", "").split(",")
             if s and f"llmlab.stage.{s}.run_id" in tags
             and client.get_run(tags[f"llmlab.stage.{s}.run_id"]).data.tags.get("llmlab.kind") == "eval"]
    if not evals:
        raise LookupError(f"run {parent.info.run_id} has no finished eval stage to report")
    eval_run = tags[f"llmlab.stage.{evals[-1]}.run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        results = json.loads(Path(client.download_artifacts(eval_run, "results.json", tmp)).read_text())
    stages = [s for s in tags.get("llmlab.stages", "").split(",") if s]
    upstream = stages[: stages.index(evals[-1])]  # every stage before the eval; those that trained have curves
    histories = {name: stage_histories(client, tags[f"llmlab.stage.{name}.run_id"]) for name in upstream
                 if f"llmlab.stage.{name}.run_id" in tags}
    return write_report(results, histories, out_dir)
