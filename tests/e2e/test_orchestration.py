"""Rerunning only what failed or changed, recomputing what was deleted, resuming a killed stage,
and concurrent runs of one stage. Whole pipelines through the Prefect flow."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import cli_env, half_broken_text, shrunk_tiny

pytestmark = pytest.mark.slow


def started(results_dir: Path, stage: str) -> float:
    return json.loads((results_dir / stage / "stage.json").read_text())["started"]


def mlflow_runs(state: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_failed_stage_reruns_alone_and_finished_stages_are_cached(tiny_copy):
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    # rows past the 50 that validation samples are broken: the eval stage itself fails, after the others ran
    evaldata = half_broken_text(tiny_copy.project / "evaldata.jsonl", 60, 200)
    spec = shrunk_tiny(tiny_copy.project, "tiny-test", workdir="runs",
                       eval={"data": [{"path": str(evaldata)}], "val_fraction": 0.5})
    runs = tiny_copy.runs
    before = {s: started(runs, s) for s in ("tokenizer", "pretrain", "grpo")}
    failed = pipeline(spec=str(spec), return_state=True)
    # an expected failure ends the flow with one sentence: the stage, the file, the cause and the fix
    assert failed.is_failed() and failed.message.startswith("stage 'eval': ") and "evaldata.jsonl" in failed.message
    assert "malformed" in failed.message and "max_bad_share" in failed.message and "Traceback" not in failed.message
    record = json.loads((runs / "eval" / "stage.json").read_text())
    assert record["status"] == "failed" and record["expected"] and "evaldata.jsonl" in record["error"]
    log = (runs / "eval" / "stage.log").read_text()  # the traceback is kept for whoever wants it
    assert "Traceback" in log and "DataSourceError" in log and str(Path("runs") / "eval" / "stage.log") in failed.message
    client = MlflowClient(f"sqlite:///{tiny_copy.state / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FAILED" and "evaldata.jsonl" in run.data.tags["llmlab.error"]
    assert "stage.log" in [a.path for a in client.list_artifacts(run.info.run_id)]
    half_broken_text(evaldata, 300, 0)  # the data is fixed
    state = pipeline(spec=str(spec), return_state=True)
    results = state.result()
    assert {s: started(runs, s) for s in before} == before  # not executed again
    assert results["tokenizer"]["reused"] and results["pretrain"]["reused"] and not results["eval"]["reused"]
    assert json.loads((runs / "eval" / "stage.json").read_text())["status"] == "finished"

    async def task_states(flow_run_id):
        async with get_client() as client:
            trs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {tr.name: tr.state.name for tr in trs}

    import asyncio

    names = asyncio.run(task_states(state.state_details.flow_run_id))
    assert names["tokenizer"] == "Cached" and names["pretrain"] == "Cached" and names["eval"] == "Completed"
    # MLflow: the new parent run names the reused child runs (the first parent is the finished run copied here)
    client, all_runs = mlflow_runs(tiny_copy.state, "tiny-test")
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED", "FINISHED"]
    assert parents[2].data.tags["llmlab.reused.pretrain"] == results["pretrain"]["mlflow_run_id"]
    assert "llmlab.reused.eval" not in parents[2].data.tags


def test_deleted_or_altered_output_is_recomputed_not_trusted(tiny_copy):
    from flows.pipeline import pipeline

    first, runs = tiny_copy.results, tiny_copy.runs
    # an altered tokenizer output no longer matches its recorded fingerprint
    (runs / "tokenizer" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    second = pipeline(spec=str(tiny_copy.spec))
    assert not second["tokenizer"]["reused"]
    assert second["tokenizer"]["fingerprint"] == first["tokenizer"]["fingerprint"]  # deterministic retrain
    assert second["pretrain"]["reused"]  # same tokenizer fingerprint: pretrain's key is unchanged
    import shutil

    shutil.rmtree(runs / "pretrain" / "model")
    third = pipeline(spec=str(tiny_copy.spec))
    assert not third["pretrain"]["reused"] and (runs / "pretrain" / "model" / "model.safetensors").is_file()
    assert third["pretrain"]["fingerprint"] == first["pretrain"]["fingerprint"]


def test_spec_edit_reruns_only_what_changed_and_flags(tiny_copy):
    from flows.pipeline import pipeline

    project, runs = tiny_copy.project, tiny_copy.runs
    before = {s: started(runs, s) for s in ("tokenizer", "pretrain", "eval")}
    spec = shrunk_tiny(project, "tiny-test", workdir="runs", eval={"max_new_tokens": 4})  # an eval-only change
    results = pipeline(spec=str(spec))
    assert [results[s]["reused"] for s in ("tokenizer", "pretrain", "sft", "dpo", "grpo", "eval")] == [True] * 5 + [False]
    # a DPO field changes: everything before it is reused, dpo and what depends on it (grpo, eval) run
    spec = shrunk_tiny(project, "tiny-test", workdir="runs", eval={"max_new_tokens": 4}, dpo={"beta": 0.3})
    results = pipeline(spec=str(spec))
    assert [results[s]["reused"] for s in ("tokenizer", "pretrain", "sft", "dpo", "grpo", "eval")] == [True] * 3 + [False] * 3
    assert started(runs, "pretrain") == before["pretrain"]
    # --force pretrain reruns it from step 0; --only eval runs eval alone
    results = pipeline(spec=str(spec), force=["pretrain"])
    assert not results["pretrain"]["reused"] and results["tokenizer"]["reused"]
    assert started(runs, "pretrain") > before["pretrain"]
    t = started(runs, "tokenizer")
    results = pipeline(spec=str(spec), only=["eval"], force=["eval"])
    assert results["tokenizer"]["reused"] and results["pretrain"]["reused"] and not results["eval"]["reused"]
    results = pipeline(spec=str(spec), from_stage="sft")
    assert results["pretrain"]["reused"] and not results["sft"]["reused"] and not results["dpo"]["reused"]
    assert started(runs, "tokenizer") == t


def cli(args, cwd, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def losses(metrics_file: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_sigkilled_stage_resumes_from_checkpoint_with_the_same_losses(tmp_path, api_url):
    """`llmlab run` killed with SIGKILL mid-pretrain; the rerun resumes and matches an uninterrupted run."""
    # steps of this tiny model take milliseconds: 120 of them leave the watcher below a wide window to kill in
    steps = 120
    train = dict(max_steps=steps, warmup_steps=2, batch_sequences=4, eval_every=20, eval_steps=2, save_every=5, log_every=1)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for d in (killed, clean):
        d.mkdir()
    specs = {}
    for d in (killed, clean):
        specs[d] = shrunk_tiny(d, "kill-test")
        raw = yaml.safe_load(specs[d].read_text())
        raw["stages"] = {"pretrain": raw["stages"]["pretrain"]}  # the later stages add time, not coverage
        raw["stages"]["pretrain"]["train"].update(train)
        specs[d].write_text(yaml.safe_dump(raw, sort_keys=False))
    # one thread each: the rerun and the reference run side by side on two cores (the killed run too,
    # so all three compute alike)
    env = {d: cli_env(d / "state", api_url, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") for d in (killed, clean)}
    proc = cli(["run", str(specs[killed])], killed, env[killed])
    metrics = killed / "runs" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and max(losses(metrics), default=0) >= 13):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(metrics)) < steps, "the run finished before it could be killed"
    # the rerun and an uninterrupted reference run side by side (each in its own folder and state)
    done = cli(["run", str(specs[killed])], killed, env[killed])
    ref = cli(["run", str(specs[clean])], clean, env[clean])
    out_resumed = done.communicate(timeout=300)[0]
    assert done.returncode == 0, out_resumed[-3000:]
    resumed_at = int(out_resumed.split("resuming from step ")[1].split()[0])
    assert resumed_at >= 10 and resumed_at % 5 == 0
    out_ref = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out_ref[-3000:]
    got, want = losses(metrics), losses(clean / "runs" / "pretrain" / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1)) == sorted(want)  # history kept, no duplicated steps
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], abs=1e-5), step


def test_ctrl_c_leaves_the_local_prefect_server_up_and_the_next_run_resumes_on_it(tmp_path):
    """Without a Prefect API set, `llmlab run` starts the state directory's local server in a session
    of its own: Ctrl+C (SIGINT to the run's process group, as a terminal sends it) stops the stage at
    a checkpoint — exit 130, one sentence, no traceback — while the server stays up for the next
    run, which reuses it, resumes, and shows in it; `llmlab stop` stops it."""
    import urllib.request

    from llmlab.prefect_server import _alive

    spec = shrunk_tiny(tmp_path, "local-server")
    raw = yaml.safe_load(spec.read_text())
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"]}
    raw["stages"]["pretrain"]["train"].update(max_steps=80, save_every=5, log_every=1)
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in cli_env(tmp_path / "state", LLMLAB_PREFECT_IDLE_SECONDS="120").items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME")}  # the server's database: its own, under the state dir
    first = cli(["run", str(spec)], tmp_path, env)
    metrics = tmp_path / "runs" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and max(losses(metrics), default=0) >= 10):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    server = json.loads((tmp_path / "state" / "prefect-server" / "server.json").read_text())
    try:
        assert first.returncode == 130 and "Traceback" not in out, out[-3000:]
        assert "Prefect: started a local server at" in out
        assert out.rstrip().endswith("interrupted: finished stages are kept and an interrupted stage resumes from its "
                                     "last checkpoint") and "stage 'pretrain': training interrupted at step" in out
        assert _alive(server["pid"])  # Ctrl+C did not reach it
        again = cli(["run", str(spec)], tmp_path, env)
        out2 = again.communicate(timeout=300)[0]
        assert again.returncode == 0 and "resuming from step" in out2, out2[-3000:]
        assert f"Prefect: a local server at {server['url'].removesuffix('/api')}" in out2
        # every stage finished: a third run decides that before Prefect starts, answers at once, and
        # records the run (each stage Cached, a parent MLflow run naming the reused runs) in the background
        third = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmlab.cli", "run", str(spec)], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=120)
        assert third.returncode == 0 and "every stage is reused" in third.stdout, third.stdout + third.stderr[-3000:]
        loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in third.stderr.splitlines()
                  if line.startswith("import time:")}
        assert not loaded & {"torch", "transformers", "prefect", "mlflow"}, sorted(loaded)
        assert "Prefect:" not in third.stdout and "pretrain   reused" in third.stdout
        recorder = int(re.search(r"in the background \(process (\d+)", third.stdout).group(1))
        deadline = time.time() + 120
        while time.time() < deadline and _alive(recorder):
            time.sleep(0.2)

        def api(path: str) -> list:
            request = urllib.request.Request(server["url"] + path, data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())

        flow_runs = sorted(api("/flow_runs/filter"), key=lambda r: r["created"])
        assert len(flow_runs) == 3 and flow_runs[-1]["state"]["type"] == "COMPLETED"
        tasks = {t["name"]: t["state"]["name"] for t in api("/task_runs/filter") if t["flow_run_id"] == flow_runs[-1]["id"]}
        assert tasks["tokenizer"] == tasks["pretrain"] == "Cached", tasks
        client, parents = mlflow_runs(tmp_path / "state", "local-server")
        last = [r for r in parents if "llmlab.pipeline" in r.data.tags][-1]
        assert last.info.status == "FINISHED" and "llmlab.reused.pretrain" in last.data.tags
    finally:
        stopped = subprocess.run([sys.executable, "-m", "llmlab.cli", "stop"], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=60)
    assert "the local Prefect server" in stopped.stdout and not _alive(server["pid"])


def _run_stage_in_process(spec, cwd, state, queue):
    os.chdir(cwd)
    os.environ["LLMLAB_STATE_DIR"] = state
    from llmlab.execute import execute_stage

    tok = json.loads((Path(cwd) / "runs" / "tokenizer" / "stage.json").read_text())["result"]
    queue.put(execute_stage(spec, "pretrain", {"tokenizer": tok}, None))


def test_concurrent_runs_of_one_stage_never_collide(isolated):
    from llmlab.execute import execute_stage

    spec = shrunk_tiny(isolated, "concurrent-test")
    execute_stage(str(spec), "tokenizer", {}, None)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_stage_in_process, args=(str(spec), str(isolated), str(isolated / "state"), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r["reused"] for r in results) == [False, True]  # one trained, the other waited and reused
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    record = json.loads((isolated / "runs" / "pretrain" / "stage.json").read_text())
    assert record["status"] == "finished" and record["fingerprint"] == results[0]["fingerprint"]



def test_a_failed_gate_stops_the_pipeline_before_the_next_stage(tiny_copy):
    from flows.pipeline import pipeline

    runs = tiny_copy.runs
    before = started(runs, "grpo")
    spec = shrunk_tiny(tiny_copy.project, "tiny-test", workdir="runs", dpo={"gates": ["eval/accuracy > 1.5"]})
    state = pipeline(spec=str(spec), return_state=True)
    assert state.is_failed() and re.search(r"gate 'eval/accuracy > 1.5' failed: eval/accuracy = [0-9.]+, bound > 1.5",
                                           state.message)
    record = json.loads((runs / "dpo" / "stage.json").read_text())
    assert record["status"] == "failed" and "eval/accuracy" in record["error"]
    assert started(runs, "grpo") == before  # nothing after the gate ran


def test_the_cli_shows_an_expected_failure_as_one_sentence_and_debug_shows_the_traceback(tmp_path, api_url):
    data = half_broken_text(tmp_path / "corpus.jsonl", 60, 200)
    spec = shrunk_tiny(tmp_path, "cli-fail")
    raw = yaml.safe_load(spec.read_text())
    raw["stages"] = {"pretrain": {**raw["stages"]["pretrain"], "data": [{"path": str(data)}]}}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = cli_env(tmp_path / "state", api_url)
    plain = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec)], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=600)
    shown = plain.stdout + plain.stderr
    assert plain.returncode == 1, shown
    assert "pipeline failed: stage 'pretrain': " in plain.stderr and "corpus.jsonl" in plain.stderr, shown
    assert "Traceback" not in shown and "NoneType: None" not in shown, shown
    debug = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", "--debug", str(spec)], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=600)
    assert debug.returncode == 1 and "Traceback" in debug.stdout + debug.stderr
    assert "DataSourceError" in debug.stdout + debug.stderr
