"""Sweeps, selection, promotion and rounds through the Prefect flow: pipelines/tiny-sweep.yaml and a
preferences -> dpo group in rounds, shrunk to tiny models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import cli_env, shrunk_tiny

pytestmark = pytest.mark.slow

BRANCHES = ["beta=0.1,train.lr=0.0001", "beta=0.1,train.lr=0.0003", "beta=0.5,train.lr=0.0001", "beta=0.5,train.lr=0.0003"]
NEW = ["beta=0.9,train.lr=0.0001", "beta=0.9,train.lr=0.0003"]


def sweep_spec(tmp: Path, betas=(0.1, 0.5), parallel: int = 1) -> Path:
    spec = shrunk_tiny(tmp, "sweep-test", pipeline="tiny-sweep.yaml")
    raw = yaml.safe_load(spec.read_text())
    raw["max_parallel"] = parallel
    raw["stages"]["dpo"]["sweep"]["beta"] = list(betas)
    # tiny models score 0 exact match everywhere: select and gate on what separates the branches
    raw["stages"]["release"]["select"] = {"stage": "eval", "metric": "dpo/eval/loss", "mode": "min"}
    raw["promote"]["gates"] = ["eval/loss <= champion.eval/loss"]
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def losses(metrics_file: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_sweep_runs_its_branches_selects_the_best_promotes_it_and_reuses_them_when_a_value_is_added(harness, isolated):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from llmlab.plan import plan_run

    spec = sweep_spec(isolated)
    results = pipeline(spec=str(spec))
    dpo, evals = [f"dpo[{b}]" for b in BRANCHES], [f"eval[{b}]" for b in BRANCHES]
    assert list(results) == ["tokenizer", "pretrain", "sft", *dpo, *evals, "release"]
    runs = isolated / "runs"
    for b in BRANCHES:
        record = json.loads((runs / "dpo" / b / "stage.json").read_text())
        assert record["status"] == "finished" and record["stage"] == f"dpo[{b}]"
        beta, lr = (float(kv.split("=")[1]) for kv in b.split(","))
        assert record["config"]["beta"] == beta and record["config"]["train"]["lr"] == lr
    # the choice: the eval branch with the lowest dpo/eval/loss, and release exports that branch's model
    best = min(evals, key=lambda e: results[e]["metrics"]["dpo/eval/loss"])
    winner = "dpo[" + best[len("eval["):]
    release = json.loads((runs / "release" / "stage.json").read_text())
    assert release["input_runs"]["dpo"] == results[winner]["mlflow_run_id"]
    assert release["inputs"]["dpo"] == results[winner]["fingerprint"]

    client = MlflowClient(f"sqlite:///{isolated / 'state' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep-test")
    all_runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in all_runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags["mlflow.runName"]: r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(dpo + evals) <= set(children)
    one = children[dpo[3]].data
    assert one.params["sweep.beta"] == "0.5" and one.params["sweep.train.lr"] == "0.0003"
    assert one.tags["llmlab.sweep.beta"] == "0.5" and one.tags["llmlab.base_stage"] == "dpo"
    assert children[evals[3]].data.tags["llmlab.sweep.train.lr"] == "0.0003"  # an eval branch groups with its dpo
    assert children[evals[3]].data.params["sweep.beta"] == "0.5"
    tags = parent.data.tags
    assert tags["llmlab.select.release"] == best and tags["llmlab.select.release.metric"] == "min dpo/eval/loss"
    series = client.get_metric_history(parent.info.run_id, "select/release/dpo_eval_loss")
    assert [m.value for m in sorted(series, key=lambda m: m.step)] == pytest.approx(
        [results[e]["metrics"]["dpo/eval/loss"] for e in evals])
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "selections/release.json", str(isolated))).read_text())
    assert [r["branch"] for r in table["table"]] == evals and [r["chosen"] for r in table["table"]].count(True) == 1
    assert "selections/release.png" in [a.path for a in client.list_artifacts(parent.info.run_id, "selections")]
    assert "branches/dpo.json" in [a.path for a in client.list_artifacts(parent.info.run_id, "branches")]
    # promotion: the first version takes the alias; the decision is on the parent run
    assert tags["llmlab.promote.decision"] == "promoted" and tags["llmlab.registered_model"] == "sweep-test/1"
    assert str(client.get_model_version_by_alias("sweep-test", "champion").version) == "1"

    # one more beta, two branches side by side: plan says only the new branches (and what follows) run
    spec = sweep_spec(isolated, betas=(0.1, 0.5, 0.9), parallel=2)
    rows = {r.stage: r for r in plan_run(spec)}
    assert all(rows[d].action == "reuse" for d in dpo + evals)
    assert all(rows[f"{s}[{b}]"].action == "run" and rows[f"{s}[{b}]"].reasons == ["never ran in this workdir"]
               for s in ("dpo", "eval") for b in NEW)
    assert rows["release"].action == "run" and "eval" in rows["release"].reasons[-1]
    started = {d: json.loads((runs / "dpo" / d[4:-1] / "stage.json").read_text())["started"] for d in dpo}
    again = pipeline(spec=str(spec))
    assert all(again[d]["reused"] for d in dpo + evals)
    assert not any(again[f"{s}[{b}]"]["reused"] for s in ("dpo", "eval") for b in NEW)
    assert {d: json.loads((runs / "dpo" / d[4:-1] / "stage.json").read_text())["started"] for d in dpo} == started
    # a branch that ran beside another (its own process, half the cores) has the losses it has alone
    side_by_side = losses(runs / "dpo" / NEW[0] / "metrics.jsonl")
    alone = pipeline(spec=str(spec), only=[f"dpo[{NEW[0]}]"], force=[f"dpo[{NEW[0]}]"])
    assert not alone[f"dpo[{NEW[0]}]"]["reused"]
    assert losses(runs / "dpo" / NEW[0] / "metrics.jsonl") == pytest.approx(side_by_side, abs=1e-6)


def cli(args, cwd, env):
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_rounds_chain_their_models_and_a_killed_round_resumes(tmp_path, api_url):
    spec = shrunk_tiny(tmp_path, "rounds-test")
    raw = yaml.safe_load(spec.read_text())
    st = raw["stages"]
    dpo = {**st["dpo"], "from": "prefs"}
    dpo["train"].update(max_steps=40, save_every=5, eval_every=40, log_every=1)
    raw["stages"] = {
        "pretrain": st["pretrain"], "sft": st["sft"], "merge": st["merge"],
        "prefs": {"kind": "preferences", "from": "merge", "data": [{"path": "builtin:tasks-prompts"}], "reward": "exact_match",
                  "samples_per_prompt": 4, "max_prompts": 16, "batch_prompts": 8, "max_new_tokens": 6, "answer_as_chosen": True},
        "dpo": dpo,
        "eval": {**st["eval"], "from": ["sft", "dpo#1", "dpo"]},
    }
    raw["repeat"] = {"stages": ["prefs", "dpo"], "times": 3}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = cli_env(tmp_path / "state", api_url)
    runs = tmp_path / "runs"
    proc = cli(["run", str(spec)], tmp_path, env)
    metrics = runs / "dpo" / "round-2" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and max(losses(metrics), default=0) >= 12):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    logged = max(losses(metrics), default=0)
    assert logged < 40, "round 2 finished before it could be killed:\n" + out[-2000:]
    first = {s: json.loads((runs / s / "round-1" / "stage.json").read_text())["started"] for s in ("prefs", "dpo")}
    done = cli(["run", str(spec)], tmp_path, env)
    out = done.communicate(timeout=900)[0]
    assert done.returncode == 0, out[-3000:]
    # steps take ~50 ms here, so the kill can land after the checkpoint at step 15 too: the resume is from the
    # last checkpoint written (every 5 steps) before the kill, never from the start and never past what was logged
    resumed = [int(line.split("resuming from step ")[1].split()[0]) for line in out.splitlines()
               if "[dpo#2]" in line and "resuming from step " in line]
    assert len(resumed) == 1, out[-3000:]
    assert 10 <= resumed[0] <= logged and resumed[0] % 5 == 0, (resumed, logged)
    assert {s: json.loads((runs / s / "round-1" / "stage.json").read_text())["started"] for s in ("prefs", "dpo")} == first
    record = {f"{s}#{k}": json.loads((runs / s / f"round-{k}" / "stage.json").read_text())
              for s in ("prefs", "dpo") for k in (1, 2, 3)}
    assert all(r["status"] == "finished" for r in record.values())
    # each round samples from the last round's model and trains on its own pairs
    assert record["prefs#1"]["inputs"]["merge"] == json.loads((runs / "merge" / "stage.json").read_text())["fingerprint"]
    for k in (2, 3):
        assert record[f"prefs#{k}"]["inputs"]["merge"] == record[f"dpo#{k - 1}"]["fingerprint"]
        assert record[f"prefs#{k}"]["input_runs"]["merge"] == record[f"dpo#{k - 1}"]["mlflow_run_id"]
    for k in (1, 2, 3):
        assert record[f"dpo#{k}"]["inputs"]["prefs"] == record[f"prefs#{k}"]["fingerprint"]
    assert len({record[f"dpo#{k}"]["fingerprint"] for k in (1, 2, 3)}) == 3
    ev = json.loads((runs / "eval" / "stage.json").read_text())
    assert ev["inputs"]["dpo#1"] == record["dpo#1"]["fingerprint"] and ev["inputs"]["dpo"] == record["dpo#3"]["fingerprint"]
    assert "dpo#1/eval/loss" in ev["metrics"] and "dpo/eval/loss" in ev["metrics"]
