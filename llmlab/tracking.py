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

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from llmlab.paths import state_dir
from llmlab.report import HISTORY_KEYS

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer parameter values
TRUNCATED = " …[truncated: {n} characters; the full value is in the stage's config.json]"
METRIC_FLUSH = 200  # metrics buffered before one log_batch call
RETRY_SECONDS = 30.0  # while MLflow does not answer, a stage tries again this often (at most)
RETRY_WAIT = 2.0  # at a stage's end, seconds between tries
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
        out[prefix] = _shorten(str(obj))
    return out


_KEY_CHARS = {"[": "/", "]": "", ",": " ", "=": "_", "#": "/round-", ";": " ", ":": "."}


def mlflow_key(name: str) -> str:
    """A metric, param or tag name MLflow accepts (letters, digits, _ - . / and spaces): a branch
    `dpo[beta=0.1,train.lr=0.0001]` reads `dpo/beta_0.1 train.lr_0.0001`, a round `dpo#2` `dpo/round-2`."""
    out = "".join(_KEY_CHARS.get(c, c) for c in name)
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in out)


def stage_list(tag: str) -> list[str]:
    """The stages a pipeline run recorded in its `llmlab.stages` tag (a JSON list; comma-separated
    in runs recorded before sweeps)."""
    try:
        return list(json.loads(tag))
    except ValueError:
        return [s for s in tag.split(",") if s]


def _shorten(value: str) -> str:
    """A value MLflow accepts: too long ones end in a marker saying how long they were."""
    if len(value) <= PARAM_VALUE_LIMIT:
        return value
    marker = TRUNCATED.format(n=len(value))
    return value[: PARAM_VALUE_LIMIT - len(marker)] + marker


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's HTTP client retries a dead server for minutes by default; a stage's own logging
    tries once (short timeout) and keeps what failed for later."""
    saved = {k: os.environ.get(k) for k in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StageRun:
    """A nested MLflow run for one stage. Tracking cannot break training: metrics are buffered and
    sent in batches; when the tracking server does not answer, everything not yet accepted (metrics,
    params, tags, artifacts, the final status) is kept in order and sent when it answers again —
    tried again every RETRY_SECONDS, and at `finish()` for up to `wait_seconds` — while the stage
    goes on (its metrics.jsonl is the source of truth). A warning says when sending stopped and how
    many metrics were delayed or, in the end, not sent."""

    def __init__(self, client: Any, run_id: str, uri: str = "", wait_seconds: float = 60.0, label: str = ""):
        self.client, self.run_id, self.uri, self.wait_seconds = client, run_id, uri, wait_seconds
        self.label = label or run_id
        self._buffer: list[Any] = []  # metrics not yet queued
        self._queue: list[tuple[str, Any]] = []  # ("metrics", [Metric]) or ("call", fn), in order
        self._down_since: float | None = None
        self._next_try = 0.0
        self.delayed = 0  # metrics that could not be sent when they were logged
        self.unsent = 0  # metrics still not sent after finish()

    # -- sending
    def _queued_metrics(self) -> int:
        return sum(len(item) for kind, item in self._queue if kind == "metrics")

    def _send(self, force: bool = False) -> bool:
        """Send the queue in order; False (and the rest kept) at the first failure."""
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return False
        while self._queue:
            kind, item = self._queue[0]
            try:
                with _fail_fast():
                    if kind == "metrics":
                        self.client.log_batch(self.run_id, metrics=item)
                    else:
                        item()
            except Exception as exc:  # noqa: BLE001 — any tracking failure is survivable
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                    print(f"warning: [{self.label}] MLflow at {self.uri} did not answer ({type(exc).__name__}: {first}); "
                          f"the stage goes on, its metrics stay in metrics.jsonl and are sent when MLflow answers",
                          flush=True)
                self._next_try = time.monotonic() + RETRY_SECONDS
                return False
            self._queue.pop(0)
        if self._down_since is not None:
            print(f"[{self.label}] MLflow answers again: {self.delayed} delayed metrics sent", flush=True)
            self._down_since = None
        return True

    def _enqueue(self, kind: str, item: Any) -> None:
        was_up = self._down_since is None
        self._queue.append((kind, item))
        if self._send():
            return
        if was_up:
            self.delayed += self._queued_metrics()  # what this failure held back
        elif kind == "metrics":
            self.delayed += len(item)

    # -- the run's records
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= METRIC_FLUSH:
            self.flush()

    def flush(self) -> None:
        """Queue the buffered metrics and try to send everything queued."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._enqueue("metrics", chunk)
        if self._queue:
            self._send()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._enqueue("call", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._enqueue("call", lambda k=mlflow_key(k), v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._enqueue("call", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        elif path.is_file():
            self._enqueue("call", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def drain(self) -> bool:
        """Send everything queued, waiting up to `wait_seconds` for a server that stopped
        answering; then give up with a warning (never an error: the stage's work is done)."""
        self.flush()
        deadline = time.monotonic() + self.wait_seconds
        while not self._send(force=True):
            if time.monotonic() >= deadline:
                self.unsent = self._queued_metrics()
                others = sum(1 for kind, _ in self._queue if kind == "call")
                print(f"warning: [{self.label}] MLflow at {self.uri} did not answer for {self.wait_seconds:.0f} s at the "
                      f"stage's end: {self.unsent} metrics (of {self.delayed} delayed) and {others} other records were "
                      f"not sent; the stage folder's metrics.jsonl has every metric", flush=True)
                return False
            time.sleep(min(RETRY_WAIT, max(deadline - time.monotonic(), 0.0)))
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (see `drain`) and end the run with `status`."""
        self.flush()
        self._queue.append(("call", lambda: self.client.set_terminated(self.run_id, status)))
        self.drain()


class Tracker:
    """Creates experiments and runs on one tracking store."""

    def __init__(self, uri: str | None = None, experiment: str = "llmlab", wait_seconds: float = 60.0):
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.wait_seconds = wait_seconds
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
        run = self.client.create_run(self.experiment_id, run_name=name, tags={mlflow_key(k): str(v) for k, v in tags.items()})
        return run.info.run_id

    def start_stage_run(self, parent_run_id: str | None, stage: str, kind: str, tags: dict[str, Any] | None = None) -> StageRun:
        all_tags = {"llmlab.stage": stage, "llmlab.kind": kind, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage,
                                     tags={mlflow_key(k): str(v) for k, v in all_tags.items()})
        return StageRun(self.client, run.info.run_id, self.uri, self.wait_seconds, stage)

    def run(self, run_id: str, label: str = "") -> StageRun:
        return StageRun(self.client, run_id, self.uri, self.wait_seconds, label)


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
    stages = stage_list(tags.get("llmlab.stages", ""))

    def run_of(name: str) -> str | None:
        return tags.get(f"llmlab.stage.{mlflow_key(name)}.run_id")

    evals = [s for s in stages if run_of(s) and client.get_run(run_of(s)).data.tags.get("llmlab.kind") == "eval"]
    if not evals:
        raise LookupError(f"run {parent.info.run_id} has no finished eval stage to report")
    eval_run = run_of(evals[-1])
    with tempfile.TemporaryDirectory() as tmp:
        results = json.loads(Path(client.download_artifacts(eval_run, "results.json", tmp)).read_text())
    upstream = stages[: stages.index(evals[-1])]  # every stage before the eval; those that trained have curves
    histories = {name: stage_histories(client, run_of(name)) for name in upstream if run_of(name)}
    return write_report(results, histories, out_dir)
