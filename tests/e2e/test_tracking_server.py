"""A real MLflow server stopped in the middle of a stage and started again: the stage finishes,
warns, and MLflow ends up with every metric the stage wrote to its metrics.jsonl."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import cli_env, shrunk_tiny

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("mlflow server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_a_stage_outlives_an_mlflow_server_that_stops_and_starts_again(tmp_path, api_url):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = shrunk_tiny(tmp_path, "tracking-test", pretrain={"gates": []})
    raw = yaml.safe_load(spec.read_text())
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"]}
    # a checkpoint every 10 steps also sends the buffered metrics: while the server is down, those sends fail
    raw["stages"]["pretrain"]["train"].update(max_steps=400, log_every=2, save_every=10, eval_every=200)
    raw["tracking"] = {"uri": uri, "wait_seconds": 120}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    server = start_mlflow(tmp_path, port)
    env = cli_env(tmp_path / "state", api_url)
    run = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", str(spec)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics_file = tmp_path / "runs" / "pretrain" / "metrics.jsonl"
        deadline = time.time() + 400
        while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.2)
        stop(server)  # mid-stage
        lines_at_stop = len(metrics_file.read_text().splitlines())
        def logged() -> list[dict]:
            return [json.loads(line) for line in metrics_file.read_text().splitlines()]

        down_until = time.time() + 300  # down for at least two checkpoints' sends (12 rows = 24 steps)
        while time.time() < down_until and len(logged()) < lines_at_stop + 12 and logged()[-1]["step"] < 390:
            time.sleep(0.2)
        server = start_mlflow(tmp_path, port)  # back after its start-up time (~15 s)
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-4000:]
        assert "[pretrain] MLflow at " + uri + " did not answer" in out, out[-4000:]
        written = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        assert len(written) > lines_at_stop  # the stage went on while the server was down
        record = json.loads((tmp_path / "runs" / "pretrain" / "stage.json").read_text())
        assert record["status"] == "finished"
        client = MlflowClient(uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(record["mlflow_run_id"], "train/loss"))
        assert history == [(r["step"], pytest.approx(r["train/loss"])) for r in written if "train/loss" in r]
        assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"
    finally:
        if run.poll() is None:
            run.kill()
        stop(server)


def parent_run(client, experiment: str):
    (exp,) = [e for e in client.search_experiments() if e.name == experiment]
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`llmlab.pipeline` != ''")
    return parent


def assert_mlflow_has_every_record(client, parent, runs: Path) -> None:
    """The parent and each stage's run, finished, nested, with every metric its metrics.jsonl holds."""
    from llmlab.tracking import is_local_id, stage_list

    assert parent.info.status == "FINISHED"
    stages = stage_list(parent.data.tags["llmlab.stages"])
    for stage in stages:
        run_id = parent.data.tags[f"llmlab.stage.{stage}.run_id"]
        assert not is_local_id(run_id), (stage, run_id)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        log = runs / stage / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        for key in sorted({k for r in rows for k in r if k != "step"}):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert history == sorted((r["step"], pytest.approx(r[key])) for r in rows if key in r), (stage, key)
        assert [a.path for a in client.list_artifacts(run_id)], stage  # config.json, spec, ...


def test_a_pipeline_started_while_mlflow_is_down_sends_every_record_once_it_answers(tmp_path, api_url):
    from mlflow.tracking import MlflowClient

    from llmlab.tracking import is_local_id

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = shrunk_tiny(tmp_path, "down-at-start")
    raw = yaml.safe_load(spec.read_text())
    raw["stages"] = {k: raw["stages"][k] for k in ("pretrain", "sft", "eval")}
    raw["stages"]["eval"]["from"] = ["pretrain", "sft"]
    raw["stages"]["pretrain"]["train"].update(max_steps=60, log_every=5)
    raw["stages"]["sft"]["train"].update(max_steps=30, log_every=5)
    raw["tracking"] = {"uri": uri}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", str(spec)], cwd=tmp_path,
                           env=cli_env(tmp_path / "state", api_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    server = None
    try:
        metrics_file = tmp_path / "runs" / "pretrain" / "metrics.jsonl"
        deadline = time.time() + 400
        while time.time() < deadline and not metrics_file.exists():
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.2)
        # partway through pretrain: the pipeline is paused while the server starts, so that the server answers
        # mid-stage however long its start-up takes on this machine
        os.kill(run.pid, signal.SIGSTOP)
        try:
            server = start_mlflow(tmp_path, port)
        finally:
            os.kill(run.pid, signal.SIGCONT)
        assert run.poll() is None and not (tmp_path / "runs" / "sft").exists()
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-4000:]
        assert out.count(f"warning: MLflow at {uri} does not answer") == 1 and "Traceback" not in out, out[-4000:]
        records = {s: json.loads((tmp_path / "runs" / s / "stage.json").read_text()) for s in ("pretrain", "sft", "eval")}
        assert is_local_id(records["pretrain"]["mlflow_run_id"])  # made while the server was down
        assert not any(is_local_id(records[s]["mlflow_run_id"]) for s in ("sft", "eval"))  # made after it answered
        client = MlflowClient(uri)
        parent = parent_run(client, "down-at-start")
        assert_mlflow_has_every_record(client, parent, tmp_path / "runs")
        assert parent.data.tags["llmlab.registered_model"].startswith("down-at-start/")
        assert not any((tmp_path / "state" / "mlflow-outbox").rglob("*.jsonl"))
    finally:
        if run.poll() is None:
            run.kill()
        if server is not None:
            stop(server)


def test_a_run_that_never_reached_mlflow_is_registered_and_promoted_by_the_next_command(tmp_path, api_url):
    """The whole run without MLflow, its registration and promotion waiting with the rest, and
    `llmlab runs` — the next command that reaches MLflow — sending it all."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = shrunk_tiny(tmp_path, "never-reached")
    raw = yaml.safe_load(spec.read_text())
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"]}
    raw["tracking"] = {"uri": uri}
    raw["promote"] = {"model": "pretrain", "gates": ["eval/loss <= 100"]}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = cli_env(tmp_path / "state", api_url, MLFLOW_TRACKING_URI=uri)
    done = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert f"registry: the model is registered and the alias decided when MLflow at {uri} answers" in console
    server = start_mlflow(tmp_path, port)
    try:
        shown = subprocess.run([sys.executable, "-m", "llmlab.cli", "runs"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "promotion: never-reached version 1 is now 'champion'" in shown.stdout
        assert "champion: never-reached version 1 (stage pretrain" in shown.stdout and "never-reached" in shown.stdout
        client = MlflowClient(uri)
        parent = parent_run(client, "never-reached")
        assert_mlflow_has_every_record(client, parent, tmp_path / "runs")
        assert parent.data.tags["llmlab.promote.decision"] == "promoted"
        assert str(client.get_model_version_by_alias("never-reached", "champion").version) == "1"
    finally:
        stop(server)
