"""`make serve` path: a real Prefect server and process worker and the MLflow UI on free loopback
ports; a deployment run through the worker; `stop` ends exactly what was started."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, half_broken_text, shrunk_tiny

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_prefect_yaml_deploys_every_pipeline():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployed = {d["parameters"]["spec"] for d in config["deployments"]}
    assert deployed == {f"pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.yaml")}
    for d in config["deployments"]:
        assert d["entrypoint"] == "flows/pipeline.py:pipeline" and d["work_pool"]["name"] == "llmlab"
        assert d["name"] == Path(d["parameters"]["spec"]).stem
    (step,) = config["pull"]
    assert "prefect.deployments.steps.set_working_directory" in step


def test_serve_deploy_run_on_worker_and_stop(tmp_path):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["LLMLAB_STATE_DIR"] = str(state)
    pport, mport = free_port(), free_port()
    llmlab = [sys.executable, "-m", "llmlab.cli"]
    started = subprocess.run([*llmlab, "serve", "--prefect-port", str(pport), "--mlflow-port", str(mport)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    info = json.loads((state / "serve.json").read_text()) if (state / "serve.json").exists() else None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert set(info["processes"]) == {"prefect-server", "prefect-worker", "mlflow-ui"}
        with urllib.request.urlopen(f"{info['prefect_ui']}/ui-settings", timeout=10) as r:  # the UI calls this server
            assert json.loads(r.read())["api_url"] == info["prefect_api_url"] == f"http://127.0.0.1:{pport}/api"
        # tokenizer -> pretrain -> two rounds of sft -> eval over a sweep of two values, narrowed to one by
        # --param sweep; rows past the 50 that validation samples are broken: the eval stage fails on the worker
        evaldata = half_broken_text(tmp_path / "evaldata.jsonl", 60, 200)
        spec = shrunk_tiny(tmp_path, "deploy-test")
        raw = yaml.safe_load(spec.read_text())
        full_sft = {k: v for k, v in raw["stages"]["sft"].items() if k != "lora"}  # a round hands on a model
        raw["stages"] = {"pretrain": raw["stages"]["pretrain"], "sft": full_sft,
                         "eval": {**raw["stages"]["eval"], "from": ["sft"], "data": [{"path": str(evaldata)}],
                                  "val_fraction": 0.5, "tasks": [], "preferences": [], "reward": None,
                                  "sweep": {"batches": [2, 3]}}}
        raw["repeat"] = {"stages": ["sft"], "times": 2}
        spec.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_env = {**env, "PREFECT_API_URL": info["prefect_api_url"]}
        prefect = str(Path(sys.executable).parent / "prefect")
        out = subprocess.run([prefect, "deployment", "run", "llmlab/tiny-sweep", "--param", f"spec={spec}",
                              "--param", 'sweep={"eval": {"batches": [3]}}', "--watch"],
                             cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # failed on the worker
        flow_run_id = out.stdout.split("UUID:")[1].split()[0]
        finished = ("tokenizer", "pretrain", "sft/round-1", "sft/round-2")
        first = {s: json.loads((tmp_path / "runs" / s / "stage.json").read_text())["started"] for s in finished}
        half_broken_text(evaldata, 300, 0)  # the data is fixed

        def flow_run() -> dict:
            with urllib.request.urlopen(f"{info['prefect_api_url']}/flow_runs/{flow_run_id}", timeout=10) as r:
                return json.loads(r.read())

        runs_before = flow_run()["run_count"]
        retry = subprocess.run([prefect, "flow-run", "retry", flow_run_id], cwd=tmp_path, env=run_env,
                               capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        # right after `retry` the run may still read FAILED: wait for a new attempt to end
        deadline = time.time() + 300
        while time.time() < deadline:
            fr = flow_run()
            run_state = fr["state"]["type"]
            if fr["run_count"] > runs_before and run_state in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(1)
        assert run_state == "COMPLETED"
        for s, t in first.items():  # the retry reused the finished stages
            assert json.loads((tmp_path / "runs" / s / "stage.json").read_text())["started"] == t
        # branches and rounds are task runs, and the retry kept the deployment's sweep parameter
        body = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode()
        req = urllib.request.Request(f"{info['prefect_api_url']}/task_runs/filter", data=body,
                                     headers={"Content-Type": "application/json"})
        names = {t["name"] for t in json.loads(urllib.request.urlopen(req, timeout=10).read())}
        assert {"sft#1", "sft#2", "eval[batches=3]"} <= names and "eval[batches=2]" not in names
        assert (tmp_path / "runs" / "eval" / "batches=3" / "stage.json").is_file()
        assert not (tmp_path / "runs" / "eval" / "batches=2").exists()
        assert json.loads((tmp_path / "runs" / "sft" / "round-2" / "stage.json").read_text())["inputs"]["pretrain"] == \
            json.loads((tmp_path / "runs" / "sft" / "round-1" / "stage.json").read_text())["fingerprint"]
        # MLflow's UI server shows the pipeline's runs: the failed attempt and the retry that finished it
        req = urllib.request.Request(f"{info['mlflow_ui']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=deploy-test")
        exp = json.loads(urllib.request.urlopen(req, timeout=10).read())["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode()
        req = urllib.request.Request(f"{info['mlflow_ui']}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        stages = {t["value"] for r in runs for t in r["data"].get("tags", []) if t["key"] == "llmlab.base_stage"}
        assert stages >= {"pretrain", "sft", "eval"}, stages
        parent = [r for r in runs if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        assert sorted(p["info"]["status"] for p in parent) == ["FAILED", "FINISHED"]
    finally:
        stopped = subprocess.run([*llmlab, "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "prefect-server" in stopped.stdout
    for pgid in info["processes"].values():
        assert not alive(pgid)
    assert not (state / "serve.json").exists()
