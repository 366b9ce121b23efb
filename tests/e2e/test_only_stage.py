"""`llmlab run --only`: the stage runs in the command's own process, which loads neither Prefect nor
MLflow, and a background flow records it in both (llmlab.foreground)."""

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import cli_env, shrunk_tiny

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    from llmlab.prefect_server import _alive as alive

    return alive(pid)


def _api(url: str, path: str, body: dict | None = None) -> list:
    request = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _run_only(project, env, *args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmlab.cli", "run", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    follower = re.search(r"recorded by a background process \(pid (\d+)", done.stdout)
    if follower:
        deadline = time.time() + 180
        while time.time() < deadline and _alive(int(follower.group(1))):
            time.sleep(0.2)
        assert not _alive(int(follower.group(1))), "the background flow did not finish"
    errors = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    return done, loaded, errors


def _flow_run(api_url: str, parent_tags: dict) -> tuple[dict, dict[str, dict]]:
    run = _api(api_url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [parent_tags["prefect.flow_run_id"]]}}})[0]
    tasks = {t["name"]: t for t in _api(api_url, "/task_runs/filter",
                                        {"flow_runs": {"id": {"any_": [run["id"]]}}})}
    return run, tasks


def test_only_runs_the_stage_here_and_a_background_flow_records_it(tiny_copy, api_url):
    from mlflow.tracking import MlflowClient

    project, runs, state = tiny_copy.project, tiny_copy.runs, tiny_copy.state
    env = cli_env(state, api_url)
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-test").experiment_id

    # a gate that cannot pass: the stage runs here, fails with one sentence; the flow run fails with it
    failing = shrunk_tiny(project, "tiny-test", workdir="runs", sft={"gates": ["eval/ppl < 0"]})
    done, loaded, errors = _run_only(project, env, str(failing), "--only", "sft")
    assert done.returncode == 1 and "pipeline failed: stage 'sft' stopped the pipeline: gate 'eval/ppl < 0'" in errors, \
        done.stdout[-2000:] + errors[-3000:]
    assert "Traceback" not in done.stdout + errors
    assert not loaded & {"prefect", "mlflow", "sqlalchemy"}, sorted(loaded & {"prefect", "mlflow", "sqlalchemy"})
    parent = client.search_runs([experiment], order_by=["attributes.start_time DESC"],
                                filter_string="tags.`llmlab.pipeline` = 'tiny-test'")[0]
    assert parent.info.status == "FAILED"
    flow_run, tasks = _flow_run(api_url, parent.data.tags)
    assert flow_run["state"]["type"] == "FAILED" and "gate 'eval/ppl < 0'" in flow_run["state"]["message"]
    assert tasks["sft"]["state"]["type"] == "FAILED"

    # the same spec without the gate: sft runs again here, the flow shows it Completed, MLflow has it all
    spec = shrunk_tiny(project, "tiny-test", workdir="runs")
    before = json.loads((runs / "sft" / "stage.json").read_text())
    done, loaded, errors = _run_only(project, env, str(spec), "--only", "sft", "--force", "sft")
    assert done.returncode == 0, done.stdout[-2000:] + errors[-3000:]
    assert not loaded & {"prefect", "mlflow", "sqlalchemy"}
    assert re.search(r"^sft\s+finished", done.stdout, re.M) and re.search(r"^pretrain\s+reused", done.stdout, re.M)
    record = json.loads((runs / "sft" / "stage.json").read_text())
    assert record["status"] == "finished" and record["started"] > before["started"]

    parent = client.search_runs([experiment], order_by=["attributes.start_time DESC"],
                                filter_string="tags.`llmlab.pipeline` = 'tiny-test'")[0]
    assert parent.info.status == "FINISHED" and "llmlab.reused.pretrain" in parent.data.tags
    flow_run, tasks = _flow_run(api_url, parent.data.tags)
    assert flow_run["state"]["type"] == "COMPLETED" and flow_run["parameters"]["follow"]
    assert flow_run["name"] == "tiny-test"  # the spec's name, not its file's
    assert tasks["sft"]["state"]["type"] == "COMPLETED" and "pretrain" not in tasks  # the others: reused, not run
    assert not any((state / "foreground").iterdir())  # each hand-over folder went with its flow

    # the stage's MLflow run: under the pipeline's, named in stage.json (once sent), every metric of metrics.jsonl
    from llmlab.tracking import Outbox

    run_id = Outbox(f"sqlite:///{state / 'mlflow.db'}").real_id(record["mlflow_run_id"])
    assert run_id is not None
    stage_run = client.get_run(run_id)
    assert stage_run.data.tags["mlflow.parentRunId"] == parent.info.run_id and stage_run.info.status == "FINISHED"
    rows = [json.loads(line) for line in (runs / "sft" / "metrics.jsonl").read_text().splitlines()]
    logged = {(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")}
    assert logged == {(r["step"], r["train/loss"]) for r in rows if "train/loss" in r} and logged

