"""The shipped tiny pipeline, shrunk to seconds, end to end through the Prefect flow and MLflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import shrunk_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def finished_run(finished_project):
    """The session's finished run of the shrunk tiny pipeline (tests/e2e/conftest.py), read from its folder."""
    return {"spec": finished_project.spec, "results": finished_project.results, "state": finished_project.state}


def test_every_stage_finishes_with_outputs(finished_run):
    from llmlab.checkpoint import fingerprint

    results = finished_run["results"]
    assert list(results) == ["tokenizer", "pretrain", "sft", "merge", "dpo", "grpo", "eval"]
    assert (Path(results["dpo"]["outputs"]["model"]) / "model.safetensors").is_file()
    assert (Path(results["grpo"]["outputs"]["model"]) / "model.safetensors").is_file()
    assert json.loads((Path(results["grpo"]["output_dir"]) / "stage.json").read_text())["inputs"]["dpo"] == \
        results["dpo"]["fingerprint"]
    for name, r in results.items():
        record = json.loads((Path(r["output_dir"]) / "stage.json").read_text())
        assert record["status"] == "finished" and r["status"] == "finished"
        assert record["fingerprint"] == r["fingerprint"]
    model_dir = Path(results["pretrain"]["outputs"]["model"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in model_dir.iterdir()}
    assert fingerprint(model_dir) == results["pretrain"]["fingerprint"]
    assert json.loads((Path(results["pretrain"]["output_dir"]) / "stage.json").read_text())["inputs"] == {
        "tokenizer": results["tokenizer"]["fingerprint"]}
    # LoRA sft wrote adapters (the embedding rows with them), merge a plain model with the chat template
    assert (Path(results["sft"]["output_dir"]) / "adapters" / "best" / "adapter_config.json").is_file()
    merged = Path(results["merge"]["outputs"]["model"])
    assert (merged / "chat_template.jinja").is_file() and (merged / "model.safetensors").is_file()
    # no temporary names left behind
    assert not list(Path(results["pretrain"]["output_dir"]).rglob(".*.tmp"))
    # each stage says which fast paths ran: on a CPU, eager blocks and the growing KV cache
    paths = {name: json.loads((Path(r["output_dir"]) / "stage.json").read_text()).get("fast_paths") for name, r in results.items()}
    assert paths["pretrain"] == {"compile": "eager"} and paths["grpo"] == {"compile": "eager", "decode": "dynamic"}
    assert paths["eval"] == {"decode": "dynamic"} and paths["tokenizer"] is None
    # plan's calibration keeps the harness seconds the eval stage measured, beside the modelled ones
    from llmlab.plan import CALIBRATION, MEASURED_FIXED, _machine_key

    harness = results["eval"]["metrics"][MEASURED_FIXED]
    kept = json.loads((finished_run["state"] / CALIBRATION).read_text())[_machine_key()]["eval"][-1]
    assert 0 < harness < results["eval"]["seconds"] and kept["fixed_seconds"] == pytest.approx(harness)
    assert kept["fixed_model"] > 0


def test_eval_matches_pretrain_on_the_same_held_out_batches(finished_run):
    results = finished_run["results"]
    report = json.loads(Path(results["eval"]["outputs"]["results"]).read_text())
    scores = report["models"]["pretrain"]
    # same sources, val_fraction, seq_len and batches: the eval stage must reproduce pretrain's number
    assert scores["eval/loss"] == pytest.approx(results["pretrain"]["metrics"]["eval/loss"], rel=1e-5)
    assert len(scores["samples"]) == len(report["prompts"])
    text = (Path(results["eval"]["output_dir"]) / "report.md").read_text()
    table = next(block for block in text.split("\n\n") if block.startswith("| model | text loss"))
    assert all(table.count(f"| {m} |") == 1 for m in ("pretrain", "sft", "dpo", "grpo"))
    assert report["tasks"]["prompts"] == 8 and report["preferences"]["pairs"] == 8
    for model in ("pretrain", "sft", "dpo", "grpo"):
        assert 0.0 <= report["models"][model]["exact_match"] <= 1.0
        assert 0.0 <= report["models"][model]["preference_accuracy"] <= 1.0
        # the builtin exact_match reward is 1 per exact match, so its mean is the exact-match rate
        assert report["models"][model]["reward_mean"] == pytest.approx(report["models"][model]["exact_match"])
        assert len(report["task_samples"][model]) == 8
        # the built-in prompts and pairs name their task family: the per-family shares cover each once
        for metric in ("exact_match", "preference_accuracy"):
            by = report["models"][model][f"{metric}_by_family"]
            assert sum(f["n"] for f in by.values()) == 8
            assert sum(f["value"] * f["n"] for f in by.values()) / 8 == pytest.approx(report["models"][model][metric])
    assert "## Preference accuracy per task family" in text


def test_mlflow_has_parent_child_runs_metrics_and_artifacts(finished_run):
    from mlflow.tracking import MlflowClient

    state, results = finished_run["state"], finished_run["results"]
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-test")
    assert exp.artifact_location.startswith((state / "mlartifacts").as_uri())
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] != "none"
    assert {"llmlab.spec_hash", "llmlab.git_commit"} <= set(parent.data.tags)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    # the pipeline's summary on its own run: key params, each stage's closing metrics, the final model's scores
    assert parent.data.params["pipeline"] == "tiny-test" and parent.data.params["final_stage"] == "grpo"
    assert parent.data.params["spec_hash"] == parent.data.tags["llmlab.spec_hash"]
    scores = results["eval"]["metrics"]
    assert parent.data.metrics["final/exact_match"] == pytest.approx(scores["grpo/exact_match"])
    assert parent.data.metrics["eval/sft/exact_match"] == pytest.approx(scores["sft/exact_match"])
    assert parent.data.metrics["dpo/accuracy"] == pytest.approx(results["dpo"]["metrics"]["eval/accuracy"])
    children = {r.data.tags["llmlab.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"tokenizer", "pretrain", "sft", "merge", "dpo", "grpo", "eval"}
    assert client.get_metric_history(children["dpo"].info.run_id, "dpo/accuracy")
    for key in ("rl/reward_mean", "rl/kl", "rl/zero_variance_share", "rl/generation_share", "eval/reward_mean"):
        assert client.get_metric_history(children["grpo"].info.run_id, key), key
    assert children["grpo"].data.tags["llmlab.reward"] == "exact_match"
    assert children["dpo"].data.tags["llmlab.reference"].endswith("precomputed")
    pre = children["pretrain"]
    assert pre.data.tags["llmlab.kind"] == "pretrain" and pre.info.run_id == results["pretrain"]["mlflow_run_id"]
    assert pre.data.params["train.lr"] == "0.002" and pre.data.params["model.d_model"] == "32"
    assert pre.data.tags["llmlab.input.tokenizer.run_id"] == children["tokenizer"].info.run_id
    history = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert {m.step for m in client.get_metric_history(pre.info.run_id, "eval/ppl")} == {6, 12}
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_sec"):
        assert client.get_metric_history(pre.info.run_id, key)
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)} | {
        a.path for d in ("model", "plots") for a in client.list_artifacts(pre.info.run_id, d)}
    assert {"config.json", "metrics.jsonl", "model/config.json", "model/model.safetensors", "plots/loss_curve.png"} <= artifacts
    ev = {a.path for a in client.list_artifacts(children["eval"].info.run_id)}
    assert {"results.json", "report.md"} <= ev
    assert client.get_metric_history(children["eval"].info.run_id, "pretrain/eval/ppl")
    for key in ("bench/llmlab_tasks_gen/exact_match", "bench/llmlab_stdlib_mc/acc_stderr", "bench/llmlab_tasks_mc/contamination"):
        assert client.get_metric_history(children["eval"].info.run_id, f"grpo/{key}"), key  # the demo's benchmarks
    assert "benchmarks" in {a.path for a in client.list_artifacts(children["eval"].info.run_id)}
    sft = children["sft"]  # LoRA: the adapters and the embedding rows train, and the run records them
    assert int(sft.data.tags["llmlab.trainable_params"]) < int(sft.data.tags["llmlab.total_params"])
    assert sft.data.params["lora.train_embeddings"] == "True" and sft.data.tags["llmlab.lora_targets"]
    # lineage: the final model is registered under the pipeline name, with every stage's run
    (version,) = client.search_model_versions("name = 'tiny-test'")
    assert version.run_id == parent.info.run_id and version.tags["llmlab.stage_run_id"] == children["grpo"].info.run_id
    assert version.tags["llmlab.fingerprint"] == results["grpo"]["fingerprint"]
    assert version.tags["llmlab.lineage.tokenizer"] == f"{children['tokenizer'].info.run_id}@{results['tokenizer']['fingerprint']}"
    assert parent.data.tags["llmlab.registered_model"] == "tiny-test/1"


def test_llmlab_runs_lists_stage_status_and_durations(finished_run):
    env = {**os.environ, "LLMLAB_STATE_DIR": str(finished_run["state"])}
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "runs", "tiny-test"], capture_output=True, text=True,
                         env=env, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["started", "pipeline", "status", "seconds"]
    assert "tiny-test" in lines[1] and "FINISHED" in lines[1]
    assert lines[1].index("FINISHED") == lines[0].index("status")  # columns line up under the header
    assert [line.split()[0] for line in lines[2:9]] == ["tokenizer", "pretrain", "sft", "merge", "dpo", "grpo", "eval"]
    assert all("finished" in line for line in lines[2:9])


def test_runs_reads_the_local_store_without_mlflow_and_agrees_with_mlflow(finished_run, tmp_path, monkeypatch):
    """`llmlab runs` reads the default SQLite store directly (no MLflow import); MLflow's own client,
    reading the same store, gives the same runs and aliases."""
    import shutil

    from mlflow.tracking import MlflowClient

    from llmlab import pipeline_runs

    state = tmp_path / "state"
    shutil.copytree(finished_run["state"], state)
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    MlflowClient(f"sqlite:///{state / 'mlflow.db'}").set_registered_model_alias("tiny-test", "champion", "1")
    direct = (pipeline_runs.list_runs("tiny-test"), pipeline_runs.champions())
    import sqlite3

    other = tmp_path / "other.db"  # a SQLite file without MLflow's tables: MLflow's client reads it instead
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    assert pipeline_runs._read_local(f"sqlite:///{other}", lambda db: db.execute("SELECT * FROM runs").fetchall()) is None
    assert pipeline_runs._read_local(f"sqlite:///{tmp_path / 'none.db'}", lambda db: 1) == []  # nothing recorded yet
    assert direct[0] and direct[1] == [{"model": "tiny-test", "alias": "champion", "version": "1", "stage": "grpo",
                                        "run_id": direct[1][0]["run_id"]}]
    monkeypatch.setattr(pipeline_runs, "_read_local", lambda uri, read: None)  # through MLflow's client
    assert (pipeline_runs.list_runs("tiny-test"), pipeline_runs.champions()) == direct
    shown = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmlab.cli", "runs"], capture_output=True,
                           text=True, env={**os.environ, "LLMLAB_STATE_DIR": str(state)}, check=True)
    assert "champion: tiny-test version 1 (stage grpo" in shown.stdout
    assert "import time:" in shown.stderr and "mlflow" not in shown.stderr


def test_cli_run_of_an_invalid_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntokenizer: {name: gpt2}\nstages: {p: {kind: pretrain}}\n")
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "stages.p.data" in out.stderr and "Traceback" not in out.stderr


def test_report_files_and_llmlab_report_rebuilds_from_mlflow(finished_run, tmp_path):
    from mlflow.tracking import MlflowClient

    eval_dir = Path(finished_run["results"]["eval"]["output_dir"])
    assert {"report.md", "report.html", "metrics.png", "training_curves.png", "results.json"} <= {p.name for p in eval_dir.iterdir()}
    client = MlflowClient(f"sqlite:///{finished_run['state'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-test")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    env = {**os.environ, "LLMLAB_STATE_DIR": str(finished_run["state"])}
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "report", parent.info.run_id, "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    assert all(f"| {m} |" in text for m in ("pretrain", "sft", "dpo", "grpo"))
    assert (tmp_path / "r" / "training_curves.png").stat().st_size > 1000
    assert text == (eval_dir / "report.md").read_text()  # the same report, from MLflow alone
    missing = subprocess.run([sys.executable, "-m", "llmlab.cli", "report", "no-such-pipeline"], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "no pipeline named 'no-such-pipeline'" in missing.stderr


def test_tiny_ppo_pipeline_trains_a_reward_model_then_ppo_against_it(harness, isolated):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    spec = shrunk_tiny(isolated, "tiny-ppo-test", pipeline="tiny-ppo.yaml")
    results = pipeline(spec=str(spec))
    assert list(results) == ["tokenizer", "pretrain", "sft", "merge", "reward", "ppo", "eval"]
    rm_dir = Path(results["reward"]["outputs"]["model"])
    assert json.loads((rm_dir / "config.json").read_text())["architectures"] == ["LlmlabForSequenceClassification"]
    assert 0.0 <= results["reward"]["metrics"]["eval/accuracy"] <= 1.0
    # ppo consumed the merged model and the reward stage's model
    inputs = json.loads((Path(results["ppo"]["output_dir"]) / "stage.json").read_text())["inputs"]
    assert (inputs["merge"], inputs["reward"]) == (results["merge"]["fingerprint"], results["reward"]["fingerprint"])
    assert Path(results["ppo"]["outputs"]["value_head"]).is_file()
    sft_run = MlflowClient(f"sqlite:///{isolated / 'state' / 'mlflow.db'}").get_run(results["sft"]["mlflow_run_id"])
    # the adapters and the embedding rows train, the rest of the model is frozen
    assert float(sft_run.data.tags["llmlab.lora_trainable_share"]) < 1.0 and sft_run.data.params["lora.preset"] == "all"
    # LoRA SFT wrote peft adapters (best and final); merge wrote a plain model with the chat template
    sft_dir = Path(results["sft"]["output_dir"])
    assert {p.name for p in (sft_dir / "adapters").iterdir()} == {"best", "final"}
    assert (sft_dir / "adapters" / "best" / "adapter_config.json").is_file()
    merged = Path(results["merge"]["outputs"]["model"])
    assert (merged / "chat_template.jinja").is_file() and (merged / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{isolated / 'state' / 'mlflow.db'}")
    run = client.get_run(results["ppo"]["mlflow_run_id"])
    assert run.data.tags["llmlab.reward"] == "reward stage reward"
    assert client.get_metric_history(run.info.run_id, "rl/explained_variance")
    report = json.loads(Path(results["eval"]["outputs"]["results"]).read_text())
    assert report["model_order"] == ["merge", "ppo"]  # the reward stage scores; it is not evaluated
    for model in ("merge", "ppo"):  # the reward model's score, not a 0/1 exact match
        assert report["models"][model]["reward_mean"] not in (0.0, 1.0)
        assert report["models"][model]["reward_mean"] != report["models"][model]["exact_match"]
    (version,) = client.search_model_versions("name = 'tiny-ppo-test'")
    assert version.tags["llmlab.stage_run_id"] == results["ppo"]["mlflow_run_id"]  # the policy is registered, not the reward model


def test_plan_says_what_would_run_and_why_without_running_anything(tiny_copy):
    import yaml

    from llmlab.plan import plan_run

    finished_run = {"spec": tiny_copy.spec, "results": tiny_copy.results, "state": tiny_copy.state}
    spec = finished_run["spec"]
    rows = {r.stage: r for r in plan_run(spec)}
    assert {s: r.action for s, r in rows.items()} == {s: "reuse" for s in finished_run["results"]}
    rows = {r.stage: r for r in plan_run(spec, force=["grpo"])}
    assert rows["dpo"].action == "reuse" and rows["grpo"].action == "run" and "forced" in rows["grpo"].reasons[0]
    assert rows["eval"].action == "run" and rows["eval"].reasons == ["input 'grpo' runs again, so its output may change"]
    # a time estimate from the stage's own last run (same shape) and a memory estimate
    assert rows["grpo"].seconds == pytest.approx(finished_run["results"]["grpo"]["seconds"]) and rows["grpo"].memory > 0
    raw = yaml.safe_load(spec.read_text())
    changed = f"config changed: beta: {raw['stages']['dpo']['beta']} -> 0.3"  # the shipped beta, whatever it is
    raw["stages"]["dpo"]["beta"] = 0.3
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = {r.stage: r for r in plan_run(spec)}
    assert [s for s, r in rows.items() if r.action == "reuse"] == ["tokenizer", "pretrain", "sft", "merge"]
    assert rows["dpo"].reasons == [changed]
    env = {**os.environ, "LLMLAB_STATE_DIR": str(finished_run["state"])}
    shown = subprocess.run([sys.executable, "-m", "llmlab.cli", "plan", str(spec), "--json"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert {r["stage"]: r["action"] for r in json.loads(shown.stdout)}["dpo"] == "run"
    record = Path(finished_run["results"]["dpo"]["output_dir"]) / "stage.json"
    before = record.read_text()
    dry = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec), "--dry-run"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert dry.returncode == 0 and changed in dry.stdout, dry.stderr
    assert record.read_text() == before  # nothing ran
