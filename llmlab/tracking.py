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

A store that does not answer — at the start of a run or in the middle of a stage — costs a warning,
never the run, and loses nothing: runs are created locally (`local-<hex>` ids) and every record goes
to the store's outbox on disk (`Outbox`), sent in order when the store answers (during the run, at a
stage's end, or by the next llmlab command that reaches it; `llmlab sync`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from llmlab.paths import state_dir
from llmlab.report import HISTORY_KEYS

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer parameter values
TRUNCATED = " …[truncated: {n} characters; the full value is in the stage's config.json]"
METRIC_FLUSH = 200  # metrics buffered before one log_batch call
RETRY_SECONDS = 30.0  # while MLflow does not answer, a stage tries again this often (at most)
RETRY_WAIT = 2.0  # at a stage's end, seconds between tries
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
ANSWER_SECONDS = 2.0  # how long a tracking server's /health gets to answer
OUTBOX = "mlflow-outbox"  # under the state directory: what MLflow has not taken yet
ARTIFACT_COPY_LIMIT = 20 * 2**20  # artifacts up to this size are copied into the outbox (they may be temporary)
LOCAL_ID = re.compile(r"local-[0-9a-f]{32}")  # a run created while MLflow did not answer
EXPERIMENT_KIND = "mlflow.experimentKind"  # the tag that picks the view MLflow's UI opens an experiment in


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
    """MLflow's HTTP client retries a dead server for minutes by default; llmlab's own calls try
    once (short timeout) and keep what failed for later."""
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


def _cause(exc: BaseException) -> str:
    """The gist of a failure, short: a connection error's reason rather than MLflow's wrapping of it."""
    text = str(exc).strip()
    found = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|timed out", text)
    if found and isinstance(exc, Exception) and type(exc).__name__ in ("MlflowException", "ConnectionError"):
        return found.group(0).strip()
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def answers(uri: str) -> bool:
    """Whether the tracking store at `uri` answers: an HTTP server's /health within ANSWER_SECONDS;
    a local store (SQLite, files) always does."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=ANSWER_SECONDS) as response:
            return response.status < 500
    except Exception:  # noqa: BLE001  not answering, however it fails
        return False


def is_local_id(run_id: str | None) -> bool:
    return bool(run_id) and LOCAL_ID.fullmatch(str(run_id)) is not None


# --------------------------------------------------------------------------- the outbox


class Outbox:
    """What a tracking store has not taken yet, on disk: `<state dir>/mlflow-outbox/<hash of the URI>/`
    holds one JSONL file of operations per run (`<created ns>-<run id>.jsonl`, appended in order),
    copies of small artifacts (`files/`), and `state.json`: how many operations of each file were
    sent, and which MLflow run each local run id became. Operations are data, so any process —
    the stage's, the flow's, or a later `llmlab` command — can send them (`send_waiting`)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.dir = state_dir(create=False) / OUTBOX / hashlib.sha1(uri.encode()).hexdigest()[:16]

    # -- writing
    def _ensure(self) -> None:
        if not (self.dir / "uri.txt").is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "uri.txt").write_text(self.uri)

    def file_of(self, run_id: str) -> Path:
        found = sorted(self.dir.glob(f"*-{run_id}.jsonl")) if self.dir.is_dir() else []
        return found[0] if found else self.dir / f"{time.time_ns()}-{run_id}.jsonl"

    def append(self, run_id: str, op: dict[str, Any]) -> None:
        """Add one operation to the run's file, durably (a killed process keeps what it appended)."""
        self._ensure()
        if op["op"] == "artifact":
            op = self._keep_artifact(op)
        with self.lock(), open(self.file_of(run_id), "a", encoding="utf-8") as f:  # not while a sync empties it
            f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _keep_artifact(self, op: dict[str, Any]) -> dict[str, Any]:
        """A copy of a small artifact (it may be a temporary file); a large one stays where it is."""
        path = Path(op["path"])
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        if sum(f.stat().st_size for f in files) > ARTIFACT_COPY_LIMIT:
            return op
        target = self.dir / "files" / uuid.uuid4().hex / path.name
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return {**op, "path": str(target), "copy": True}

    # -- reading
    @staticmethod
    def ops(path: Path) -> list[dict[str, Any]]:
        """The complete operations of a file (a line still being written is left for later)."""
        text = path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def state(self) -> dict[str, Any]:
        try:
            found = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            found = {}
        return {"ids": found.get("ids", {}), "sent": found.get("sent", {}), "failures": found.get("failures", {})}

    def save(self, state: dict[str, Any]) -> None:
        from llmlab.checkpoint import atomic_write_json

        atomic_write_json(self.dir / "state.json", state)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []

    def waiting(self, run_id: str | None = None) -> tuple[int, int]:
        """(metrics, other operations) not sent yet, of one run or all."""
        if not self.dir.is_dir():
            return 0, 0
        sent = self.state()["sent"]
        metrics = others = 0
        for f in self.files():
            if run_id is not None and not f.name.endswith(f"-{run_id}.jsonl"):
                continue
            for op in self.ops(f)[sent.get(f.name, 0):]:
                if op["op"] == "metrics":
                    metrics += len(op["items"])
                else:
                    others += 1
        return metrics, others

    def real_id(self, run_id: str) -> str | None:
        """The MLflow run a run id stands for: itself, or what a local id became (None: not created yet)."""
        if not is_local_id(run_id):
            return run_id
        return self.state()["ids"].get(run_id)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        import fcntl

        self._ensure()
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def outboxes() -> list[Outbox]:
    """Every outbox under the state directory that holds something."""
    root = state_dir(create=False) / OUTBOX
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / "uri.txt").is_file():
            box = Outbox((folder / "uri.txt").read_text())
            if box.files():
                found.append(box)
    return found


def _translate(obj: Any, ids: dict[str, str]) -> Any:
    """`obj` with every local run id in its strings replaced by the MLflow run id it became."""
    if isinstance(obj, str):
        return LOCAL_ID.sub(lambda m: ids.get(m.group(0), m.group(0)), obj) if "local-" in obj else obj
    if isinstance(obj, dict):
        return {k: _translate(v, ids) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_translate(v, ids) for v in obj]
    return obj


def _run_of(f: Path) -> str:
    """The run id an outbox file is for (`<created ns>-<run id>.jsonl`)."""
    return f.name.split("-", 1)[1][: -len(".jsonl")]


PRIMITIVE = {"create", "metrics", "params", "tag", "artifact", "terminate"}  # MLflow's own operations


def _unresolved(obj: Any, ids: dict[str, str]) -> bool:
    return any(m not in ids for m in LOCAL_ID.findall(json.dumps(obj)))


# handlers of operations other than MLflow's own, by name: handler(tracker, run_id, op); registered by
# the module that writes them (llmlab.pipeline_runs: "register", the registry and promotion)
HANDLERS: dict[str, Callable[..., None]] = {}


class Unsendable(Exception):
    """An operation that cannot be sent yet (its handler is not loaded in this process)."""


# --------------------------------------------------------------------------- runs and the tracker


class StageRun:
    """An MLflow run (one stage's, or the pipeline's). Tracking cannot break training, and loses
    nothing: metrics are buffered and sent in batches; when the tracking store does not answer, this
    operation and every later one go to the run's outbox file (see `Outbox`) — on disk, in order —
    while the stage goes on, and are sent when the store answers: tried again every RETRY_SECONDS,
    at the stage's end (waiting up to `wait_seconds` when the store stopped answering during the
    stage), and by any later `llmlab` command that reaches the store. A run created while the store
    was down has a local id (`local-<hex>`) until then. A warning says when sending stopped, and
    how many metrics were delayed or still wait at the stage's end."""

    def __init__(self, tracker: "Tracker", run_id: str, label: str = "", down_from_start: bool = False):
        self.tracker, self.run_id, self.label = tracker, run_id, label or run_id
        self.client, self.uri, self.wait_seconds = tracker.client, tracker.uri, tracker.wait_seconds
        self._buffer: list[list[Any]] = []  # [key, value, timestamp ms, step] not yet sent
        self._spooling = is_local_id(run_id) and tracker.outbox.real_id(run_id) is None
        self._spooling = self._spooling or tracker.outbox.waiting(run_id) != (0, 0)
        self._down_from_start = down_from_start or self._spooling
        self._warned = False
        self._next_try = time.monotonic() + RETRY_SECONDS
        self.delayed = 0  # metrics that could not be sent when they were logged
        self.unsent = 0  # metrics still waiting after finish()

    # -- sending
    def _send(self, op: dict[str, Any]) -> None:
        run_id = self.tracker.outbox.real_id(self.run_id)
        ids = self.tracker.outbox.state()["ids"] if "local-" in json.dumps(op) else {}
        if run_id is None or _unresolved(op, ids):
            raise Unsendable("a run it names is not created in MLflow yet")
        self.tracker.apply(run_id, _translate(op, ids))

    def _enqueue(self, op: dict[str, Any]) -> None:
        if not self._spooling:
            try:
                self._send(op)
                return
            except Exception as exc:  # noqa: BLE001 — any tracking failure is survivable
                self._spooling = True
                if not self._warned and not self._down_from_start and not isinstance(exc, Unsendable):
                    print(f"warning: [{self.label}] MLflow at {self.uri} did not answer ({_cause(exc)}); the stage goes "
                          f"on, and its records wait in {self.tracker.outbox.dir} until MLflow answers", flush=True)
                self._warned = True
                self._next_try = time.monotonic() + RETRY_SECONDS
        self.tracker.outbox.append(self.run_id, op)
        if op["op"] == "metrics":
            self.delayed += len(op["items"])
        if time.monotonic() >= self._next_try:
            self._retry()

    def _retry(self) -> bool:
        """Send what waits (this run's and every other's in the outbox); True once this run's is all sent."""
        self._next_try = time.monotonic() + RETRY_SECONDS
        if self.tracker.deferred:  # another process sends
            return False
        self.tracker.sync(announce=False)
        if self.tracker.outbox.waiting(self.run_id) == (0, 0) and self.tracker.outbox.real_id(self.run_id):
            if self._spooling and self._warned:
                print(f"[{self.label}] MLflow answers again: {self.delayed} delayed metrics sent", flush=True)
            self._spooling = False
            return True
        return False

    # -- the run's records
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._buffer += [[mlflow_key(k), float(v), now, int(step)] for k, v in metrics.items()]
        if len(self._buffer) >= METRIC_FLUSH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (or keep them in the outbox)."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._enqueue({"op": "metrics", "items": chunk})

    def log_params(self, params: dict[str, Any]) -> None:
        items = [[mlflow_key(k), v] for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._enqueue({"op": "params", "items": items[i: i + 100]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._enqueue({"op": "tag", "key": mlflow_key(k), "value": str(v)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.exists():
            self._enqueue({"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def send(self, op: dict[str, Any]) -> None:
        """Any other operation (a handler's, see HANDLERS), in order with the rest."""
        self._enqueue(op)

    def drain(self) -> bool:
        """Send everything waiting. When the store stopped answering during this run, wait up to
        `wait_seconds` for it; when it was down from the start, try once. What is still not sent
        stays in the outbox, and one line says where and who sends it."""
        self.flush()
        if not self._spooling:
            return True
        deadline = time.monotonic() + (0.0 if self._down_from_start else self.wait_seconds)
        while not self._retry():
            if time.monotonic() >= deadline:
                self.unsent, others = self.tracker.outbox.waiting(self.run_id)
                if not self._down_from_start:  # down from the start: the run's first line said so
                    print(f"warning: [{self.label}] MLflow at {self.uri} did not answer for {self.wait_seconds:.0f} s "
                          f"at the stage's end: {self.unsent} metrics (of {self.delayed} delayed) and {others} other "
                          f"records wait in {self.tracker.outbox.dir}; the next llmlab command that reaches MLflow "
                          f"sends them (`llmlab sync` now), and the stage folder's metrics.jsonl has every metric",
                          flush=True)
                return False
            time.sleep(min(RETRY_WAIT, max(deadline - time.monotonic(), 0.0)))
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (see `drain`) and end the run with `status`."""
        self.flush()
        self._enqueue({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self.drain()


_announced: set[str] = set()  # tracking URIs this process already said are down
_deferred = False  # see defer()


def defer() -> None:
    """From now on, this process records to outboxes only and never imports mlflow: what a stage run
    in the command's own process does (`llmlab.foreground`) while a flow in the background sends the
    records."""
    global _deferred
    _deferred = True


class Tracker:
    """Creates runs on one tracking store, or local ones in its outbox while the store does not answer."""

    def __init__(self, uri: str | None = None, experiment: str = "llmlab", wait_seconds: float = 60.0,
                 announce: bool = True, client: Any = None):
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.wait_seconds = wait_seconds
        self.deferred = _deferred
        self.outbox = Outbox(self.uri)
        self._experiments: dict[str, str] = {}
        if self.deferred:
            self.client = None
            return
        from mlflow.tracking import MlflowClient

        self.client = client or MlflowClient(tracking_uri=self.uri)
        self.sync(announce=announce)  # what an earlier run left waiting goes first

    def _experiment(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = None
            if self.uri.startswith("sqlite:") or self.uri.startswith("file:") or "://" not in self.uri:
                # MLflow would otherwise write artifacts to ./mlruns of whatever folder it runs in
                location = (state_dir() / "mlartifacts" / name).as_uri()
            try:
                self.client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it first
                pass
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise RuntimeError(f"MLflow at {self.uri} did not create experiment '{name}'")
        if EXPERIMENT_KIND not in (found.tags or {}):  # MLflow's UI opens it in its model-training view
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        self._experiments[name] = found.experiment_id
        return found.experiment_id

    @property
    def experiment_id(self) -> str:
        return self._experiment(self.experiment)

    def announce(self, exc: BaseException | None = None) -> None:
        """One line, once per process: the store does not answer, and where its records wait."""
        if self.uri in _announced:
            return
        _announced.add(self.uri)
        cause = f" ({_cause(exc)})" if exc is not None else ""
        print(f"warning: MLflow at {self.uri} does not answer{cause}; the run goes on, and its MLflow records wait in "
              f"{self.outbox.dir}: they are sent when MLflow answers — during the run, at a stage's end, or by the next "
              f"llmlab command that reaches it (`llmlab sync` sends them now)", flush=True)

    # -- sending what waits
    def apply(self, run_id: str, op: dict[str, Any]) -> None:
        """Perform one operation on the MLflow run `run_id` (an MLflow id)."""
        from mlflow.entities import Metric, Param

        kind = op["op"]
        with _fail_fast():
            if kind == "metrics":
                self.client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["items"]])
            elif kind == "params":
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["items"]])
            elif kind == "tag":
                self.client.set_tag(run_id, op["key"], op["value"])
            elif kind == "artifact":
                path = Path(op["path"])
                if not path.exists():
                    print(f"warning: MLflow run {run_id}: artifact {path} is gone; not sent", flush=True)
                elif path.is_dir():
                    self.client.log_artifacts(run_id, str(path), op.get("artifact_path"))
                else:
                    self.client.log_artifact(run_id, str(path), op.get("artifact_path"))
            elif kind == "terminate":
                self.client.set_terminated(run_id, op["status"], end_time=op.get("end_time"))
            elif kind in HANDLERS:
                HANDLERS[kind](self, run_id, op)
            else:
                raise Unsendable(f"operation '{kind}' needs its handler, which this process has not loaded")

    def _create(self, op: dict[str, Any]) -> str:
        with _fail_fast():
            run = self.client.create_run(self._experiment(op["experiment"]), start_time=op["start_time"],
                                         run_name=op["run_name"], tags=op["tags"])
        return run.info.run_id

    def sync(self, announce: bool = True) -> bool:
        """Send everything this store's outbox holds, in order: first the runs created while it was
        down (parents before children), then each run's records, and last the operations of
        handlers (registration reads what the stages logged). Stops at the first failure while the
        store does not answer (True: nothing left); a record the store refuses three times while it
        answers is dropped with a warning."""
        box = self.outbox
        if self.deferred:
            return False
        if not box.files():
            return True
        with box.lock():
            state = box.state()
            try:
                for f in box.files():  # runs first: children name their parents, tags name other runs
                    ops = box.ops(f)
                    if state["sent"].get(f.name, 0) == 0 and ops and ops[0]["op"] == "create":
                        state["ids"][_run_of(f)] = self._create(_translate(ops[0], state["ids"]))
                        state["sent"][f.name] = 1
                        box.save(state)
                for handlers in (False, True):
                    for f in box.files():
                        self._send_file(f, state, handlers)
            except Exception as exc:  # noqa: BLE001 — the store does not answer: the rest waits
                box.save(state)
                if announce and not answers(self.uri):
                    self.announce(exc)
                return False
        if not box.files():
            shutil.rmtree(box.dir / "files", ignore_errors=True)
        return box.waiting() == (0, 0)

    def _send_file(self, f: Path, state: dict[str, Any], handlers: bool) -> None:
        """Send one run's waiting records in order, stopping before a handler's operation unless
        `handlers`; a file whose records are all sent goes (appends wait for the lock the caller holds)."""
        box, run_id = self.outbox, _run_of(f)
        real = state["ids"].get(run_id) if is_local_id(run_id) else run_id
        ops = box.ops(f)
        done = state["sent"].get(f.name, 0)
        while real is not None and done < len(ops):
            op = ops[done]
            if op["op"] not in PRIMITIVE and not handlers:
                return
            try:
                self.apply(real, _translate(op, state["ids"]))
            except Unsendable:
                return
            except Exception as exc:  # noqa: BLE001
                if not answers(self.uri):
                    raise
                key = f"{f.name}:{done}"
                state["failures"][key] = state["failures"].get(key, 0) + 1
                if state["failures"][key] < 3:
                    raise
                print(f"warning: MLflow at {self.uri} refused a record of run {real} three times ({_cause(exc)}); "
                      f"it is dropped", flush=True)
            done += 1
            state["sent"][f.name] = done
            box.save(state)
        if real is not None and done == len(ops):
            f.unlink()
            state["sent"].pop(f.name, None)
            box.save(state)

    # -- runs
    def _start(self, run_name: str, tags: dict[str, Any]) -> tuple[str, bool]:
        """A new run: created in MLflow, or (store down, or a run it names still local) a local one in
        the outbox. Returns (run id, whether it is local)."""
        op = {"op": "create", "experiment": self.experiment, "run_name": run_name, "start_time": int(time.time() * 1000),
              "tags": {mlflow_key(k): str(v) for k, v in tags.items()}}
        state = self.outbox.state() if "local-" in json.dumps(op) else {"ids": {}}
        if not self.deferred and not _unresolved(op, state["ids"]):
            try:
                return self._create(_translate(op, state["ids"])), False
            except Exception as exc:  # noqa: BLE001
                if answers(self.uri):
                    raise
                self.announce(exc)
        run_id = f"local-{uuid.uuid4().hex}"
        self.outbox.append(run_id, op)
        return run_id, True

    def start_pipeline_run(self, name: str, tags: dict[str, Any]) -> str:
        return self._start(name, tags)[0]

    def start_stage_run(self, parent_run_id: str | None, stage: str, kind: str, tags: dict[str, Any] | None = None) -> StageRun:
        all_tags = {"llmlab.stage": stage, "llmlab.kind": kind, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id, local = self._start(stage, all_tags)
        return StageRun(self, run_id, stage, down_from_start=local)

    def run(self, run_id: str, label: str = "") -> StageRun:
        return StageRun(self, run_id, label)

    def real_id(self, run_id: str) -> str | None:
        """The MLflow run id a recorded run id stands for (None: created while MLflow was down, not sent yet)."""
        return self.outbox.real_id(run_id)


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

    if Outbox(uri or default_tracking_uri()).files():
        Tracker(uri or default_tracking_uri(), announce=False)  # what waits goes first
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
