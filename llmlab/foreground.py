"""Stages run in the command's own process while a flow in the background records them.

    llmlab run pipelines/tiny.yaml --only sft      # sft runs here; the flow run is recorded beside it

`llmlab run --only` runs the named stages in the `llmlab` process itself, with nothing loaded but
what the stages need: no Prefect, no MLflow client (`llmlab.tracking.defer`: the stage's MLflow
records go to the tracking store's outbox). A follower — the same pipeline flow, started at once in
a background process (`llmlab run --follow`) — records the run in Prefect while it happens (the
flow run, a task run per stage: the named ones Running until this process hands over their result,
the others Cached or reused), sends the MLflow records as they come, and closes the pipeline's
MLflow run. So rerunning one stage costs that stage, not a flow's start-up.

The hand-over is a folder under the state directory (`foreground/<id>/`): `handoff.json` (this
process's pid and the pipeline's MLflow run id) and one `<stage>.json` per stage that ended here
(its result, or the sentence it failed with). A follower whose foreground process is gone before a
stage's file appears ends that stage Failed with one sentence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from llmlab.checkpoint import atomic_write_json
from llmlab.errors import StageFailed, debug_enabled, expected_failure
from llmlab.paths import state_dir
from llmlab.spec import Pipeline, load_spec

POLL_SECONDS = 0.5  # how often a follower looks for a stage's end
SEND_SECONDS = 10.0  # how often a follower sends the MLflow records a running stage left in the outbox
FOLLOW_LOG = "runs.log"  # under <state dir>/logs: what the background followers print


def eligible(spec: Pipeline, only: list[str], narrow: dict) -> bool:
    """Whether `--only` stages can run here: one after another, none choosing a sweep's branch
    (`select`), none under torchrun, and no two branches that the flow would run side by side."""
    from llmlab.isolate import default_parallel

    keep, problems = spec.graph.narrowed(narrow or {})
    named = set(spec.expand_names(only))
    if not named or problems:
        return False
    for name in named:
        dist = getattr(spec.stages[name], "distributed", None) if name != "tokenizer" else None
        if spec.selection(name) is not None or (dist is not None and dist.world_size > 1):
            return False
    bases = [spec.variant(n).base for n in named if n != "tokenizer" and spec.variant(n).assign]
    return len(bases) == len(set(bases)) or default_parallel(spec.max_parallel) == 1


def run_here(spec_file: str, only: list[str], force: list[str], sweep: list[str], narrow: dict,
             say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the `only` stages of `spec_file` in this process on the others' finished outputs; a
    follower records the run. Returns {stage: StageResult dict}; raises what a stage raised."""
    from llmlab import tracking
    from llmlab.pipeline_runs import open_pipeline_run
    from llmlab.reuse import finished_result

    spec = load_spec(spec_file)
    tracking.defer()
    handoff = state_dir() / "foreground" / uuid.uuid4().hex[:12]
    parent = open_pipeline_run(spec_file, None)
    atomic_write_json(handoff / "handoff.json", {"pid": os.getpid(), "spec": str(spec_file), "parent_run_id": parent,
                                                 "started": time.time()})
    pid, log = _start_follower(spec_file, only, force, sweep, handoff)
    say(f"MLflow and Prefect: recorded by a background process (pid {pid}, log {log}) while the stages run here")
    keep, _ = spec.graph.narrowed(narrow or {})
    named = set(spec.expand_names(only))
    forced = set(spec.expand_names(force))
    results: dict[str, dict] = {}
    for name in [n for n in spec.stage_names() if n == "tokenizer" or n in keep]:
        inputs = {ref: results[dep] for ref, dep in spec.dependencies(name).items()}
        if name not in named:
            recorded = finished_result(spec, name, inputs, strict=False)
            if recorded is None:
                sentence = (f"stage '{name}' has no finished output to run {only} on; run it first "
                            f"(llmlab run {spec_file} --only {name})")
                atomic_write_json(handoff / f"{name}.json", {"error": sentence})
                raise StageFailed(sentence)
            results[name] = {**recorded, "reused": True}
            continue
        results[name] = _run_stage(spec_file, name, inputs, parent, name in forced, handoff)
    return results


def _run_stage(spec_file: str, name: str, inputs: dict[str, dict], parent: str, force: bool, handoff: Path) -> dict:
    from llmlab.execute import execute_stage

    try:
        result = execute_stage(spec_file, name, inputs, parent, force=force)
    except BaseException as exc:
        sentence = expected_failure(exc, name)
        log = getattr(exc, "stage_log", None)
        told = sentence or f"stage '{name}' failed: {type(exc).__name__}: {exc}"
        atomic_write_json(handoff / f"{name}.json", {"error": told + (f" (traceback in {log})" if log else "")})
        if sentence is None or debug_enabled():
            raise
        failed = StageFailed(sentence)  # the sentence names the stage, as the flow's would
        failed.stage_log = log
        raise failed from exc
    atomic_write_json(handoff / f"{name}.json", {"result": result})
    return result


def _start_follower(spec_file: str, only: list[str], force: list[str], sweep: list[str], handoff: Path) -> tuple[int, Path]:
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "llmlab.cli", "run", str(spec_file), "--follow", str(handoff)]
    for flag, values in (("--only", only), ("--force", force), ("--sweep", sweep)):
        for value in values:
            args += [flag, value]
    with open(logs / FOLLOW_LOG, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc.pid, logs / FOLLOW_LOG


def handoff_of(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "handoff.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child of ours that exited but was not reaped yet is gone too
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def await_stage(folder: str | Path, stage: str, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """The follower's side: wait until the foreground process hands over `stage`'s end; returns its
    result, or raises StageFailed with the sentence it failed with (or that its process is gone)."""
    folder = Path(folder)
    pid = handoff_of(folder)["pid"]
    done = folder / f"{stage}.json"
    last_tick = time.monotonic()
    while not done.is_file():
        if not _alive(pid):
            if done.is_file():
                break
            raise StageFailed(f"stage '{stage}': the process running it (pid {pid}) ended before it finished; "
                              f"run again to resume from its last checkpoint")
        if tick is not None and time.monotonic() - last_tick >= SEND_SECONDS:
            tick()
            last_tick = time.monotonic()
        time.sleep(POLL_SECONDS)
    ended = json.loads(done.read_text())
    if "error" in ended:
        raise StageFailed(ended["error"])
    return ended["result"]


def followed_result(spec_file: str, stage: str, folder: str | Path) -> dict[str, Any]:
    """`await_stage` for a follower: the stage's MLflow records are sent while it runs and at its end."""
    from llmlab.pipeline_runs import send_waiting
    from llmlab.tracking import default_tracking_uri

    uri = load_spec(spec_file).tracking.uri or default_tracking_uri()
    try:
        return await_stage(folder, stage, tick=lambda: send_waiting(uri))
    finally:
        send_waiting(uri)


def adopt_run(spec_file: str, folder: str | Path, flow_run_id: str | None) -> str:
    """The follower's side: the pipeline's MLflow run the foreground opened, now its flow run's."""
    from llmlab.pipeline_runs import adopt_pipeline_run

    return adopt_pipeline_run(spec_file, handoff_of(folder)["parent_run_id"], flow_run_id)
