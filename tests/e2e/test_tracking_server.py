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
